// dequant.cu: a stack of packed quantized matrices (FP8, INT8, 4-bit integer or 4-bit table codes,
// the layout of src/packed/mod.rs; decoding in csrc/quant.cuh) expanded to bf16 in input-column order,
// for the tensor-core kernels of prefill chunks.
//
//   codes  [count, rows, row_bytes] u8        row_bytes = cols (8-bit) or cols / 2 (4-bit), 16-byte aligned
//   params [count, rows, row_params] 32-bit   f32 row scale (8-bit), one (f16 scale, zero) word per
//                                             group (INT4; quant.cuh) or f32 scale per group (LUT4)
//   perm   [count, cols] u32 or null          input column of each stored column
//   table  [QUANT_TABLE_VALUES] f32           LUT4 only: the values of the 4-bit codes
//   out    [count, rows, cols] bf16           16-byte aligned
//
//   out[m, r, perm[m, j]] = bf16(w[m, r, j]) (out[m, r, j] without perm), w the exact dequantized value
//   (8-bit: value(code) * scale; INT4: scale * (q - zero); LUT4: scale * table[q]), rounded once to
//   nearest even: the same bits as PackedMatrix::dequantize rounded to bf16 on the host. A perm entry
//   >= cols is skipped.
//
// dequantize_{fp8,int8,int4,lut4}: one block per (row, matrix), grid (rows, count), DEQUANT_THREADS
//   threads; each thread takes every DEQUANT_THREADS-th 16-byte chunk of the row's codes (one
//   streaming load), decodes its 16 (8-bit) or 32 (4-bit) values and stores them as 16-byte bf16
//   vectors (without perm) or scalar bf16 stores at perm[j]. cols is a multiple of 16 / 32 and
//   group_size of 32 (checked by the Rust launcher), so every chunk is whole and in one group. LUT4
//   reads its 64-byte table into shared memory once per block first.
//
// No fast math: the only arithmetic is the exact decoding and one f32 product.
//
// Ran on an H100 (2026-11-28, benches/RESULTS.md): tests/gpu_kernels/quant.rs checks it bit-exact
// against PackedMatrix::dequantize (LUT4, added later, not yet run on a GPU). Not yet run on sm_80.
#include "quant.cuh"

namespace {

// Two f32 values as a packed bf16 pair (low half = first value, the lower address).
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    return (uint32_t)__bfloat16_as_ushort(mx::to_bf16(lo)) | ((uint32_t)__bfloat16_as_ushort(mx::to_bf16(hi)) << 16);
}

template <int KIND>
__device__ void dequant_body(const DequantParams& p) {
    constexpr uint32_t ELEMS = mx::quant::chunk_elems<KIND>();
    mx::quant::load_table<KIND>(p.table);  // before any thread returns
    const uint32_t row = blockIdx.x;
    const uint32_t m = blockIdx.y;
    if (row >= p.rows || m >= p.count) return;
    const size_t matrix_row = (size_t)m * p.rows + row;
    const uint8_t* codes = p.codes + matrix_row * p.row_bytes;
    const float* params = p.params + matrix_row * p.row_params;
    const uint32_t* perm = p.perm != nullptr ? p.perm + (size_t)m * p.cols : nullptr;
    mx_bf16* out = p.out + matrix_row * p.cols;
    const uint32_t chunks = p.cols / ELEMS;
    for (uint32_t chunk = threadIdx.x; chunk < chunks; chunk += DEQUANT_THREADS) {
        const uint4 c = mx::load_stream_16(codes + (size_t)chunk * QUANT_CHUNK_BYTES);
        float scale = 0.0f;
        float bias = 0.0f;
        if constexpr (KIND == QUANT_KIND_INT4) {
            mx::quant::int4_group(params, chunk, p.group_size, scale, bias);
        } else if constexpr (KIND == QUANT_KIND_LUT4) {
            scale = mx::quant::lut4_group(params, chunk, p.group_size);
        } else {
            scale = __ldg(params);
        }
#pragma unroll
        for (int piece = 0; piece < (int)ELEMS / 8; ++piece) {
            const uint32_t e0 = chunk * ELEMS + 8 * piece;
            float v[8];
            mx::quant::decode8<KIND>(c, piece, bias, v);
            if (perm != nullptr) {
#pragma unroll
                for (int k = 0; k < 8; ++k) {
                    const uint32_t col = __ldg(perm + e0 + k);
                    if (col < p.cols) out[col] = mx::to_bf16(scale * v[k]);
                }
            } else {
                uint4 packed;
                packed.x = pack_bf16x2(scale * v[0], scale * v[1]);
                packed.y = pack_bf16x2(scale * v[2], scale * v[3]);
                packed.z = pack_bf16x2(scale * v[4], scale * v[5]);
                packed.w = pack_bf16x2(scale * v[6], scale * v[7]);
                *reinterpret_cast<uint4*>(out + e0) = packed;
            }
        }
    }
}

}  // namespace

#define MX_DEFINE(symbol, KIND)                        \
    MX_ENTRY(symbol, (DEQUANT_THREADS), DequantParams, \
        dequant_body<KIND>(p))
MIXTRAL_DEQUANTIZE_VARIANTS(MX_DEFINE)
#undef MX_DEFINE
