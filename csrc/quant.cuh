// quant.cuh: reading quantized weights in the packed layout of src/packed/mod.rs, shared by
// qlinear.cu, qmoe.cu and dequant.cu.
//
// Layout of one matrix [rows, cols] (stored column j; `perm` maps it to input column perm[j]):
//   KIND = QUANT_KIND_FP8 / QUANT_KIND_INT8: codes [rows, cols] bytes (E4M3 / two's complement),
//     params [rows] f32 scales: w[r][j] = value(code) * scale[r].
//   KIND = QUANT_KIND_INT4: codes [rows, cols / 2] bytes, stored column j in byte j / 2, the low nibble
//     for even j; params [rows, groups] 32-bit words, group j / group_size, each the f16 bits of the
//     group's scale (low half) and its zero, an integer in 0..=16 (high half; PackedMatrix::
//     device_params): w[r][j] = scale * (q - zero).
//   KIND = QUANT_KIND_LUT4 (bitsandbytes NF4 / FP4): codes as INT4; params [rows, groups] f32 scales;
//     a table of QUANT_TABLE_VALUES f32 values (the kernel's `table` pointer, read into shared memory
//     once per block by load_table): w[r][j] = table[q] * scale[r][j / group_size].
// Every row is a whole number of 16-byte chunks (cols a multiple of 16 for 8-bit, 32 for 4-bit) and,
// for 4-bit, group_size is a multiple of 32, so the 32 elements of one chunk share one group.
//
// Decoding is exact (every value equals PackedMatrix::dequantize on the host):
//   FP8:  on sm_89+, byte pairs by the hardware conversion to an f16 pair (cvt.rn.f16x2.e4m3x2,
//         exact: every E4M3 value is an f16, the NaN codes NaN), each then widened to f32. Before:
//         the bits (c & 0x80) << 24 | (c & 0x7f) << 20 as an f32, times 2^120 (bias 127 - 7); the
//         f32 from the bits alone is tiny (at most 2^-112, denormal for exponent 0), so it is scaled
//         by 2^120 before anything else multiplies it. (packed/mod.rs: fp8_decode_by_bits.)
//   INT8: the code with its sign bit flipped placed in the mantissa of 2^23 (0x4B000000 | (c ^ 0x80)),
//         minus 2^23 + 128. (packed/mod.rs: magic_u8_to_f32.)
//   INT4: the nibble q in the mantissa of 2^23 (0x4B000000 | q), minus 2^23 + zero: q - zero exactly,
//         as 2^23 + zero is exact for an integer zero.
//   LUT4: table[q] read from shared memory (16 words in 16 distinct banks: a warp's lookups never
//         conflict) at the byte offset 4 * q (packed/mod.rs: lut4_offsets_by_bytes), then one f32
//         product with the group scale, rounded once: the value PackedMatrix::dequantize computes
//         (scale * table.value(q)), bit for bit.
#pragma once

#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "common.cuh"

