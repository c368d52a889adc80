// quant_mma.cuh: products of decode batches with weight matrices on the tensor cores, the weights read as
// stored (no repacking): packed quantized matrices (the layout of src/packed/mod.rs) in qlinear.cu
// (qlinear_mma) and qmoe.cu (qmoe_mma_up / qmoe_mma_down), bf16 matrices in linear.cu (linear_mma_decode)
// and moe_gemv.cu (moe_mma_up / moe_mma_down). Kinds: FP8 and INT8 (one f32 scale per row), INT4 (an f32
// (scale, zero) pair per row and group of a multiple of 128 columns), and bf16 (QMMA_KIND_BF16, no
// parameters).
//
//   codes  [rows, row_bytes] u8      8-bit: one byte per column; INT4: stored column j in byte j / 2, the
//                                    low nibble for even j; bf16: the weights' bytes
//   params [rows, row_params] 32-bit 8-bit: the row scale (f32); INT4: one (f16 scale, zero) word per
//                                    group (quant.cuh), zero 0..=16; bf16: none
//   x      8 * NT columns (tokens or slots) of `cols` bf16 each, one pointer per column
//   acc    [M][NT][4] f32            the mma.sync C fragments of 16 rows x 8 * NT columns per matrix:
//          acc[m][nt][i] = sum_j w_m[row, j] * x[col][j], row = row0 + g + 8 * (i / 2),
//          col = 8 * nt + 2 * q + i % 2 (lane = 4 * g + q), w the dequantized value
//
// Work of one block (QMMA_WARPS warps): the same 16 rows of M matrices (rows g and g + 8 per lane), the
// columns split into steps of 4 chunks (one 16-byte chunk of codes per lane of a q group: 4 * 32 = 128
// columns for INT4, 4 * 16 = 64 for 8-bit, 4 * 8 = 32 for bf16); warp w takes steps w, w + QMMA_WARPS, ... and the warps'
// partial sums are added in shared memory in warp order (reduce_warps): deterministic. A chunk past
// the end of a row (the last step of a row whose columns are not a whole number of steps) multiplies
// zeros.
//
// One step, one lane: its chunk of codes of rows g and g + 8 and the matching pieces of its activation
// column g of each n-tile. The dot product does not depend on which mma k-slot carries which column, as
// long as the A (weights) and B (activations) fragments agree for every lane of one q; so the weights
// need no shuffle, the activations one PRMT per register:
//   INT4, per code word W (8 nibbles: chunk columns 8W .. 8W + 7) and half s, two mma per word:
//     k-slots 2q, 2q + 1 <- columns 8W + 2s, 8W + 2s + 4; 2q + 8, 2q + 9 <- 8W + 2s + 1, 8W + 2s + 5.
//     A shift and one LOP3 put nibbles j and j + 4 into the mantissas of a bf16 pair (128 + nibble), one
//     bf16x2 FMA subtracts 128 + zero: nibble - zero, exactly (an integer of magnitude <= 16).
//   8-bit, per code word W (4 bytes: chunk columns 4W .. 4W + 3), one mma per word, in column order:
//     k-slots 2q, 2q + 1 <- columns 4W, 4W + 1; 2q + 8, 2q + 9 <- 4W + 2, 4W + 3 (the activations need
//     no PRMT either). INT8 bytes are decoded to f32 exactly as the GEMVs do (quant.cuh: int8_value);
//     FP8 byte pairs to f16 pairs by the hardware conversion (cvt.rn.f16x2.e4m3x2 on sm_89+, exact:
//     every E4M3 value is an f16), then to f32 (sm_80: fp8_value, as the GEMVs). A pair is rounded to
//     bf16x2, exactly: every E4M3 value and every integer of magnitude <= 128 is a bf16.
//
// Scales: INT4 steps lie in one group (group_size a multiple of 128), so a step's mma accumulate
// (q - zero) * x into zeroed f32 fragments, which are then scaled by the rows' group scales and added to
// acc; 8-bit accumulates straight into acc and the row scale multiplies the total once. Products are
// exact in the tensor cores; only the order of the f32 sums differs from the CPU reference.
//
// Requirements (checked by the Rust launchers): the row layout of quant.cuh (cols a multiple of 16 for
// 8-bit, 32 for INT4; 8 for bf16), INT4 group_size a multiple of 128, no column permutation, weight rows
// and activation columns 16-byte aligned. Needs sm_80+ (mma.sync bf16, fma.rn.bf16x2, cvt.rn.bf16x2.f32).
#pragma once

