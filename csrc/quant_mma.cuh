// quant_mma.cuh: products of decode batches with 4-bit integer packed matrices (QUANT_KIND_INT4, the layout
// of src/packed/mod.rs, read as stored: no repacking) on the tensor cores, shared by qlinear.cu
// (qlinear_mma) and qmoe.cu (qmoe_mma_up / qmoe_mma_down).
//
//   codes  [rows, cols / 2] u8       stored column j in byte j / 2, the low nibble for even j
//   params [rows, groups, 2] f32     (scale, zero) per group of group_size columns, zero an integer 0..=16
//   x      8 * NT columns (tokens or slots) of `cols` bf16 each, one pointer per column
//   acc    [M][NT][4] f32            the mma.sync C fragments of 16 rows x 8 * NT columns per matrix:
//          acc[m][nt][i] = sum_j w_m[row, j] * x[col][j], row = row0 + g + 8 * (i / 2),
//          col = 8 * nt + 2 * q + i % 2 (lane = 4 * g + q), w the dequantized value scale * (q - zero)
//
// Work of one block (QMMA_WARPS warps): the same 16 rows of M matrices (rows g and g + 8 per lane), the
// columns split into steps of QMMA_STEP_COLS = 128; warp w takes steps w, w + QMMA_WARPS, ... and the
// warps' partial sums are added in shared memory in warp order (reduce_warps): deterministic.
//
// One step, one lane: its 16-byte chunk of codes of rows g and g + 8 (columns 128 * step + 32 * q ..
// + 31, four 32-bit words W of 8 nibbles, nibble i of word W being column 8 * W + i of the chunk) and the
// matching 8-column pieces of its activation column g of each n-tile. The dot product does not depend on
// which mma k-slot carries which column, as long as the A (weights) and B (activations) fragments agree
// for every lane of one q; here, per word W and half s (two mma per word, eight per step):
//   k-slot 2q, 2q + 1       <- chunk columns 8W + 2s, 8W + 2s + 4
//   k-slot 2q + 8, 2q + 9   <- chunk columns 8W + 2s + 1, 8W + 2s + 5
// so the weights need no shuffle: a shift and one LOP3 put nibbles j and j + 4 into the mantissas of a
// bf16 pair and one bf16x2 FMA turns them into nibble - zero, exactly (nibble_pairs); per word three
// shifts, four LOP3 and four FMA. The activations take one PRMT per register.
//
// The group of a step is one (group_size a multiple of 128): the step's eight mma accumulate
// (q - zero) * x into zeroed f32 fragments, which are then scaled by the rows' group scales and added to
// acc (f32 FMA). Products are exact in the tensor cores; only the order of the f32 sums differs from the
// CPU reference.
//
// Requirements (checked by the Rust launchers): cols a multiple of 128, group_size a multiple of 128, no
// column permutation, codes rows and activation columns 16-byte aligned. Needs sm_80+ (mma.sync bf16,
// fma.rn.bf16x2).
#pragma once

#include "common.cuh"

namespace mx {
namespace qmma {

constexpr uint32_t WARPS = QMMA_WARPS;
constexpr uint32_t STEP = QMMA_STEP_COLS;
static_assert(STEP == 4 * 32, "one step is one 32-column chunk per lane of a q group");

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
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(w), "n"(0x000F000Fu), "r"(0x43004300u));
    return d;
}

// a * 1 + b per bf16 half, rounded once (exact where the result is representable).
__device__ __forceinline__ uint32_t add_bf16x2(uint32_t a, uint32_t b) {
    uint32_t d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(0x3F803F80u), "r"(b));
    return d;
}

// -(128 + zero) in both bf16 halves (exact: an integer below 256).
__device__ __forceinline__ uint32_t minus_bias(float zero) {
    uint32_t d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %1;" : "=r"(d) : "f"(-128.0f - zero));
    return d;
}

