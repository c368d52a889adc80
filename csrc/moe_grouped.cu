// moe_grouped.cu: the expert MLP for prefill, as two grouped tensor-core GEMMs over the slots the router
// grouped by expert (slot s = t * top_k + j; the router's expert_offsets / sorted_slots), SwiGLU fused.
// Same buffers and results as moe_gemv.cu:
//
//   x     [tokens, hidden] bf16                normalised hidden states
//   w1,w3 [experts, inter, hidden] bf16        row-major [out, in] per expert
//   w2    [experts, hidden, inter] bf16
//   act   [tokens * top_k, inter] bf16         moe_grouped_up:   act[s] = silu(w1[e] x[t]) * (w3[e] x[t])
//   out   [tokens * top_k, hidden] f32         moe_grouped_down: out[s] = topk_weights[s] * (w2[e] act[s])
//
// Ran on an H100 (2026-11-28, benches/RESULTS.md): tests/gpu_kernels/moe_grouped.rs passes against
// the CPU reference; Mixtral's prefill experts ran at 136 TFLOP/s (512 tokens) and 181 TFLOP/s
// (4096 tokens), far under the card's ~800. Not yet checked: sm_80, compute-sanitizer racecheck.
//
// Tiles: one block of MOE_GROUPED_THREADS = 128 threads (4 warps, 2 x 2) computes a tile of
// BM = 64 slots of ONE expert against two BN = 64-row weight tiles, K in steps of BK = 32 through two
// shared-memory stages filled with cp.async (16-byte copies, zero-filled outside the matrices). Each
// warp owns 32 x 32 outputs of each weight tile: per 16-wide k step it loads 2 A fragments and
// 2 x 2 B fragments with ldmatrix.x4 and issues 16 mma.sync.m16n8k16 (bf16 in, f32 accumulate).
//   moe_grouped_up:   A = the x rows of the tile's tokens (gathered through sorted_slots), the two
//                     weight tiles are the same 64 rows of w1[e] and w3[e], so the epilogue has gate
//                     and up of one output side by side and writes silu(gate) * up as bf16.
//   moe_grouped_down: A = the act rows of the tile's slots, the two weight tiles are adjacent 64-row
//                     halves of w2[e] (128 output columns), the epilogue scales by topk_weights[s].
// Shared rows are padded to BK + 8 elements (80 bytes) so the 8 row addresses of one ldmatrix phase
// fall in 8 different 16-byte bank groups. K need not be a multiple of BK (only of 8: copies are whole
// 16-byte chunks), rows past an expert's slots and columns past N are zero-filled and never stored.
//
// Grid: x = the flattened tile list, y = output column blocks (up: ceil(inter / 64), down:
// ceil(hidden / 128)). The per-expert counts live in device memory, so the host sizes x for the worst
// case: sum_e ceil(count_e / 64) <= floor((slots + min(experts, slots) * 63) / 64). Each block walks
// the experts' offsets to find its (expert, first slot); blocks past the last real tile exit at once
// (before any barrier). The x index varies fastest, so the m-tiles of one expert for one column block
// run next to each other and share the weight tile through L2.
// Mixtral prefill (hidden 4096, inter 14336, 8 experts, top-2), with balanced routing (estimates):
//   512 tokens:  1024 slots, 16 real m-tiles, grid x = 23 (7 may exit at once);
//                up 23 x 224 = 5152 blocks (>= 3584 working), down 23 x 32 = 736 blocks.
//   4096 tokens: 8192 slots, 128 real m-tiles, grid x = 135 (7 may exit at once);
//                up 135 x 224 = 30240 blocks (>= 28672 working), down 135 x 32 = 4320 blocks.
// An exiting block reads at most experts + 1 offsets, so the worst-case grid costs a few percent of
// blocks, not a second pass; a per-expert worst-case grid (experts * ceil(slots / 64)) would launch
// about 7.6x the working blocks at 4096 tokens (8 x 128 = 1024 against 135).
//
// Device-side indices are not trusted: offsets are clamped to [0, slots] and made non-decreasing per
// expert, slots outside [0, tokens * top_k) are skipped. hidden and inter are multiples of 8, every
// bf16 buffer and `out` are 16-byte aligned (checked by the Rust launcher, src/cuda/ops/moe_grouped.rs).
// No fast math: expf in silu stays accurate (it is in the epilogue only).
#include "moe_tiles.cuh"