#include "quant.cuh"
#include "slot_tiles.cuh"

namespace mx {
namespace qmma {

constexpr uint32_t WARPS = QMMA_WARPS;

// Columns of one 16-byte chunk of a row.
template <int KIND>
__host__ __device__ constexpr uint32_t chunk_cols() {
    return KIND == QMMA_KIND_BF16 ? 8u : quant::chunk_elems<KIND>();
}
static_assert(4 * chunk_cols<QUANT_KIND_INT4>() == QMMA_INT4_STEP_COLS, "an INT4 step is 128 columns");

// The start of one weight row: its bytes and (packed kinds) its parameters.
struct RowPtr {
    const uint8_t* codes;
    const float* params;
};

// A compile-time n-tile count (8 columns each) handed to a per-tile body.
template <int N>
struct Tiles {
    static constexpr int value = N;
};

// (w & 0x000F000F) | 0x43004300 in one LOP3 (the constant OR-ed in lives in a register, hoisted out of
// loops): the nibbles at bits 0..3 and 16..19 of w in the mantissas of a bf16 pair, as 128 + nibble.
// (A nibble cannot be taken from bits 4..7 instead: bf16 has 7 mantissa bits, so bit 7 of a half is
// the exponent's lowest.)
__device__ __forceinline__ uint32_t low_nibbles_in_bf16(uint32_t w) {
#ifdef MX_EMULATOR
    return (w & 0x000F000Fu) | 0x43004300u;
#else
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(w), "n"(0x000F000Fu), "r"(0x43004300u));
    return d;
#endif
}

// a * 1 + b per bf16 half, rounded once (exact where the result is representable).
__device__ __forceinline__ uint32_t add_bf16x2(uint32_t a, uint32_t b) {
#ifdef MX_EMULATOR
    return mx_emu::fma_bf16x2(a, 0x3F803F80u, b);
#else
    uint32_t d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(0x3F803F80u), "r"(b));
    return d;
#endif
}

// (lo, hi) rounded to a bf16 pair, lo in the low half.
__device__ __forceinline__ uint32_t bf16x2_of(float lo, float hi) {
#ifdef MX_EMULATOR
    return (uint32_t)mx::to_bf16(lo).__x | ((uint32_t)mx::to_bf16(hi).__x << 16);
#else
    uint32_t d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
#endif
}

// The E4M3 bytes at bits 16h .. 16h + 15 of w as a bf16 pair (byte 2h in the low half), exactly
// (quant.cuh: fp8_pair_values).
__device__ __forceinline__ uint32_t fp8_pair_as_bf16x2(uint32_t w, int h) {
    float lo, hi;
    quant::fp8_pair_values(w, h, lo, hi);
    return bf16x2_of(lo, hi);
}

