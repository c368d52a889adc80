// moe_experts_q8.cuh: the prefill expert MLP over 8-bit expert stacks (FP8 E4M3 or INT8, one f32
// scale per output row) on CUTLASS's Hopper grouped GEMM (sm_90a only), 8-bit x 8-bit on the tensor
// cores: the weights straight from their packed stacks, the activations quantized per row by the
// fused kernels here exactly as the CPU does it (src/packed: `fp8::quantize_per_channel`, scale =
// amax / 448, code = the nearest E4M3 of v / scale, ties to even, saturating; `int8::
// quantize_per_channel`, scale = amax / 127, code = round-half-even of v / scale clamped to +-127;
// both with scale 1 for a zero row). Instantiated once per format by moe_experts_q8_sm90.cu. The
// steps of moe_experts_sm90.cu, over expert-sorted rows (S = tokens *
// top_k; row r is slot sorted_slots[r], expert e owns rows expert_offsets[e] .. expert_offsets[e + 1]):
//
//   1. expert_setup      the 3 * experts groups' shapes, pointers and strides (grouped_gemm_sm90.cuh)
//   2. q8_gather         xs [S, hidden] codes, xs_scales [S]: row r = quantize(x[sorted_slots[r] / top_k])
//   3. grouped GEMM, 2 * experts groups: gate_up[0][r] = xs[r] . w1[e]^T, gate_up[1][r] = xs[r] . w3[e]^T
//                        (code products, f32 out: the scales are applied in step 4)
//   4. q8_swiglu         h[r, i] = silu(g) * u, g = gate * xs_scales[r] * w1_scales[e, i] (u likewise
//                        with w3), in f32; act [S, inter] codes, act_scales [S]: row r = quantize(h[r])
//   5. grouped GEMM, experts groups: down[r] = act[r] . w2[e]^T (f32)
//   6. q8_scatter        out[s] = topk_weights[s] * act_scales[r] * w2_scales[e, c] * down[r, c]
//                        for s = sorted_slots[r]
//
// As in the bf16 shim, a rank of an expert-parallel split passes the offsets of the experts it holds
// and every other row is left alone, and everything stays on the device, so a prefill chunk can be
// captured. Hidden and
// inter are multiples of 16 (16-byte TMA rows of codes; checked by src/cuda/ops/moe_cutlass.rs).
// Errors: 0, a cudaError_t (1..999), or MOE_CUTLASS_STATUS_BASE + cutlass::Status.
#pragma once

#include <cuda_fp8.h>

#include "../common.cuh"
#include "grouped_gemm_sm90.cuh"

namespace mx_cutlass {

// FP8 E4M3 codes: the GEMM accumulates in f32.
struct Fp8Codes {
    using Gemm = GroupedGemm<cutlass::float_e4m3_t, 128>;
    static constexpr float QMAX = 448.0f;
    // The E4M3 code nearest to v, ties to even, saturating to +-448 (fp8.rs `encode`).
    __device__ static uint32_t encode(float v) {
        return (uint32_t)__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
    }
};

// INT8 codes (two's complement): the GEMM accumulates exactly in i32.
struct Int8Codes {
    using Gemm = GroupedGemm<int8_t, 128, int32_t>;
    static constexpr float QMAX = 127.0f;
    // round-half-even(v) clamped to +-127 (int8.rs `quantize_per_channel`), as a byte.
    __device__ static uint32_t encode(float v) {
        return (uint32_t)(uint8_t)(int8_t)max(-127, min(127, __float2int_rn(v)));
    }
};

// The scale of a row whose largest magnitude is `amax`.
template <class Codes>
__device__ __forceinline__ float row_scale(float amax) {
    return amax > 0.0f && isfinite(amax) ? amax / Codes::QMAX : 1.0f;
}

// The codes of v[0..4] / scale, packed little-endian into one word.
template <class Codes>
__device__ __forceinline__ uint32_t quantize4(const float* v, float scale) {
    return Codes::encode(v[0] / scale) | Codes::encode(v[1] / scale) << 8 | Codes::encode(v[2] / scale) << 16 |
           Codes::encode(v[3] / scale) << 24;
}

// One block per expert-sorted row r: the row of x, quantized. Each thread reads 8 bf16 (16 bytes) per
// step twice (for the maximum, then for the codes; the second read hits L1).
template <class Codes>
__global__ void __launch_bounds__(ROW_THREADS) q8_gather(MoeCutlassQ8Params p) {
    const uint32_t r = blockIdx.x;
    if (!row_held(p.expert_offsets, p.experts, r)) return;
    const uint32_t token = (uint32_t)p.sorted_slots[r] / p.top_k;
    const uint4* src = reinterpret_cast<const uint4*>(p.x + (size_t)token * p.hidden);
    const uint32_t steps = p.hidden / 8;
    float amax = 0.0f;
    for (uint32_t c = threadIdx.x; c < steps; c += ROW_THREADS) {
        float v[8];
        mx::unpack8(src[c], v);
        for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[i]));
    }
    const float scale = row_scale<Codes>(mx::block_max<ROW_THREADS>(amax));
    uint2* dst = reinterpret_cast<uint2*>(p.xs + (size_t)r * p.hidden);
    for (uint32_t c = threadIdx.x; c < steps; c += ROW_THREADS) {
        float v[8];
        mx::unpack8(src[c], v);
        dst[c] = make_uint2(quantize4<Codes>(v, scale), quantize4<Codes>(v + 4, scale));
    }
    if (threadIdx.x == 0) p.xs_scales[r] = scale;
}