namespace {

constexpr int THREADS = (int)MOE_GROUPED_THREADS;
constexpr int BM = (int)MOE_GROUPED_BM;
constexpr int BN = (int)MOE_GROUPED_BN;
constexpr int BK = (int)MOE_GROUPED_BK;
constexpr int NB = 2;                       // weight tiles per block (w1 and w3, or two halves of w2)
constexpr int LDS = BK + 8;                 // shared row stride in elements (80 bytes)
constexpr int CHUNKS = BK / 8;              // 16-byte chunks per tile row
constexpr int ROWS_PER_PASS = THREADS / CHUNKS;
constexpr int LOADS = BM / ROWS_PER_PASS;   // chunks of one tile each thread copies per stage
constexpr int WARP_M = 32;
constexpr int WARP_N = 32;
constexpr int MI = WARP_M / 16;             // m16 fragments per warp
constexpr int NI = WARP_N / 8;              // n8 fragments per warp and weight tile
static_assert(THREADS == 128 && BM == 2 * WARP_M && BN == 2 * WARP_N, "4 warps, 2 x 2 over a BM x BN tile");
static_assert(BM == BN, "A and weight tiles share the copy mapping");
static_assert(BK % 16 == 0 && THREADS % CHUNKS == 0 && BM % ROWS_PER_PASS == 0, "whole copies and k steps");
static_assert((LDS * 2) % 16 == 0, "16-byte aligned shared rows");

struct Stage {
    mx_bf16 a[BM][LDS];
    mx_bf16 b[NB][BN][LDS];
};

struct Smem {
    Stage stage[2];
    int32_t slot[BM];  // the tile's slots, -1 for rows past the expert's slots
};

// One BK stage of the block's products: acc[m] += A[wm.., k] * B[m][wn.., k]^T over the stage.
__device__ __forceinline__ void compute_stage(const Stage& st, int wm, int wn, int lane,
                                              float (&acc)[NB][MI][NI][4]) {
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
        uint32_t a[MI][4];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
            // matrices: rows 0-7 / 8-15 at k 0-7, then rows 0-7 / 8-15 at k 8-15 = a0, a1, a2, a3
            mx::ldmatrix_x4(a[mi], mx::shared_address(&st.a[wm + mi * 16 + lane % 16][kk + (lane / 16) * 8]));
        }
#pragma unroll
        for (int m = 0; m < NB; ++m) {
#pragma unroll
            for (int nj = 0; nj < NI / 2; ++nj) {
                // matrices: n 0-7 at k 0-7, n 0-7 at k 8-15, n 8-15 at k 0-7, n 8-15 at k 8-15
                // = (b0, b1) of n8 fragment 2 nj, then (b0, b1) of fragment 2 nj + 1
                uint32_t b[4];
                const uint32_t n = wn + nj * 16 + (lane / 16) * 8 + lane % 8;
                mx::ldmatrix_x4(b, mx::shared_address(&st.b[m][n][kk + ((lane / 8) % 2) * 8]));
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) {
                    mx::mma_bf16_16816(acc[m][mi][2 * nj], a[mi], b[0], b[1]);
                    mx::mma_bf16_16816(acc[m][mi][2 * nj + 1], a[mi], b[2], b[3]);
                }
            }
        }
    }
}