// The A registers of one mma of code word `w` of rows g (words[0]) and g + 8 (words[1]), in the k-slot
// order of the file comment (INT4: half s of the word; 8-bit: the whole word, s = 0). bias[r]: INT4,
// -(128 + zero) of row r's group in both bf16 halves; 8-bit, unused.
template <int KIND>
__device__ __forceinline__ void a_fragment(const uint32_t (&words)[2], int s, const uint32_t (&bias)[2],
                                           uint32_t (&a)[4]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const uint32_t w = words[r];
        if constexpr (KIND == QUANT_KIND_INT4) {
            a[r] = add_bf16x2(low_nibbles_in_bf16(w >> (8 * s)), bias[r]);
            a[2 + r] = add_bf16x2(low_nibbles_in_bf16(w >> (8 * s + 4)), bias[r]);
        } else if constexpr (KIND == QUANT_KIND_FP8) {
            a[r] = fp8_pair_as_bf16x2(w, 0);
            a[2 + r] = fp8_pair_as_bf16x2(w, 1);
        } else {
            static_assert(KIND == QUANT_KIND_INT8, "FP8, INT8 or INT4");
            const uint32_t flipped = w ^ 0x80808080u;
            a[r] = bf16x2_of(quant::int8_value(flipped, 0), quant::int8_value(flipped, 1));
            a[2 + r] = bf16x2_of(quant::int8_value(flipped, 2), quant::int8_value(flipped, 3));
        }
    }
}

// acc[nt] += the step's products of one matrix: c[r] the lane's chunk of row g + 8r, bias as a_fragment,
// x[nt][v] the v-th 8 activations of the lane's column in n-tile nt at the chunk's columns.
template <int KIND, int NT>
__device__ __forceinline__ void step_mma(const uint4 (&c)[2], const uint32_t (&bias)[2],
                                         const uint4 (&x)[NT][chunk_cols<KIND>() / 8], float (&acc)[NT][4]) {
    if constexpr (KIND == QMMA_KIND_BF16) {
        // Two mma per chunk: weight words 2M, 2M + 1 against activation words 2M, 2M + 1.
#pragma unroll
        for (int m = 0; m < 2; ++m) {
            const uint32_t a[4] = {quant::word(c[0], 2 * m), quant::word(c[1], 2 * m), quant::word(c[0], 2 * m + 1),
                                   quant::word(c[1], 2 * m + 1)};
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                mma_bf16_16816(acc[nt], a, quant::word(x[nt][0], 2 * m), quant::word(x[nt][0], 2 * m + 1));
            }
        }
        return;
    } else {
        constexpr int HALVES = KIND == QUANT_KIND_INT4 ? 2 : 1;  // mma per code word
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            const uint32_t words[2] = {quant::word(c[0], w), quant::word(c[1], w)};
#pragma unroll
            for (int s = 0; s < HALVES; ++s) {
                uint32_t a[4];
                a_fragment<KIND>(words, s, bias, a);
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    // The activations of the word's columns in k-slot order.
                    if constexpr (KIND == QUANT_KIND_INT4) {
                        // Columns 8W + 2s + {0, 4} and 8W + 2s + {1, 5}.
                        const uint32_t lo = quant::word(x[nt][w], s), hi = quant::word(x[nt][w], s + 2);
                        mma_bf16_16816(acc[nt], a, __byte_perm(lo, hi, 0x5410u), __byte_perm(lo, hi, 0x7632u));
                    } else {
                        // Columns 4W + {0, 1} and 4W + {2, 3}: two consecutive words of the activations.
                        const uint4& piece = x[nt][w / 2];
                        mma_bf16_16816(acc[nt], a, quant::word(piece, 2 * (w % 2)),
                                       quant::word(piece, 2 * (w % 2) + 1));
                    }
                }
            }
        }
    }
}

