// moe_experts_sm90.cu: the prefill expert MLP on CUTLASS's Hopper grouped GEMM (TMA, warp-specialized
// cooperative, persistent; sm_90a only), behind two `extern "C"` host entry points. Same math as
// moe_grouped.cu, over expert-sorted rows (S = tokens * top_k slots, row r of an expert-sorted buffer
// is slot sorted_slots[r]; expert e owns rows expert_offsets[e] .. expert_offsets[e + 1]):
//
//   1. expert_setup       for each of the 3 * experts groups, its problem shape (M = the expert's slot
//                         count), A / B / D pointers and packed strides, into `groups` (grouped_gemm_sm90.cuh)
//   2. moe_cutlass_gather xs [S, hidden] bf16       xs[r] = x[sorted_slots[r] / top_k]
//   3. grouped GEMM, 2 * experts groups:           gate_up[0][r] = xs[r] . w1[e]^T,  gate_up[1][r] = xs[r] . w3[e]^T
//                         gate_up [2, S, inter] f32 (f32 accumulation, f32 out)
//   4. moe_cutlass_swiglu act [S, inter] bf16      act[r] = bf16(silu(gate) * up), in f32, expert-sorted
//   5. grouped GEMM, experts groups:               down[r] = act[r] . w2[e]^T,  down [S, hidden] f32
//   6. moe_cutlass_scatter out [S, hidden] f32     out[sorted_slots[r]] = topk_weights[sorted_slots[r]] * down[r]
//
// A rank of an expert-parallel split passes the router's offsets of the experts it holds (absolute
// rows): its groups are those experts, and the per-row kernels leave every other row alone.
//
// Everything stays on the device (shapes and pointers come from the router's offsets in step 1), so a
// prefill chunk can be captured into a graph. An expert without slots is a group with M = 0, which
// the grouped tile scheduler skips. One GEMM type (grouped_gemm_sm90.cuh, bf16 in, f32 out) serves
// steps 3 and 5; the FP8 expert MLP (moe_experts_q8_sm90.cu) runs the same steps on E4M3 codes.
//
// Alignment: TMA needs 16-byte aligned row starts and strides; hidden and inter multiples of 8 (checked
// by the Rust planner, src/cuda/ops/moe_cutlass.rs) give that for every group.
//
// Errors: each entry returns 0, a cudaError_t (1..999), or MOE_CUTLASS_STATUS_BASE + cutlass::Status.
#include "grouped_gemm_sm90.cuh"

// A named namespace: nvcc cannot stub kernels of an anonymous one beside cute's own.
namespace mx_moe_cutlass {

using namespace mx_cutlass;
using G = GroupedGemm<cutlass::bfloat16_t, 64>;

// One block per expert-sorted row r: xs[r] = x[sorted_slots[r] / top_k], 16 bytes per thread step.
__global__ void __launch_bounds__(ROW_THREADS) moe_cutlass_gather(MoeCutlassParams p) {
    const uint32_t r = blockIdx.x;
    if (!row_held(p.expert_offsets, p.experts, r)) return;
    const uint32_t token = (uint32_t)p.sorted_slots[r] / p.top_k;
    const uint4* src = reinterpret_cast<const uint4*>(p.x + (size_t)token * p.hidden);
    uint4* dst = reinterpret_cast<uint4*>(p.xs + (size_t)r * p.hidden);
    for (uint32_t c = threadIdx.x; c < p.hidden / 8; c += ROW_THREADS) dst[c] = src[c];
}

// One block per expert-sorted row r: act[r, i] = bf16(silu(gate[r, i]) * up[r, i]),
// silu(g) = g / (1 + exp(-g)), in f32.
__global__ void __launch_bounds__(ROW_THREADS) moe_cutlass_swiglu(MoeCutlassParams p) {
    const size_t r = blockIdx.x, slots = (size_t)p.tokens * p.top_k;
    if (!row_held(p.expert_offsets, p.experts, (uint32_t)r)) return;
    const float* gate = p.gate_up + r * p.inter;
    const float* up = p.gate_up + (slots + r) * p.inter;
    mx_bf16* act = p.act + r * p.inter;
    for (uint32_t i = threadIdx.x; i < p.inter; i += ROW_THREADS) {
        const float g = gate[i];
        act[i] = __float2bfloat16_rn(g / (1.0f + expf(-g)) * up[i]);
    }
}

// One block per expert-sorted row r: out[s] = topk_weights[s] * down[r] for s = sorted_slots[r].
__global__ void __launch_bounds__(ROW_THREADS) moe_cutlass_scatter(MoeCutlassParams p) {
    const uint32_t r = blockIdx.x;
    if (!row_held(p.expert_offsets, p.experts, r)) return;
    const uint32_t s = (uint32_t)p.sorted_slots[r];
    const float w = p.topk_weights[s];
    const float4* src = reinterpret_cast<const float4*>(p.down + (size_t)r * p.hidden);
    float4* dst = reinterpret_cast<float4*>(p.out + (size_t)s * p.hidden);
    for (uint32_t c = threadIdx.x; c < p.hidden / 4; c += ROW_THREADS) {
        const float4 v = src[c];
        dst[c] = make_float4(w * v.x, w * v.y, w * v.z, w * v.w);
    }
}

}  // namespace mx_moe_cutlass

using namespace mx_moe_cutlass;

// Workspace bytes the grouped GEMMs of `experts` experts need on a GPU of `sm_count` SMs (the larger
// of the up and down GEMMs' needs: they share one workspace).
extern "C" size_t mx_moe_cutlass_workspace_bytes(uint32_t experts, uint32_t sm_count) {
    return G::workspace_bytes(experts, sm_count);
}

// The six steps of the header on `stream` (a CUstream / cudaStream_t); zero tokens launch nothing.
extern "C" int mx_moe_cutlass_run(const MoeCutlassParams* params, void* stream) {
    return run_expert_mlp<G>(*params, static_cast<cudaStream_t>(stream), moe_cutlass_gather,
                             moe_cutlass_swiglu, moe_cutlass_scatter);
}