namespace mx {
namespace quant {

// Whether KIND packs two 4-bit codes per byte (INT4, LUT4).
template <int KIND>
__host__ __device__ constexpr bool is_4bit() {
    return KIND == QUANT_KIND_INT4 || KIND == QUANT_KIND_LUT4;
}

// Stored columns in one 16-byte chunk of codes.
template <int KIND>
__host__ __device__ constexpr uint32_t chunk_elems() {
    return is_4bit<KIND>() ? 32u : 16u;
}

// The table of the running LUT4 kernel (QUANT_TABLE_VALUES f32), filled by load_table. 256-byte
// aligned: the low byte of its shared address is 0, so a byte offset 4 * q (at most 60) is placed there
// by one PRMT (lut4_values).
#ifdef MX_EMULATOR
// One table per OS thread for the whole program: the inline functions below that use it are merged
// across the kernel files by the linker, and the emulator runs one block at a time on a thread.
alignas(256) inline thread_local float lut4_table[QUANT_TABLE_VALUES];
#else
static __shared__ __align__(256) float lut4_table[QUANT_TABLE_VALUES];
#endif
static_assert(QLINEAR_WARPS * 32 >= QUANT_TABLE_VALUES && MOE_WARPS * 32 >= QUANT_TABLE_VALUES &&
                  DEQUANT_THREADS >= QUANT_TABLE_VALUES,
              "load_table reads one table value per thread");

// LUT4: reads the kernel's `table` (QUANT_TABLE_VALUES f32) into lut4_table with the first threads of
// the block (every kernel has at least that many) and synchronises the block, so every thread must
// call it before any returns. The other kinds: nothing.
template <int KIND>
__device__ __forceinline__ void load_table(const float* table) {
    if constexpr (KIND == QUANT_KIND_LUT4) {
        if (threadIdx.x < QUANT_TABLE_VALUES) lut4_table[threadIdx.x] = __ldg(table + threadIdx.x);
        __syncthreads();
    }
}

// Word i (0..3) of a 16-byte chunk; i is a compile-time constant after unrolling.
__device__ __forceinline__ uint32_t word(const uint4& c, int i) {
    return i == 0 ? c.x : i == 1 ? c.y : i == 2 ? c.z : c.w;
}

// The E4M3 value of byte i (0..3) of w: bits (c & 0x80) << 24 | (c & 0x7f) << 20, times 2^120.
// The byte is moved to bits 24..31 and shifted right arithmetically by 4: the sign lands in bit 31
// (and 27..30, masked off), the exponent and mantissa in bits 20..26.
__device__ __forceinline__ float fp8_value(uint32_t w, int i) {
    const int32_t top = (int32_t)(w << (24 - 8 * i));
    const uint32_t bits = (uint32_t)(top >> 4) & 0x87F00000u;
    return __uint_as_float(bits) * 0x1p120f;
}

// The E4M3 values of bytes 2h and 2h + 1 (h = 0, 1) of w, exactly: one hardware conversion of the
// pair to f16 on sm_89+ (2 instructions for two values where fp8_value takes 8), fp8_value before
// (cuda_fp8.h's software conversion is several times longer there).
__device__ __forceinline__ void fp8_pair_values(uint32_t w, int h, float& lo, float& hi) {
#if defined(MX_EMULATOR)
    const bool pair_conversion = mx_emu::arch() >= 890;  // the emulated device's (both are tested)
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    constexpr bool pair_conversion = true;
#else
    constexpr bool pair_conversion = false;
#endif
    if (pair_conversion) {
        const __half2_raw pair = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(w >> (16 * h)), __NV_E4M3);
        lo = __half2float(__half(__half_raw{pair.x}));
        hi = __half2float(__half(__half_raw{pair.y}));
    } else {
        lo = fp8_value(w, 2 * h);
        hi = fp8_value(w, 2 * h + 1);
    }
}

// The signed value of byte i (0..3) of w, given flipped = w ^ 0x80808080: the byte goes to bits 0..7
// and 0x4B to bits 24..31 (one PRMT), giving the f32 2^23 + (c ^ 0x80); minus 2^23 + 128.
__device__ __forceinline__ float int8_value(uint32_t flipped, int i) {
    return __uint_as_float(__byte_perm(flipped, 0x4Bu, 0x4550u | (uint32_t)i)) - 8388736.0f;
}

// q - zero for nibble k (0..7) of w, given bias = 2^23 + zero.
__device__ __forceinline__ float int4_value(uint32_t w, int k, float bias) {
    return __uint_as_float(0x4B000000u | ((w >> (4 * k)) & 0xFu)) - bias;
}

// The f32 at shared address `address`.
__device__ __forceinline__ float load_shared_f32(uint32_t address) {
#ifdef MX_EMULATOR
    return *static_cast<const float*>(mx_emu::shared_pointer(address));
#else
    float v;
    asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(address));
    return v;
#endif
}

// lut4_table[q] of the 8 nibbles q of w (v[k]: nibble k). The byte offsets 4 * q of the four even
// nibbles are made at once in the bytes of one word, those of the odd nibbles in another (a shift and a
// mask each); one PRMT per value then puts its offset byte under the upper three bytes of the table's
// address, giving the address of its LDS. A warp's 32 lookups never conflict: the 16 words lie in 16
// distinct banks.
__device__ __forceinline__ void lut4_values(uint32_t w, float (&v)[8]) {
    const uint32_t base = (uint32_t)__cvta_generic_to_shared(lut4_table);
    const uint32_t even = (w << 2) & 0x3C3C3C3Cu;
    const uint32_t odd = (w >> 2) & 0x3C3C3C3Cu;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[2 * i] = load_shared_f32(__byte_perm(even, base, 0x7650u | (uint32_t)i));
        v[2 * i + 1] = load_shared_f32(__byte_perm(odd, base, 0x7650u | (uint32_t)i));
    }
}