// One block per expert-sorted row r: h = silu(g) * u with the scales applied, written over the gate
// row (each thread reads back only what it wrote), then quantized into act[r].
template <class Codes>
__global__ void __launch_bounds__(ROW_THREADS) q8_swiglu(MoeCutlassQ8Params p) {
    const uint32_t r = blockIdx.x;
    if (!row_held(p.expert_offsets, p.experts, r)) return;
    const size_t slots = (size_t)p.tokens * p.top_k;
    const uint32_t e = expert_of_row(p.expert_offsets, p.experts, r);
    float4* gate = reinterpret_cast<float4*>(p.gate_up + (size_t)r * p.inter);
    const float4* up = reinterpret_cast<const float4*>(p.gate_up + (slots + r) * p.inter);
    const float4* s1 = reinterpret_cast<const float4*>(p.w1_scales + (size_t)e * p.inter);
    const float4* s3 = reinterpret_cast<const float4*>(p.w3_scales + (size_t)e * p.inter);
    const float sx = p.xs_scales[r];
    const uint32_t steps = p.inter / 4;
    float amax = 0.0f;
    for (uint32_t c = threadIdx.x; c < steps; c += ROW_THREADS) {
        const float4 gv = gate[c], uv = up[c], a = s1[c], b = s3[c];
        float h[4] = {gv.x * sx * a.x, gv.y * sx * a.y, gv.z * sx * a.z, gv.w * sx * a.w};
        const float u[4] = {uv.x * sx * b.x, uv.y * sx * b.y, uv.z * sx * b.z, uv.w * sx * b.w};
        for (int i = 0; i < 4; ++i) {
            h[i] = h[i] / (1.0f + expf(-h[i])) * u[i];
            amax = fmaxf(amax, fabsf(h[i]));
        }
        gate[c] = make_float4(h[0], h[1], h[2], h[3]);
    }
    const float scale = row_scale<Codes>(mx::block_max<ROW_THREADS>(amax));
    uint32_t* act = reinterpret_cast<uint32_t*>(p.act + (size_t)r * p.inter);
    for (uint32_t c = threadIdx.x; c < steps; c += ROW_THREADS) {
        const float4 hv = gate[c];
        const float h[4] = {hv.x, hv.y, hv.z, hv.w};
        act[c] = quantize4<Codes>(h, scale);
    }
    if (threadIdx.x == 0) p.act_scales[r] = scale;
}

// One block per expert-sorted row r: out[s] = weight * act_scales[r] * w2_scales[e] * down[r]. (A
// template only so that each translation unit has its own instance.)
template <class Codes>
__global__ void __launch_bounds__(ROW_THREADS) q8_scatter(MoeCutlassQ8Params p) {
    const uint32_t r = blockIdx.x;
    if (!row_held(p.expert_offsets, p.experts, r)) return;
    const uint32_t s = (uint32_t)p.sorted_slots[r];
    const uint32_t e = expert_of_row(p.expert_offsets, p.experts, r);
    const float w = p.topk_weights[s] * p.act_scales[r];
    const float4* src = reinterpret_cast<const float4*>(p.down + (size_t)r * p.hidden);
    const float4* s2 = reinterpret_cast<const float4*>(p.w2_scales + (size_t)e * p.hidden);
    float4* dst = reinterpret_cast<float4*>(p.out + (size_t)s * p.hidden);
    for (uint32_t c = threadIdx.x; c < p.hidden / 4; c += ROW_THREADS) {
        const float4 v = src[c], k = s2[c];
        dst[c] = make_float4(w * k.x * v.x, w * k.y * v.y, w * k.z * v.z, w * k.w * v.w);
    }
}

// The six steps of the header on `stream` for `Codes`' stacks; zero tokens launch nothing.
template <class Codes>
int run_q8(const MoeCutlassQ8Params& p, cudaStream_t stream) {
    return run_expert_mlp<typename Codes::Gemm>(p, stream, q8_gather<Codes>, q8_swiglu<Codes>, q8_scatter<Codes>);
}

}  // namespace mx_cutlass