// UP: act = silu(A w1^T) * (A w3^T) with A = x rows of the tile's tokens, K = hidden, N = inter.
// !UP: out = topk_weights * (A w2^T) with A = act rows of the tile's slots, K = inter, N = hidden.
template <bool UP>
__device__ __forceinline__ void grouped_body(const MoeParams& p) {
    __shared__ __align__(16) Smem smem;
    uint32_t expert;
    int32_t begin, end;
    if (!mx::find_moe_tile<BM>(p, expert, begin, end)) return;  // the same for every thread: no barrier is skipped
    const uint32_t slots = p.tokens * p.top_k;
    const uint32_t K = UP ? p.hidden : p.inter;
    const uint32_t N = UP ? p.inter : p.hidden;
    const uint32_t n0 = blockIdx.y * (UP ? BN : NB * BN);  // first output column of the block
    const int tid = threadIdx.x;

    if (tid < BM) {
        int32_t slot = -1;
        if (tid < end - begin) {
            const int32_t s = p.sorted_slots[begin + tid];
            if (s >= 0 && (uint32_t)s < slots) slot = s;
        }
        smem.slot[tid] = slot;
    }
    __syncthreads();

    // This thread copies chunk tid % CHUNKS of tile rows tid / CHUNKS + i * ROWS_PER_PASS.
    const uint32_t chunk_k = (uint32_t)(tid % CHUNKS) * 8;
    const mx_bf16* a_row[LOADS];
    const mx_bf16* b_row[NB][LOADS];
#pragma unroll
    for (int i = 0; i < LOADS; ++i) {
        const int row = tid / CHUNKS + i * ROWS_PER_PASS;
        const int32_t slot = smem.slot[row];
        if (slot < 0) {
            a_row[i] = nullptr;
        } else if (UP) {
            a_row[i] = p.x + (size_t)((uint32_t)slot / p.top_k) * p.hidden;
        } else {
            a_row[i] = p.act + (size_t)slot * p.inter;
        }
#pragma unroll
        for (int m = 0; m < NB; ++m) {
            const uint32_t n = UP ? n0 + row : n0 + m * BN + row;
            const mx_bf16* w = UP ? (m == 0 ? p.w1 : p.w3) : p.w2;
            b_row[m][i] = n < N ? w + ((size_t)expert * N + n) * K : nullptr;
        }
    }

    // Copies the k range [k0, k0 + BK) of A and both weight tiles into stage s (zeros outside).
    auto load_stage = [&](int s, uint32_t k0) {
        const uint32_t k = k0 + chunk_k;
        const bool in_k = k < K;
#pragma unroll
        for (int i = 0; i < LOADS; ++i) {
            const int row = tid / CHUNKS + i * ROWS_PER_PASS;
            const bool a_ok = in_k && a_row[i] != nullptr;
            mx::cp_async_16(mx::shared_address(&smem.stage[s].a[row][chunk_k]), a_ok ? a_row[i] + k : p.x, a_ok);
#pragma unroll
            for (int m = 0; m < NB; ++m) {
                const bool b_ok = in_k && b_row[m][i] != nullptr;
                mx::cp_async_16(mx::shared_address(&smem.stage[s].b[m][row][chunk_k]), b_ok ? b_row[m][i] + k : p.x, b_ok);
            }
        }
    };

    const int warp = tid / 32;
    const int lane = tid % 32;
    const int wm = (warp / 2) * WARP_M;
    const int wn = (warp % 2) * WARP_N;
    float acc[NB][MI][NI][4];
#pragma unroll
    for (int m = 0; m < NB; ++m) {
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) {
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[m][mi][ni][c] = 0.0f;
            }
        }
    }

    // Two stages: while stage kt % 2 is multiplied, stage (kt + 1) % 2 is being filled. The barrier at
    // the end of an iteration keeps the next iteration's copies off the stage still being read.
    const uint32_t k_tiles = (K + BK - 1) / BK;
    load_stage(0, 0);
    mx::cp_async_commit();
    for (uint32_t kt = 0; kt < k_tiles; ++kt) {
        if (kt + 1 < k_tiles) load_stage((int)((kt + 1) % 2), (kt + 1) * BK);
        mx::cp_async_commit();  // possibly empty: keeps one group per iteration
        mx::cp_async_wait<1>();  // this thread's copies of stage kt have landed
        __syncthreads();  // ... and everyone else's
        compute_stage(smem.stage[kt % 2], wm, wn, lane, acc);
        __syncthreads();
    }

    // Epilogue. Accumulator c of fragment (mi, ni): row gid + 8 * (c / 2), column 2 * tig + c % 2.
    const int gid = lane / 4;
    const int tig = lane % 4;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int32_t slot = smem.slot[wm + mi * 16 + gid + 8 * h];
            if (slot < 0) continue;
            const float weight = UP ? 1.0f : p.topk_weights[slot];
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) {
                const uint32_t c = (uint32_t)(wn + ni * 8 + 2 * tig);  // even; N % 8 == 0, so c < N => c + 1 < N
                if (UP) {
                    const uint32_t col = n0 + c;
                    if (col < N) {
                        const float g0 = acc[0][mi][ni][2 * h];
                        const float g1 = acc[0][mi][ni][2 * h + 1];
                        const float v0 = g0 / (1.0f + expf(-g0)) * acc[1][mi][ni][2 * h];
                        const float v1 = g1 / (1.0f + expf(-g1)) * acc[1][mi][ni][2 * h + 1];
                        *reinterpret_cast<__nv_bfloat162*>(p.act + (size_t)slot * p.inter + col) =
                            __floats2bfloat162_rn(v0, v1);
                    }
                } else {
#pragma unroll
                    for (int m = 0; m < NB; ++m) {
                        const uint32_t col = n0 + m * BN + c;
                        if (col < N) {
                            *reinterpret_cast<float2*>(p.out + (size_t)slot * p.hidden + col) =
                                make_float2(weight * acc[m][mi][ni][2 * h], weight * acc[m][mi][ni][2 * h + 1]);
                        }
                    }
                }
            }
        }
    }
}

}  // namespace

#define MX_DEFINE(symbol)                              \
    MX_ENTRY(symbol, (MOE_GROUPED_THREADS), MoeParams, \
        grouped_body<true>(p))
MIXTRAL_MOE_GROUPED_UP_VARIANTS(MX_DEFINE)
#undef MX_DEFINE

#define MX_DEFINE(symbol)                              \
    MX_ENTRY(symbol, (MOE_GROUPED_THREADS), MoeParams, \
        grouped_body<false>(p))
MIXTRAL_MOE_GROUPED_DOWN_VARIANTS(MX_DEFINE)
#undef MX_DEFINE