// The 8 stored columns 8 * piece .. 8 * piece + 7 of chunk c: the code values (8-bit, before the row
// scale), q - zero (INT4; bias = 2^23 + zero of the chunk's group) or table[q] (LUT4, before the group
// scale; the table read by load_table).
template <int KIND>
__device__ __forceinline__ void decode8(const uint4& c, int piece, float bias, float (&v)[8]) {
    if constexpr (KIND == QUANT_KIND_INT4) {
        const uint32_t w = word(c, piece);
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = int4_value(w, k, bias);
    } else if constexpr (KIND == QUANT_KIND_LUT4) {
        lut4_values(word(c, piece), v);
    } else if constexpr (KIND == QUANT_KIND_FP8) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const uint32_t w = word(c, 2 * piece + h);
            fp8_pair_values(w, 0, v[4 * h], v[4 * h + 1]);
            fp8_pair_values(w, 1, v[4 * h + 2], v[4 * h + 3]);
        }
    } else {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const uint32_t flipped = word(c, 2 * piece + h) ^ 0x80808080u;
#pragma unroll
            for (int i = 0; i < 4; ++i) v[4 * h + i] = int8_value(flipped, i);
        }
    }
}

// The (scale, zero) of an INT4 group from its 32-bit word (see the layout above), both exact.
__device__ __forceinline__ float2 int4_params(float word) {
    const uint32_t w = __float_as_uint(word);
    return make_float2(__half2float(__half(__half_raw{(unsigned short)(w & 0xffffu)})), (float)(w >> 16));
}

// The (scale, 2^23 + zero) of the group holding chunk `chunk` of a 4-bit row (params of that row).
__device__ __forceinline__ void int4_group(const float* row_params, uint32_t chunk, uint32_t group_size,
                                           float& scale, float& bias) {
    const float2 sz = int4_params(__ldg(row_params + chunk * 32u / group_size));
    scale = sz.x;
    bias = 8388608.0f + sz.y;
}

// The scale of the group holding chunk `chunk` of a LUT4 row (params of that row).
__device__ __forceinline__ float lut4_group(const float* row_params, uint32_t chunk, uint32_t group_size) {
    return __ldg(row_params + (size_t)(chunk * 32u / group_size));
}

// The 8 input columns of stored columns e0 .. e0 + 7 (perm 16-byte aligned, e0 a multiple of 8).
__device__ __forceinline__ void load_perm8(const uint32_t* perm, uint32_t e0, uint32_t (&idx)[8]) {
    const uint4 lo = load_shared_16(perm + e0);
    const uint4 hi = load_shared_16(perm + e0 + 4);
    idx[0] = lo.x;
    idx[1] = lo.y;
    idx[2] = lo.z;
    idx[3] = lo.w;
    idx[4] = hi.x;
    idx[5] = hi.y;
    idx[6] = hi.z;
    idx[7] = hi.w;
}

// 8 elements of the activation row `a` (length cols) as f32: a[e0 .. e0 + 8) with one 16-byte load,
// or a[idx[k]] with scalar loads when the columns are permuted (an index >= cols reads 0).
__device__ __forceinline__ void load_x8(const mx_bf16* a, uint32_t e0, bool permuted, const uint32_t (&idx)[8],
                                        uint32_t cols, float (&x)[8]) {
    if (permuted) {
        const unsigned short* bits = reinterpret_cast<const unsigned short*>(a);
#pragma unroll
        for (int k = 0; k < 8; ++k) x[k] = idx[k] < cols ? __uint_as_float((uint32_t)__ldg(bits + idx[k]) << 16) : 0.0f;
    } else {
        unpack8(load_shared_16(a + e0), x);
    }
}

// acc[r][j] += w[r] . x_j over the stored columns col0 .. col0 + chunk_elems of one chunk (codes c[r]).
// 8-bit: the code values (the row scale is applied by dot_rows); INT4: scale[r] * sum (q - zero) x;
// LUT4: sum (table[q] * scale[r]) x, each weight the exact dequantized value.
template <int KIND, int R, int TILE>
__device__ __forceinline__ void accumulate_chunk(const uint4 (&c)[R], const float (&scale)[R], const float (&bias)[R],
                                                 const uint32_t* perm, const mx_bf16* const (&a)[TILE],
                                                 uint32_t col0, uint32_t cols, float (&acc)[R][TILE]) {
    constexpr int PIECES = (int)chunk_elems<KIND>() / 8;
    float part[R][TILE];
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int j = 0; j < TILE; ++j) part[r][j] = 0.0f;
    }
    const bool permuted = perm != nullptr;
    // Not unrolled for 4-bit: unrolled, ptxas hoists the x loads of all four pieces (up to 4 * TILE
    // 16-byte registers) ahead of the math.
    constexpr int PIECE_UNROLL = is_4bit<KIND>() ? 1 : PIECES;
