// moe_experts_sm90.cu: the prefill expert MLP on CUTLASS's Hopper grouped GEMM (TMA, warp-specialized
// cooperative, persistent; sm_90a only), behind two `extern "C"` host entry points. Same math as
// moe_grouped.cu, over expert-sorted rows (S = tokens * top_k slots, row r of an expert-sorted buffer
// is slot sorted_slots[r]; expert e owns rows expert_offsets[e] .. expert_offsets[e + 1]):
//
//   1. moe_cutlass_setup  one block: for each of the 3 * experts groups, its problem shape (M = the
//                         expert's slot count), its A / B / D pointers and packed strides, into `groups`
//   2. moe_cutlass_gather xs [S, hidden] bf16       xs[r] = x[sorted_slots[r] / top_k]
//   3. grouped GEMM, 2 * experts groups:           gate_up[0][r] = xs[r] . w1[e]^T,  gate_up[1][r] = xs[r] . w3[e]^T
//                         gate_up [2, S, inter] f32 (f32 accumulation, f32 out)
//   4. moe_cutlass_swiglu act [S, inter] bf16      act[r] = bf16(silu(gate) * up), in f32, expert-sorted
//   5. grouped GEMM, experts groups:               down[r] = act[r] . w2[e]^T,  down [S, hidden] f32
//   6. moe_cutlass_scatter out [S, hidden] f32     out[sorted_slots[r]] = topk_weights[sorted_slots[r]] * down[r]
//
// Everything stays on the device (shapes and pointers come from the router's offsets in step 1), so a
// prefill chunk can be captured into a graph. An expert without slots is a group with M = 0, which
// the grouped tile scheduler skips. The one GEMM type (A bf16 row-major [M, K], B bf16 "column-major"
// i.e. the weight's rows [N, K], D f32 row-major [M, N], no C operand) serves steps 3 and 5.
//
// Alignment: TMA needs 16-byte aligned row starts and strides; hidden and inter multiples of 8 (checked
// by the Rust planner, src/cuda/ops/moe_cutlass.rs) give that for every group.
//
// Errors: each entry returns 0, a cudaError_t (1..999), or MOE_CUTLASS_STATUS_BASE + cutlass::Status.
#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "../generated/params.h"

