// rmsnorm.cu: RMSNorm over the f32 residual stream, with an optional fused residual add.
//
//   residual [rows, hidden] f32          read; updated in place when the variant adds
//   addend   [rows, addend_count, hidden] bf16 (ADD = 1) or f32 (ADD = 2); unused for ADD = 0
//   weight   [hidden] bf16
//   out      [rows, hidden] bf16
//
//   residual[r] += addend[r, 0] + ... + addend[r, addend_count - 1]      (ADD != 0)
//   out[r] = residual[r] * rsqrt(mean(residual[r]^2) + eps) * weight      (all in f32, rounded once)
//
// Grid: one block of RMSNORM_THREADS per row. No fast math (accuracy-critical reduction).
#include "common.cuh"

namespace {

template <int ADD>
__device__ __forceinline__ float addend_at(const void* addend, size_t index) {
    if constexpr (ADD == 1) {
        return mx::to_f32(static_cast<const mx_bf16*>(addend)[index]);
    } else {
        return static_cast<const float*>(addend)[index];
    }
}

template <int ADD>
__device__ void rmsnorm_body(const RmsnormParams& p) {
    const uint32_t row = blockIdx.x;
    if (row >= p.rows) return;  // uniform over the block
    float* residual = p.residual + (size_t)row * p.hidden;
    float sum_sq = 0.0f;
    for (uint32_t i = threadIdx.x; i < p.hidden; i += RMSNORM_THREADS) {
        float r = residual[i];
        if constexpr (ADD != 0) {
            for (uint32_t a = 0; a < p.addend_count; ++a) {
                r += addend_at<ADD>(p.addend, ((size_t)row * p.addend_count + a) * p.hidden + i);
            }
            residual[i] = r;
        }
        sum_sq = fmaf(r, r, sum_sq);
    }
    const float total = mx::block_sum<RMSNORM_THREADS>(sum_sq);
    const float inv_rms = rsqrtf(total / (float)p.hidden + p.eps);
    mx_bf16* out = p.out + (size_t)row * p.hidden;
    for (uint32_t i = threadIdx.x; i < p.hidden; i += RMSNORM_THREADS) {
        // Each thread reads back only the elements it wrote itself.
        out[i] = mx::to_bf16(residual[i] * inv_rms * mx::to_f32(p.weight[i]));
    }
}

}  // namespace

#define MX_DEFINE(symbol, ADD)                         \
    MX_ENTRY(symbol, (RMSNORM_THREADS), RmsnormParams, \
        rmsnorm_body<ADD>(p))
MIXTRAL_RMSNORM_VARIANTS(MX_DEFINE)
#undef MX_DEFINE