// The four bf16x2 registers of (nibble - zero) of one code word, exactly: pairs[j] holds nibbles j and
// j + 4 (the lower in the low half), taken as 128 + nibble by one LOP3 after a shift by 4j and offset by
// -(128 + zero) in one bf16x2 FMA: both operands and the result (an integer of magnitude at most 16)
// are exact in bf16.
__device__ __forceinline__ void nibble_pairs(uint32_t w, uint32_t minus_128z, uint32_t (&pairs)[4]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) pairs[j] = add_bf16x2(low_nibbles_in_bf16(w >> (4 * j)), minus_128z);
}

// Word i (0..3) of a 16-byte register; i is a compile-time constant after unrolling.
__device__ __forceinline__ uint32_t word(const uint4& c, int i) {
    return i == 0 ? c.x : i == 1 ? c.y : i == 2 ? c.z : c.w;
}

// acc[nt] += the step's products of one matrix: c[r] the lane's chunk of row g + 8r, prm[r] that row's
// (scale, zero) for the step's group, x[nt][W] the activations of the lane's column in n-tile nt at chunk
// columns 8W .. 8W + 7.
template <int NT>
__device__ __forceinline__ void step_products(const uint4 (&c)[2], const float2 (&prm)[2], const uint4 (&x)[NT][4],
                                              float (&acc)[NT][4]) {
    const uint32_t bias[2] = {minus_bias(prm[0].y), minus_bias(prm[1].y)};
    float part[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) part[nt][i] = 0.0f;
    }
#pragma unroll
    for (int w = 0; w < 4; ++w) {
        uint32_t pairs[2][4];
#pragma unroll
        for (int r = 0; r < 2; ++r) nibble_pairs(word(c[r], w), bias[r], pairs[r]);
#pragma unroll
        for (int s = 0; s < 2; ++s) {
            const uint32_t a[4] = {pairs[0][2 * s], pairs[1][2 * s], pairs[0][2 * s + 1], pairs[1][2 * s + 1]};
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const uint32_t lo = word(x[nt][w], s), hi = word(x[nt][w], s + 2);
                mma_bf16_16816(part[nt], a, __byte_perm(lo, hi, 0x5410u), __byte_perm(lo, hi, 0x7632u));
            }
        }
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        acc[nt][0] = fmaf(prm[0].x, part[nt][0], acc[nt][0]);
        acc[nt][1] = fmaf(prm[0].x, part[nt][1], acc[nt][1]);
        acc[nt][2] = fmaf(prm[1].x, part[nt][2], acc[nt][2]);
        acc[nt][3] = fmaf(prm[1].x, part[nt][3], acc[nt][3]);
    }
}

// This warp's share of the block's products (see the file comment): codes[m][r] / params[m][r] the
// row g + 8r of matrix m (row starts), x[nt] the lane's activation column of n-tile nt. Each step's code
// and parameter loads of UNROLL steps are issued before any is used.
template <int M, int NT>
__device__ __forceinline__ void warp_products(const uint8_t* const (&codes)[M][2], const float* const (&params)[M][2],
                                              const mx_bf16* const (&x)[NT], uint32_t cols, uint32_t group_size,
                                              float (&acc)[M][NT][4]) {
    constexpr int UNROLL = M == 1 ? 4 : 2;
    const uint32_t warp = threadIdx.x / 32, q = threadIdx.x % 4;
    const uint32_t steps = cols / STEP;
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
            // Steps past the end re-read the last step (in bounds, no branch between the loads); never used.
            const uint32_t step = min(base + u * WARPS, steps - 1);
            const uint32_t group = step * STEP / group_size;
#pragma unroll
            for (int m = 0; m < M; ++m) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    c[u][m][r] = load_stream_16(codes[m][r] + (size_t)step * (STEP / 2) + 16 * q);
                    prm[u][m][r] = __ldg(reinterpret_cast<const float2*>(params[m][r]) + group);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const uint32_t step = base + u * WARPS;
            if (step < steps) {
                const uint32_t col = step * STEP + 32 * q;
                uint4 xs[NT][4];
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                    for (int w = 0; w < 4; ++w) xs[nt][w] = load_shared_16(x[nt] + col + 8 * w);
                }
#pragma unroll
                for (int m = 0; m < M; ++m) step_products<NT>(c[u][m], prm[u][m], xs, acc[m]);
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

}  // namespace qmma
}  // namespace mx