// A named namespace: nvcc cannot stub kernels of an anonymous one beside cute's own.
namespace mx_moe_cutlass {

using cute::_1;
using cute::_64;
using cute::_128;
using cute::Shape;

using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (M, N, K) per group
using ElementAB = cutlass::bfloat16_t;
using ElementD = float;
using ElementAccumulator = float;
using LayoutA = cutlass::layout::RowMajor;
using LayoutB = cutlass::layout::ColumnMajor;
using LayoutD = cutlass::layout::RowMajor;
constexpr int ALIGN_AB = 16 / sizeof(ElementAB);
constexpr int ALIGN_D = 16 / sizeof(ElementD);

using TileShape = Shape<_128, _128, _64>;
using ClusterShape = Shape<_1, _1, _1>;
using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;

using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, ElementAccumulator, ElementAccumulator,
    void, LayoutD*, ALIGN_D,  // no C operand
    ElementD, LayoutD*, ALIGN_D, EpilogueSchedule,
    cutlass::epilogue::fusion::LinearCombination<ElementD, ElementAccumulator>>::CollectiveOp;

using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementAB, LayoutA*, ALIGN_AB, ElementAB,
    LayoutB*, ALIGN_AB, ElementAccumulator, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
    KernelSchedule>::CollectiveOp;

using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

using StrideA = typename Kernel::InternalStrideA;
using StrideB = typename Kernel::InternalStrideB;
using StrideD = typename Kernel::InternalStrideD;
using Shape3 = typename ProblemShape::UnderlyingProblemShape;

// The per-group arrays inside `groups`, each array 3 * experts entries long and 16-byte aligned.
struct GroupArrays {
    Shape3* shapes;
    const ElementAB** a;
    const ElementAB** b;
    ElementD** d;
    StrideA* stride_a;
    StrideB* stride_b;
    StrideD* stride_d;
};

__host__ __device__ constexpr size_t round16(size_t bytes) { return (bytes + 15) / 16 * 16; }

// Bytes of one group's entries across all the arrays (each array rounded up per group, so that
// `count` groups take at most `count * group_bytes()` bytes however the arrays are split).
__host__ __device__ constexpr size_t group_bytes() {
    return round16(sizeof(Shape3)) + 3 * round16(sizeof(void*)) + round16(sizeof(StrideA)) +
           round16(sizeof(StrideB)) + round16(sizeof(StrideD));
}
static_assert(group_bytes() <= MOE_CUTLASS_GROUP_BYTES, "MOE_CUTLASS_GROUP_BYTES too small");

__host__ __device__ GroupArrays group_arrays(uint8_t* base, uint32_t count) {
    GroupArrays g;
    size_t at = 0;
    auto take = [&](size_t each) {
        uint8_t* p = base + at;
        at += round16(each * count);
        return p;
    };
    g.shapes = reinterpret_cast<Shape3*>(take(sizeof(Shape3)));
    g.a = reinterpret_cast<const ElementAB**>(take(sizeof(void*)));
    g.b = reinterpret_cast<const ElementAB**>(take(sizeof(void*)));
    g.d = reinterpret_cast<ElementD**>(take(sizeof(void*)));
    g.stride_a = reinterpret_cast<StrideA*>(take(sizeof(StrideA)));
    g.stride_b = reinterpret_cast<StrideB*>(take(sizeof(StrideB)));
    g.stride_d = reinterpret_cast<StrideD*>(take(sizeof(StrideD)));
    return g;
}

// Group g < 2E: the up GEMM of expert g % E against w1 (g < E) or w3; group 2E + e: the down GEMM of
// expert e. One thread per group.
__global__ void moe_cutlass_setup(MoeCutlassParams p) {
    const uint32_t experts = p.experts, groups = 3 * experts;
    const uint32_t g = blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= groups) return;
    const GroupArrays arrays = group_arrays(p.groups, groups);
    const size_t slots = (size_t)p.tokens * p.top_k;
    const uint32_t e = g % experts;
    const int first = p.expert_offsets[e];
    const int m = p.expert_offsets[e + 1] - first;
    const auto* xs = reinterpret_cast<const ElementAB*>(p.xs);
    const auto* act = reinterpret_cast<const ElementAB*>(p.act);
    int n, k;
    if (g < 2 * experts) {
        const bool up = g >= experts;
        n = (int)p.inter;
        k = (int)p.hidden;
        arrays.a[g] = xs + (size_t)first * k;
        arrays.b[g] = reinterpret_cast<const ElementAB*>(up ? p.w3 : p.w1) + (size_t)e * n * k;
        arrays.d[g] = p.gate_up + (up ? slots * n : 0) + (size_t)first * n;
    } else {
        n = (int)p.hidden;
        k = (int)p.inter;
        arrays.a[g] = act + (size_t)first * k;
        arrays.b[g] = reinterpret_cast<const ElementAB*>(p.w2) + (size_t)e * n * k;
        arrays.d[g] = p.down + (size_t)first * n;
    }
    arrays.shapes[g] = Shape3(m, n, k);
    arrays.stride_a[g] = cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(m, k, 1));
    arrays.stride_b[g] = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(n, k, 1));
    arrays.stride_d[g] = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(m, n, 1));
}

// One block per expert-sorted row r: xs[r] = x[sorted_slots[r] / top_k], 16 bytes per thread step.
__global__ void moe_cutlass_gather(MoeCutlassParams p) {
    const uint32_t r = blockIdx.x;
    const uint32_t token = (uint32_t)p.sorted_slots[r] / p.top_k;
    const uint4* src = reinterpret_cast<const uint4*>(p.x + (size_t)token * p.hidden);
    uint4* dst = reinterpret_cast<uint4*>(p.xs + (size_t)r * p.hidden);
    for (uint32_t c = threadIdx.x; c < p.hidden / 8; c += blockDim.x) dst[c] = src[c];
}

// act[r, i] = bf16(silu(gate[r, i]) * up[r, i]), silu(g) = g / (1 + exp(-g)), in f32.
__global__ void moe_cutlass_swiglu(MoeCutlassParams p) {
    const size_t len = (size_t)p.tokens * p.top_k * p.inter;
    const float* gate = p.gate_up;
    const float* up = p.gate_up + len;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += (size_t)gridDim.x * blockDim.x) {
        const float g = gate[i];
        p.act[i] = __float2bfloat16_rn(g / (1.0f + expf(-g)) * up[i]);
    }
}