// This warp's share of the block's products (see the file comment): rows[m][r] the row g + 8r of matrix m
// (its start), x[nt] the lane's activation column of n-tile nt. Each step's code
// (and INT4 group parameter) loads of UNROLL steps are issued before any is used.
template <int KIND, int M, int NT>
__device__ __forceinline__ void warp_products(const RowPtr (&rows)[M][2], const mx_bf16* const (&x)[NT], uint32_t cols,
                                              uint32_t group_size, float (&acc)[M][NT][4]) {
    constexpr int UNROLL = M == 1 ? 4 : 2;
    constexpr uint32_t CHUNK = chunk_cols<KIND>();  // columns of one lane's chunk
    constexpr int PIECES = CHUNK / 8;                        // 16-byte activation loads per chunk
    constexpr bool INT4 = KIND == QUANT_KIND_INT4;
    const uint32_t warp = threadIdx.x / 32, q = threadIdx.x % 4;
    const uint32_t chunks = cols / CHUNK;
    const uint32_t steps = (chunks + 3) / 4;
#pragma unroll
    for (int m = 0; m < M; ++m) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[m][nt][i] = 0.0f;
        }
    }
    for (uint32_t base = warp; base < steps; base += WARPS * UNROLL) {
        uint4 c[UNROLL][M][2];
        float2 prm[UNROLL][M][2];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            // Chunks past the end re-read the row's last chunk (in bounds, no branch between the
            // loads); they multiply zeros or are never used.
            const uint32_t chunk = min(min(base + u * WARPS, steps - 1) * 4 + q, chunks - 1);
#pragma unroll
            for (int m = 0; m < M; ++m) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    c[u][m][r] = load_stream_16(rows[m][r].codes + (size_t)chunk * QUANT_CHUNK_BYTES);
                    if constexpr (INT4) {
                        const uint32_t group = (chunk & ~3u) * CHUNK / group_size;  // the step's first column
                        prm[u][m][r] = quant::int4_params(__ldg(rows[m][r].params + group));
                    }
                }
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const uint32_t step = base + u * WARPS;
            if (step < steps) {
                const uint32_t chunk = step * 4 + q;
                uint4 xs[NT][PIECES];
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                    for (int v = 0; v < PIECES; ++v) {
                        xs[nt][v] = chunk < chunks ? load_shared_16(x[nt] + chunk * CHUNK + 8 * v)
                                                   : make_uint4(0u, 0u, 0u, 0u);
                    }
                }
#pragma unroll
                for (int m = 0; m < M; ++m) {
                    if constexpr (INT4) {
                        const uint32_t bias[2] = {bf16x2_of(-128.0f - prm[u][m][0].y, -128.0f - prm[u][m][0].y),
                                                  bf16x2_of(-128.0f - prm[u][m][1].y, -128.0f - prm[u][m][1].y)};
                        float part[NT][4];
#pragma unroll
                        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                            for (int i = 0; i < 4; ++i) part[nt][i] = 0.0f;
                        }
                        step_mma<KIND, NT>(c[u][m], bias, xs, part);
#pragma unroll
                        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                            for (int i = 0; i < 4; ++i) {
                                acc[m][nt][i] = fmaf(prm[u][m][i / 2].x, part[nt][i], acc[m][nt][i]);
                            }
                        }
                    } else {
                        const uint32_t unused[2] = {0u, 0u};
                        step_mma<KIND, NT>(c[u][m], unused, xs, acc[m]);
                    }
                }
            }
        }
    }
    if constexpr (KIND == QUANT_KIND_FP8 || KIND == QUANT_KIND_INT8) {
        // The row scales, once.
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const float scale[2] = {__ldg(rows[m][0].params), __ldg(rows[m][1].params)};
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[m][nt][i] *= scale[i / 2];
            }
        }
    }
}

// Adds the warps' acc in warp order into warp 0's; true in warp 0, which then holds the block's sums.
// Contains __syncthreads (every thread of the block must call it, as often as the others); the first one
// also keeps a previous call's reads apart from this call's writes.
template <int M, int NT>
__device__ __forceinline__ bool reduce_warps(float (&acc)[M][NT][4]) {
    constexpr int VALUES = M * NT * 4;
    __shared__ float partial[WARPS - 1][VALUES][32];
    const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float* flat = &acc[0][0][0];
    __syncthreads();
    if (warp > 0) {
#pragma unroll
        for (int v = 0; v < VALUES; ++v) partial[warp - 1][v][lane] = flat[v];
    }
    __syncthreads();
    if (warp > 0) return false;
#pragma unroll
    for (uint32_t w = 0; w + 1 < WARPS; ++w) {
#pragma unroll
        for (int v = 0; v < VALUES; ++v) flat[v] += partial[w][v][lane];
    }
    return true;
}

