// qlinear.cu: the dense projection of a decode batch over one packed quantized weight matrix (FP8,
// INT8, 4-bit integer or 4-bit table codes, the layout of src/packed/mod.rs; decoding in
// csrc/quant.cuh).
//
//   x     [tokens, in_features] bf16              input rows (16-byte aligned), tokens <= 16
//   codes [out_features, row_bytes] u8            row_bytes = in_features (8-bit) or in_features / 2
//   params[out_features, row_params] 32-bit       f32 row scale (8-bit), one (f16 scale, zero) word per
//                                                 group (INT4; quant.cuh) or f32 scale per group (LUT4)
//   perm  [in_features] u32 or null               stored column j multiplies x[t, perm[j]]
//   table [QUANT_TABLE_VALUES] f32                LUT4 only: the values of the 4-bit codes
//   out   [tokens, out_features]                  bf16 (OUT_F32 = 0) or f32 (OUT_F32 = 1)
//
//   out[t, o] = sum_j w[o, j] * x[t, perm[j]] (x[t, j] without perm), products and sums in f32; the
//   8-bit row scale multiplies the row's sum, the INT4 group scale each 32-column chunk's sum; a LUT4
//   weight is table[q] * scale itself (the dequantized value) before it multiplies x.
//
// qlinear_{fp8,int8,int4,lut4}_t{TILE}_{bf16,f32}: like linear_gemv (linear.cu). Each warp owns
//   QLINEAR_ROWS_PER_WARP weight rows; each lane takes every 32nd 16-byte chunk of codes (16 8-bit or
//   32 4-bit elements) and issues QUANT_UNROLL streaming loads per row (LDG.E.NA.128) before decoding
//   them in registers; the rows are read once per TILE tokens (the launcher picks the smallest TILE
//   covering the batch; 9..16 tokens read the codes twice). x is read through L1 with 16-byte loads,
//   or with scalar loads at perm[j] when the columns are permuted (perm read with 16-byte loads, an
//   entry >= in_features reads 0). Warp-shuffle reduction, one lane per (token, row) stores.
//   Grid: (ceil(out_features / (QLINEAR_WARPS * QLINEAR_ROWS_PER_WARP))), QLINEAR_WARPS * 32
//   threads, no dynamic shared memory (LUT4: the 64-byte table, read once per block before any warp
//   returns). in_features is a multiple of 16 (8-bit) / 32 (4-bit), group_size a
//   multiple of 32, codes / x / perm 16-byte aligned (checked by the Rust launcher).
//
// No fast math: nothing transcendental; the decoding is exact and only the summation order differs
// from the CPU reference on the dequantized matrix.
//
// Ran on an H100 (2026-11-28, benches/RESULTS.md): tests/gpu_kernels/quant.rs passes against the
// CPU reference for every kind, group size and tile, with and without a permutation (LUT4, added
// later, not yet run on a GPU). Not yet run on sm_80. The decoding formulas are the ones checked bit
// for bit on the host in src/packed/mod.rs (fp8_decode_by_bits, magic_u8_to_f32,
// lut4_offsets_by_bytes).
#include "quant_mma.cuh"

namespace {

template <int OUT_F32>
__device__ __forceinline__ void store_out(const QLinearParams& p, uint32_t t, uint32_t o, float v) {
    const size_t index = (size_t)t * p.out_features + o;
    if constexpr (OUT_F32 != 0) {
        static_cast<float*>(p.out)[index] = v;
    } else {
        static_cast<mx_bf16*>(p.out)[index] = mx::to_bf16(v);
    }
}

template <int KIND, int TILE, int OUT_F32>
__device__ void qlinear_body(const QLinearParams& p) {
    constexpr int R = QLINEAR_ROWS_PER_WARP;
    static_assert(R * TILE <= 32, "one lane per (token, row) output");
    mx::quant::load_table<KIND>(p.table);  // before any warp returns
    const uint32_t lane = threadIdx.x % 32;
    const uint32_t row0 = (blockIdx.x * QLINEAR_WARPS + threadIdx.x / 32) * R;
    if (row0 >= p.out_features) return;  // no block-wide synchronisation follows
    // Rows past the end re-read the last row (in bounds); their results are never stored.
    const uint8_t* codes[R];
    const float* params[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const uint32_t row = min(row0 + r, p.out_features - 1);
        codes[r] = p.codes + (size_t)row * p.row_bytes;
        params[r] = p.params + (size_t)row * p.row_params;
    }
    for (uint32_t t0 = 0; t0 < p.tokens; t0 += TILE) {
        // Tokens past the end re-read the last token; their results are never stored.
        const mx_bf16* a[TILE];
#pragma unroll
        for (int j = 0; j < TILE; ++j) a[j] = p.x + (size_t)min(t0 + j, p.tokens - 1) * p.in_features;
        float acc[R][TILE];
        mx::quant::dot_rows<KIND, R, TILE>(codes, params, p.perm, a, p.in_features, p.group_size, acc);
#pragma unroll
        for (int j = 0; j < TILE; ++j) {
#pragma unroll
            for (int r = 0; r < R; ++r) {
                if (lane == (uint32_t)(j * R + r) && t0 + j < p.tokens && row0 + r < p.out_features) {
                    store_out<OUT_F32>(p, t0 + j, row0 + r, acc[r][j]);
                }
            }
        }
    }
}

}  // namespace

#define MX_DEFINE(symbol, KIND, TILE, OUT_F32)               \
    MX_ENTRY(symbol, (QLINEAR_WARPS * 32, 1), QLinearParams, \
        qlinear_body<KIND, TILE, OUT_F32>(p))
MIXTRAL_QLINEAR_VARIANTS(MX_DEFINE)
#undef MX_DEFINE

// qlinear_mma: the projection on the tensor cores (quant_mma.cuh: FP8, INT8, INT4 in groups of multiples of
// 128).
#define MX_DEFINE(symbol, KIND, NT, OUT_F32)                                                                     \
    MX_ENTRY(symbol, (QMMA_WARPS * 32, 1), QLinearParams,                                                        \
        mx::qmma::dense<KIND, NT, OUT_F32>(p, p.group_size, [&](uint32_t row) {                                  \
            return mx::qmma::RowPtr{p.codes + (size_t)row * p.row_bytes, p.params + (size_t)row * p.row_params}; \
        }))
MIXTRAL_QLINEAR_MMA_VARIANTS(MX_DEFINE)
#undef MX_DEFINE