#pragma unroll PIECE_UNROLL
    for (int piece = 0; piece < PIECES; ++piece) {
        const uint32_t e0 = col0 + 8 * piece;
        float w[R][8];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            decode8<KIND>(c[r], piece, bias[r], w[r]);
            if constexpr (KIND == QUANT_KIND_LUT4) {
#pragma unroll
                for (int k = 0; k < 8; ++k) w[r][k] = __fmul_rn(w[r][k], scale[r]);
            }
        }
        uint32_t idx[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        if (permuted) load_perm8(perm, e0, idx);
#pragma unroll
        for (int j = 0; j < TILE; ++j) {
            float x[8];
            load_x8(a[j], e0, permuted, idx, cols, x);
#pragma unroll
            for (int r = 0; r < R; ++r) {
#pragma unroll
                for (int k = 0; k < 8; ++k) part[r][j] = fmaf(w[r][k], x[k], part[r][j]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int j = 0; j < TILE; ++j) {
            if constexpr (KIND == QUANT_KIND_INT4) {
                acc[r][j] = fmaf(scale[r], part[r][j], acc[r][j]);
            } else {
                acc[r][j] += part[r][j];
            }
        }
    }
}

// acc[r][j] = sum over the stored columns k of row r of w[r][k] * x_j[perm[k]] (perm null: x_j[k]), for
// R packed rows of `cols` columns (codes[r], params[r]: the row's codes and parameters) against TILE
// activation rows a[j]; every lane returns the full sums. Each lane takes every 32nd 16-byte chunk;
// a step issues QUANT_UNROLL chunks per row (and, 4-bit, their group parameters) before using them.
// LUT4: the kernel has called load_table.
template <int KIND, int R, int TILE>
__device__ __forceinline__ void dot_rows(const uint8_t* const (&codes)[R], const float* const (&params)[R],
                                         const uint32_t* perm, const mx_bf16* const (&a)[TILE], uint32_t cols,
                                         uint32_t group_size, float (&acc)[R][TILE]) {
    // Chunks per row and step: QUANT_UNROLL, halved for tiles of 4+ tokens (their longer math per chunk
    // and accumulators would otherwise push int4 past the register file).
    constexpr int U = TILE >= 4 ? QUANT_UNROLL / 2 : QUANT_UNROLL;
    constexpr uint32_t ELEMS = chunk_elems<KIND>();
    const uint32_t lane = threadIdx.x % 32;
    const uint32_t chunks = cols / ELEMS;
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int j = 0; j < TILE; ++j) acc[r][j] = 0.0f;
    }
    for (uint32_t base = 0; base < chunks; base += 32 * U) {
        uint4 c[U][R];
        float scale[U][R];
        float bias[U][R];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            // Chunks past the end of the row re-read its last chunk (in bounds, no branch between the
            // loads); they are never used.
            const uint32_t chunk = min(base + u * 32 + lane, chunks - 1);
#pragma unroll
            for (int r = 0; r < R; ++r) {
                c[u][r] = load_stream_16(codes[r] + (size_t)chunk * QUANT_CHUNK_BYTES);
                scale[u][r] = 1.0f;
                bias[u][r] = 0.0f;
                if constexpr (KIND == QUANT_KIND_INT4) int4_group(params[r], chunk, group_size, scale[u][r], bias[u][r]);
                if constexpr (KIND == QUANT_KIND_LUT4) scale[u][r] = lut4_group(params[r], chunk, group_size);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const uint32_t chunk = base + u * 32 + lane;
            if (chunk < chunks) {
                accumulate_chunk<KIND, R, TILE>(c[u], scale[u], bias[u], perm, a, chunk * ELEMS, cols, acc);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        // 8-bit: the row scale, once per row.
        const float row_scale = is_4bit<KIND>() ? 1.0f : __ldg(params[r]);
#pragma unroll
        for (int j = 0; j < TILE; ++j) acc[r][j] = group_sum(acc[r][j]) * row_scale;
    }
}

}  // namespace quant
}  // namespace mx