// One block per expert-sorted row r: out[s] = topk_weights[s] * down[r] for s = sorted_slots[r].
__global__ void moe_cutlass_scatter(MoeCutlassParams p) {
    const uint32_t r = blockIdx.x;
    const uint32_t s = (uint32_t)p.sorted_slots[r];
    const float w = p.topk_weights[s];
    const float4* src = reinterpret_cast<const float4*>(p.down + (size_t)r * p.hidden);
    float4* dst = reinterpret_cast<float4*>(p.out + (size_t)s * p.hidden);
    for (uint32_t c = threadIdx.x; c < p.hidden / 4; c += blockDim.x) {
        const float4 v = src[c];
        dst[c] = make_float4(w * v.x, w * v.y, w * v.z, w * v.w);
    }
}

// The arguments of the grouped GEMM over `count` groups starting at group `first` of `arrays`.
Gemm::Arguments gemm_arguments(const GroupArrays& arrays, uint32_t first, uint32_t count, int sm_count) {
    cutlass::KernelHardwareInfo hw;
    hw.device_id = 0;  // unused when sm_count is given
    hw.sm_count = sm_count;
    Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGrouped,
        {(int)count, arrays.shapes + first, nullptr},  // shapes on the device only
        {arrays.a + first, arrays.stride_a + first, arrays.b + first, arrays.stride_b + first},
        {{}, nullptr, nullptr, arrays.d + first, arrays.stride_d + first},
        hw};
    auto& fusion = args.epilogue.thread;
    fusion.alpha = 1.0f;
    fusion.beta = 0.0f;
    fusion.alpha_ptr = nullptr;
    fusion.beta_ptr = nullptr;
    return args;
}

int cuda_code(cudaError_t e) { return (int)e; }
int cutlass_code(cutlass::Status s) {
    return s == cutlass::Status::kSuccess ? 0 : (int)MOE_CUTLASS_STATUS_BASE + (int)s;
}

// Runs one grouped GEMM: `first`, `count` groups, on `stream`.
int run_gemm(const GroupArrays& arrays, uint32_t first, uint32_t count, const MoeCutlassParams& p,
             cudaStream_t stream) {
    Gemm gemm;
    const Gemm::Arguments args = gemm_arguments(arrays, first, count, (int)p.sm_count);
    if (Gemm::get_workspace_size(args) > p.workspace_bytes) {
        return (int)MOE_CUTLASS_STATUS_BASE + (int)cutlass::Status::kErrorWorkspaceNull;
    }
    if (int c = cutlass_code(gemm.can_implement(args))) return c;
    if (int c = cutlass_code(gemm.initialize(args, p.workspace, stream))) return c;
    return cutlass_code(gemm.run(stream));
}

}  // namespace mx_moe_cutlass

using namespace mx_moe_cutlass;

// Workspace bytes the grouped GEMMs of `experts` experts need on a GPU of `sm_count` SMs (the larger
// of the up and down GEMMs' needs: they share one workspace).
extern "C" size_t mx_moe_cutlass_workspace_bytes(uint32_t experts, uint32_t sm_count) {
    // The size depends on the group count and the SM count only: no arrays are needed.
    const GroupArrays none{};
    const size_t up = Gemm::get_workspace_size(gemm_arguments(none, 0, 2 * experts, (int)sm_count));
    const size_t down = Gemm::get_workspace_size(gemm_arguments(none, 0, experts, (int)sm_count));
    return up > down ? up : down;
}

// The six steps of the header on `stream` (a CUstream / cudaStream_t); zero tokens launch nothing.
extern "C" int mx_moe_cutlass_run(const MoeCutlassParams* params, void* stream_ptr) {
    const MoeCutlassParams p = *params;
    const auto stream = static_cast<cudaStream_t>(stream_ptr);
    const uint32_t slots = p.tokens * p.top_k, groups = 3 * p.experts;
    if (slots == 0) return 0;
    const GroupArrays arrays = group_arrays(p.groups, groups);

    moe_cutlass_setup<<<(groups + 127) / 128, 128, 0, stream>>>(p);
    moe_cutlass_gather<<<slots, 128, 0, stream>>>(p);
    if (int c = cuda_code(cudaGetLastError())) return c;
    if (int c = run_gemm(arrays, 0, 2 * p.experts, p, stream)) return c;
    const size_t act = (size_t)slots * p.inter;
    const unsigned swiglu_blocks = (unsigned)((act + 255) / 256 < 65535 ? (act + 255) / 256 : 65535);
    moe_cutlass_swiglu<<<swiglu_blocks, 256, 0, stream>>>(p);
    if (int c = cuda_code(cudaGetLastError())) return c;
    if (int c = run_gemm(arrays, 2 * p.experts, p.experts, p, stream)) return c;
    moe_cutlass_scatter<<<slots, 128, 0, stream>>>(p);
    return cuda_code(cudaGetLastError());
}
