// sampling.cu: greedy sampling on the device.
//
//   logits  [rows, vocab] f32
//   out_ids [rows] u32
//
//   out_ids[r] = the lowest id i with logits[r, i] == max(logits[r, :]); NaN is never chosen (it
//   compares false with everything) and a row of NaN gives id 0.
//
// Grid: one block of ARGMAX_THREADS per row; each thread scans a strided part of the row, then a
// warp-shuffle and a shared-memory reduction with the same (value, lower id) order. No math at all.
#include "common.cuh"

namespace {

struct Best {
    float value;
    uint32_t id;  // UINT32_MAX: nothing seen yet
};

// True when (value, id) comes before `best`: larger value, or the same value with a lower id.
__device__ __forceinline__ bool better(float value, uint32_t id, const Best& best) {
    return value > best.value || (value == best.value && id < best.id);
}

__device__ __forceinline__ void offer(Best& best, float value, uint32_t id) {
    if (better(value, id, best)) best = Best{value, id};
}

__device__ void argmax_body(const ArgmaxParams& p) {
    __shared__ Best partial[ARGMAX_THREADS / 32];
    const uint32_t row = blockIdx.x;
    if (row >= p.rows) return;  // uniform over the block
    const float* logits = p.logits + (size_t)row * p.vocab;
    Best best{-INFINITY, UINT32_MAX};
    for (uint32_t i = threadIdx.x; i < p.vocab; i += ARGMAX_THREADS) offer(best, logits[i], i);

#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
        const float value = __shfl_xor_sync(mx::FULL_MASK, best.value, offset);
        const uint32_t id = __shfl_xor_sync(mx::FULL_MASK, best.id, offset);
        offer(best, value, id);
    }
    const uint32_t warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) partial[warp] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (uint32_t w = 1; w < ARGMAX_THREADS / 32; ++w) offer(best, partial[w].value, partial[w].id);
        p.out_ids[row] = best.id == UINT32_MAX ? 0u : best.id;
    }
}

}  // namespace

#define MX_DEFINE(symbol) \
    MX_KERNEL void __launch_bounds__(ARGMAX_THREADS) symbol(ArgmaxParams p) { argmax_body(p); }
MIXTRAL_ARGMAX_VARIANTS(MX_DEFINE)
#undef MX_DEFINE