// Calls body(Tiles<NT>{}, first) for consecutive passes over the columns [begin, end) (an expert's
// sorted slots), each covering 8 * NT of them with NT <= MAX_NT: MAX_NT n-tiles while more than half of
// them are needed, then the fewest of 1, 2 or 4 that cover the rest. The body handles first + j >= end.
template <int MAX_NT, typename Body>
__device__ __forceinline__ void for_column_tiles(int32_t begin, int32_t end, Body&& body) {
    static_assert(MAX_NT == 1 || MAX_NT == 2 || MAX_NT == 4, "compiled n-tile counts");
    int32_t first = begin;
    for (; end - first > 4 * MAX_NT; first += 8 * MAX_NT) body(Tiles<MAX_NT>{}, first);
    const int32_t left = end - first;
    if constexpr (MAX_NT >= 4) {
        if (left > 8) {
            body(Tiles<2>{}, first);
            return;
        }
    }
    if (left > 0) body(Tiles<1>{}, first);
}

// out[t, row] (bf16 or f32 by OUT_F32) at `index` = t * rows + row.
template <int OUT_F32>
__device__ __forceinline__ void store(void* out, size_t index, float v) {
    if constexpr (OUT_F32 != 0) {
        static_cast<float*>(out)[index] = v;
    } else {
        static_cast<mx_bf16*>(out)[index] = to_bf16(v);
    }
}

// A dense projection of p.tokens <= 8 * NT tokens: out[t, o] = sum_j w[o, j] x[t, j] for the block's 16 rows
// o = 16 blockIdx.x + (0..15), row(o) giving each weight row (P: x, out, tokens, in_features, out_features).
// Warp 0 stores (token 2q + i % 2 + 8 nt, row g + 8 (i / 2)) after the reduction.
template <int KIND, int NT, int OUT_F32, class P, class Row>
__device__ __forceinline__ void dense(const P& p, uint32_t group_size, Row row) {
    const uint32_t lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
    const uint32_t row0 = blockIdx.x * QMMA_ROWS;
    if (row0 >= p.out_features) return;  // uniform over the block
    // Rows and tokens past the end re-read the last one (in bounds); their results are never stored.
    RowPtr rows[1][2];
#pragma unroll
    for (int r = 0; r < 2; ++r) rows[0][r] = row(min(row0 + g + 8 * r, p.out_features - 1));
    const mx_bf16* x[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) x[nt] = p.x + (size_t)min(8 * nt + g, p.tokens - 1) * p.in_features;
    float acc[1][NT][4];
    warp_products<KIND, 1, NT>(rows, x, p.in_features, group_size, acc);
    if (!reduce_warps<1, NT>(acc)) return;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const uint32_t t = 8 * nt + 2 * q + i % 2, o = row0 + g + 8 * (i / 2);
            if (t < p.tokens && o < p.out_features) store<OUT_F32>(p.out, (size_t)t * p.out_features + o, acc[0][nt][i]);
        }
    }
}

// The activation row of sorted-slot index `index` of [begin, end) (clamped to end - 1: in bounds, never
// stored) among `rows` [*, len], by token (x) or by slot (act), and its slot (>= slots for a bad entry,
// which reads row 0). P: sorted_slots, tokens, top_k.
template <class P>
__device__ __forceinline__ const mx_bf16* slot_column(const P& p, const mx_bf16* rows, uint32_t len, bool by_token,
                                                      int32_t index, int32_t end, uint32_t& slot) {
    const uint32_t slots = p.tokens * p.top_k;
    slot = (uint32_t)p.sorted_slots[min(index, end - 1)];
    const uint32_t r = slot < slots ? (by_token ? slot / p.top_k : slot) : 0;
    return rows + (size_t)r * len;
}

