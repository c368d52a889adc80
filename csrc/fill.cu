// fill.cu: seeded pseudo-random bf16 values, for benchmarks on made-up weights of real shapes
// (a 93 GB checkpoint cannot be written to the benchmark machine's disk, so the weights are made
// on the device).
//
//   out [len] bf16:  out[i] = shift + scale * u(seed, base + i),  u uniform in [-1, 1)
//
// u comes from a 32-bit integer hash of (seed, index): the same seed gives the same values on every
// card and launch shape, neighbouring elements are uncorrelated, and no value is NaN or constant.
//
// Grid: grid-stride loop, FILL_THREADS threads per block. Pure integer math plus one FMA.
#include "common.cuh"

namespace {

__device__ __forceinline__ uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

__device__ void fill_random_body(const FillParams& p) {
    const uint32_t stride = gridDim.x * FILL_THREADS;
    for (uint32_t i = blockIdx.x * FILL_THREADS + threadIdx.x; i < p.len; i += stride) {
        const uint32_t h = mix32(mix32(p.base + i) ^ (p.seed * 0x9e3779b9U));
        // 24 high bits -> [0, 1) -> [-1, 1).
        const float u = (float)(h >> 8) * (1.0f / 16777216.0f) * 2.0f - 1.0f;
        p.out[i] = mx::to_bf16(p.shift + p.scale * u);
    }
}

}  // namespace

#define MX_DEFINE(symbol)                        \
    MX_ENTRY(symbol, (FILL_THREADS), FillParams, \
        fill_random_body(p))
MIXTRAL_FILL_RANDOM_VARIANTS(MX_DEFINE)
#undef MX_DEFINE