// One half of the expert MLP of a decode batch, M matrices of `out_rows` rows over `cols` columns, the
// activations `in` ([*, cols]: x by token, or act by slot): block (blockIdx.x, y) owns rows
// 16 blockIdx.x .. + 15 for the y-th expert with slots (slot_tiles.cuh), its slots in passes of up to
// 8 * MAX_NT columns; row(matrices[m], r) gives row r of that stacked matrix; store(slot, row, v) writes
// the M sums v of one (slot, row). P: expert_offsets, sorted_slots, tokens, experts, top_k.
template <int KIND, int MAX_NT, int M, class P, class Row, class Store>
__device__ __forceinline__ void expert_half(const P& p, uint32_t group_size, const int (&matrices)[M],
                                            uint32_t out_rows, const mx_bf16* in, uint32_t cols, bool by_token,
                                            Row row, Store store) {
    int32_t begin, end;
    const uint32_t slots = p.tokens * p.top_k;
    const uint32_t expert = active_expert(p.expert_offsets, p.experts, (int32_t)slots, begin, end);
    const uint32_t row0 = blockIdx.x * QMMA_ROWS;
    if (begin == end || row0 >= out_rows) return;  // uniform over the block
    const uint32_t lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
    RowPtr rows[M][2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const size_t matrix_row = (size_t)expert * out_rows + min(row0 + g + 8 * r, out_rows - 1);
#pragma unroll
        for (int m = 0; m < M; ++m) rows[m][r] = row(matrices[m], matrix_row);
    }
    for_column_tiles<MAX_NT>(begin, end, [&](auto tiles, int32_t first) {
        constexpr int NT = decltype(tiles)::value;
        const mx_bf16* x[NT];
        uint32_t unused;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) x[nt] = slot_column(p, in, cols, by_token, first + 8 * nt + g, end, unused);
        float acc[M][NT][4];
        warp_products<KIND, M, NT>(rows, x, cols, group_size, acc);
        if (!reduce_warps<M, NT>(acc)) return;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int32_t index = first + 8 * nt + 2 * q + i % 2;
                const uint32_t o = row0 + g + 8 * (i / 2);
                uint32_t slot;
                slot_column(p, in, cols, by_token, index, end, slot);
                if (index < end && slot < slots && o < out_rows) {
                    float v[M];
#pragma unroll
                    for (int m = 0; m < M; ++m) v[m] = acc[m][nt][i];
                    store(slot, o, v);
                }
            }
        }
    });
}

// The expert MLP's up half: act[s] = silu(w1[e] x[t]) * (w3[e] x[t]); row(m, r) gives row r of the stacked
// w1 (m = 0) or w3 (m = 1). P: x, act, inter, hidden and expert_half's fields.
template <int KIND, int MAX_NT, class P, class Row>
__device__ __forceinline__ void expert_up(const P& p, uint32_t group_size, Row row) {
    expert_half<KIND, MAX_NT, 2>(p, group_size, {0, 1}, p.inter, p.x, p.hidden, true, row,
                                 [&](uint32_t slot, uint32_t o, const float (&v)[2]) {
                                     const float silu = v[0] / (1.0f + expf(-v[0]));
                                     p.act[(size_t)slot * p.inter + o] = to_bf16(silu * v[1]);
                                 });
}

// The expert MLP's down half: out[s] = topk_weights[s] * (w2[e] act[s]); row(2, r) gives row r of the
// stacked w2. P: act, out, topk_weights, inter, hidden and expert_half's fields.
template <int KIND, int MAX_NT, class P, class Row>
__device__ __forceinline__ void expert_down(const P& p, uint32_t group_size, Row row) {
    expert_half<KIND, MAX_NT, 1>(p, group_size, {2}, p.hidden, p.act, p.inter, false, row,
                                 [&](uint32_t slot, uint32_t o, const float (&v)[1]) {
                                     p.out[(size_t)slot * p.hidden + o] = p.topk_weights[slot] * v[0];
                                 });
}

}  // namespace qmma
}  // namespace mx
