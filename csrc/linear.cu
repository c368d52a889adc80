// linear.cu: the dense projection of the attention block and the LM head (QKV, O, logits).
//
//   x   [tokens, in_features] bf16         input rows
//   w   [out_features, in_features] bf16   row-major [out, in], as stored in checkpoints
//   out [tokens, out_features]             bf16 (OUT_F32 = 0) or f32 (OUT_F32 = 1)
//
//   out[t, o] = sum_i x[t, i] * w[o, i], products and sums in f32, rounded once at the store.
//
// in_features is a positive multiple of 8 and x, w start on 16-byte boundaries (checked by the Rust
// launcher), so every row of x and w is a whole number of 16-byte chunks; any tokens and
// out_features work (edges are bounds-checked; a partial K tile is zero-filled).
//
// Two kernels, chosen by the launcher from the token count (LINEAR_GEMV_MAX_TOKENS):
//
// linear_gemv_t{TILE}_{bf16,f32}: decode. Bandwidth-bound: each warp owns LINEAR_GEMV_ROWS_PER_WARP
//   weight rows; a step is LINEAR_GEMV_UNROLL 16-byte streaming loads (LDG.E.NA.128) per row and
//   lane, and the loads of step s + 1 are issued before the math of step s (register double
//   buffer), so 2 * UNROLL * ROWS_PER_WARP * 16 bytes per lane can be in flight. Columns past the
//   last whole step (in_features not a multiple of 32 * 8 * UNROLL) are done one chunk at a time.
//   The weight rows are read once per TILE tokens (the kernel loops over tiles; the launcher picks
//   the smallest TILE covering the batch). The x rows are shared by all warps through L1.
//   Warp-shuffle reduction, then one lane per (token, row) stores.
//   Grid: (ceil(out_features / (LINEAR_GEMV_WARPS * LINEAR_GEMV_ROWS_PER_WARP))), LINEAR_GEMV_WARPS * 32
//   threads, no shared memory.
//
// linear_mma_{bf16,f32}: prefill. Tensor cores through mma.sync.m16n8k16 (bf16 in, f32 accumulate;
//   sm_80 and later). A block computes a LINEAR_MMA_BM x LINEAR_MMA_BN tile of out (tokens x
//   out_features) with 8 warps as 2 x 4, each warp 64 x 32 (4 x 4 mma tiles). K advances
//   LINEAR_MMA_BK at a time through three shared-memory stages filled by cp.async (16 bytes per
//   copy; rows/columns past the edge are zero-filled by a zero source size): two K tiles are in
//   flight while the third is read with ldmatrix. The 16-byte chunks of each 64-byte shared row are
//   XOR-swizzled by the row (`swizzle`), so ldmatrix reads and cp.async writes are free of bank
//   conflicts without padding. Grid: (ceil(out_features / BN), ceil(tokens / BM)),
//   LINEAR_MMA_THREADS threads, 48 KiB static shared memory.
//
// No fast math: there is no transcendental here; the accumulation order is the only difference
// from the CPU reference.
//
// Ran on an H100 (2026-11-28, benches/RESULTS.md): tests/gpu_kernels/linear.rs passes against the
// CPU reference. Not yet run on sm_80. It compiles for sm_80 / sm_90a and its SASS was inspected
// (csrc/README.md). The fragment layouts follow the PTX ISA description of mma.m16n8k16
// and ldmatrix; the block/warp/lane index math, the swizzle and the K-tile pipeline order were
// replayed once in a scalar model built on that description (exact on integer inputs, each output
// written once, no bank conflicts), which checks the composition, not the hardware.
#include "quant_mma.cuh"

namespace {

// ---------------------------------------------------------------------------------------------
// GEMV (decode)

constexpr uint32_t GEMV_STEP = 32 * 8;  // bf16 elements a warp covers with one 16-byte load per lane

template <int OUT_F32>
__device__ __forceinline__ void store_out(const LinearParams& p, uint32_t t, uint32_t o, float v) {
    const size_t index = (size_t)t * p.out_features + o;
    if constexpr (OUT_F32 != 0) {
        static_cast<float*>(p.out)[index] = v;
    } else {
        static_cast<mx_bf16*>(p.out)[index] = mx::to_bf16(v);
    }
}

// acc[r][j] += w chunk r . x chunk of token j, for the 8 elements at column c of each row.
template <int R, int TILE>
__device__ __forceinline__ void accumulate(const uint4 (&wv)[R], const mx_bf16* const (&a)[TILE], uint32_t c,
                                           float (&acc)[R][TILE]) {
#pragma unroll
    for (int j = 0; j < TILE; ++j) {
        const uint4 av = mx::load_shared_16(a[j] + c);
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r][j] = mx::dot8(wv[r], av, acc[r][j]);
    }
}

// The U chunks (GEMV_STEP apart, from column c) of each of the R weight rows: 16-byte streaming loads.
template <int R, int U>
__device__ __forceinline__ void load_step(const mx_bf16* const (&w)[R], uint32_t c, uint4 (&wv)[U][R]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int r = 0; r < R; ++r) wv[u][r] = mx::load_stream_16(w[r] + c + u * GEMV_STEP);
    }
}

template <int TILE, int OUT_F32>
__device__ void gemv_body(const LinearParams& p) {
    constexpr int R = LINEAR_GEMV_ROWS_PER_WARP;
    constexpr int U = LINEAR_GEMV_UNROLL;
    static_assert(R * TILE <= 32, "one lane per (token, row) output");
    const uint32_t lane = threadIdx.x % 32;
    const uint32_t row0 = (blockIdx.x * LINEAR_GEMV_WARPS + threadIdx.x / 32) * R;
    if (row0 >= p.out_features) return;  // no block-wide synchronisation follows
    const uint32_t k = p.in_features;
    // Rows past the end re-read the last row (in bounds); their results are never stored.
    const mx_bf16* w[R];
#pragma unroll
    for (int r = 0; r < R; ++r) w[r] = p.w + (size_t)min(row0 + r, p.out_features - 1) * k;

    for (uint32_t t0 = 0; t0 < p.tokens; t0 += TILE) {
        // Tokens past the end re-read the last token; their results are never stored.
        const mx_bf16* a[TILE];
#pragma unroll
        for (int j = 0; j < TILE; ++j) a[j] = p.x + (size_t)min(t0 + j, p.tokens - 1) * k;
        float acc[R][TILE];
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int j = 0; j < TILE; ++j) acc[r][j] = 0.0f;
        }
        // Whole steps of U chunks per row, software-pipelined: the U * R weight loads of the next step
        // are issued before the math of the current one, so they are in flight together with it.
        const uint32_t whole = k - k % (GEMV_STEP * U);  // columns covered by whole steps
        uint32_t base = 0;
        if (whole > 0) {
            uint4 wv[U][R];
            load_step<R, U>(w, lane * 8, wv);
            for (; base < whole; base += GEMV_STEP * U) {
                const uint32_t next = base + GEMV_STEP * U;
                uint4 wn[U][R];
                if (next < whole) load_step<R, U>(w, next + lane * 8, wn);
#pragma unroll
                for (int u = 0; u < U; ++u) accumulate<R, TILE>(wv[u], a, base + u * GEMV_STEP + lane * 8, acc);
                if (next < whole) {
#pragma unroll
                    for (int u = 0; u < U; ++u) {
#pragma unroll
                        for (int r = 0; r < R; ++r) wv[u][r] = wn[u][r];
                    }
                }
            }
        }
        // The rest (fewer than U chunks per lane): one chunk at a time.
        for (uint32_t c = base + lane * 8; c < k; c += GEMV_STEP) {
            uint4 wv[R];
#pragma unroll
            for (int r = 0; r < R; ++r) wv[r] = mx::load_stream_16(w[r] + c);
            accumulate<R, TILE>(wv, a, c, acc);
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int j = 0; j < TILE; ++j) acc[r][j] = mx::group_sum(acc[r][j]);
        }
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

// ---------------------------------------------------------------------------------------------
// Tensor-core GEMM (prefill)

constexpr int BM = LINEAR_MMA_BM;
constexpr int BN = LINEAR_MMA_BN;
constexpr int BK = LINEAR_MMA_BK;
constexpr int THREADS = LINEAR_MMA_THREADS;
constexpr int STAGES = 3;
constexpr int CHUNKS = BK / 8;       // 16-byte chunks per shared row (4: a 64-byte row)
constexpr int WARP_M = 64;           // tokens per warp tile
constexpr int WARP_N = 32;           // output features per warp tile
constexpr int MI = WARP_M / 16;      // m16 tiles per warp
constexpr int NI = WARP_N / 8;       // n8 tiles per warp
constexpr int WARPS_N = BN / WARP_N;  // warps along the output features
static_assert(BK == 32, "the swizzle below is for 64-byte rows (4 chunks)");
static_assert((BM / WARP_M) * WARPS_N * 32 == THREADS, "the warps tile the block tile exactly");
static_assert((BM * CHUNKS) % THREADS == 0 && (BN * CHUNKS) % THREADS == 0, "whole copy rounds");
static_assert(NI % 2 == 0, "B fragments are loaded two n8 tiles at a time");

struct MmaShared {
    mx_bf16 a[STAGES][BM][BK];  // x tile: [token][k], chunks swizzled
    mx_bf16 b[STAGES][BN][BK];  // w tile: [out feature][k], chunks swizzled
};
static_assert(sizeof(MmaShared) <= 48 * 1024, "static shared memory limit");

// Column where the 16-byte chunk holding logical column `col` (a multiple of 8) of shared row `row`
// is stored: chunk c of row r goes to chunk c ^ ((r / 2) % 4). The 8 rows r0..r0 + 7 (r0 a multiple
// of 8) an ldmatrix phase reads at one logical chunk then cover the 8 16-byte bank groups once
// ((r % 2) * 4 + (c ^ (r / 2) % 4) takes 8 distinct values), and so do the 2 rows x 4 chunks of
// each quarter-warp's cp.async writes.
__device__ __forceinline__ uint32_t swizzle(uint32_t row, uint32_t col) {
    return ((col / 8) ^ ((row / 2) % 4)) * 8;
}

// Starts the copies of K tile [k0, k0 + BK) of the block's x rows [m0, m0 + BM) and w rows
// [n0, n0 + BN) into `stage`. Rows past tokens / out_features and chunks past in_features are zeros.
__device__ __forceinline__ void load_stage(const LinearParams& p, MmaShared& s, int stage, uint32_t m0,
                                           uint32_t n0, uint32_t k0) {
#pragma unroll
    for (int q = 0; q < BM * CHUNKS / THREADS; ++q) {
        const uint32_t i = threadIdx.x + q * THREADS;
        const uint32_t row = i / CHUNKS;
        const uint32_t col = (i % CHUNKS) * 8;
        const uint32_t t = m0 + row;
        const bool valid = t < p.tokens && k0 + col < p.in_features;
        const mx_bf16* src = valid ? p.x + (size_t)t * p.in_features + k0 + col : p.x;
        mx::cp_async_16(mx::shared_address(&s.a[stage][row][swizzle(row, col)]), src, valid);
    }
#pragma unroll
    for (int q = 0; q < BN * CHUNKS / THREADS; ++q) {
        const uint32_t i = threadIdx.x + q * THREADS;
        const uint32_t row = i / CHUNKS;
        const uint32_t col = (i % CHUNKS) * 8;
        const uint32_t o = n0 + row;
        const bool valid = o < p.out_features && k0 + col < p.in_features;
        const mx_bf16* src = valid ? p.w + (size_t)o * p.in_features + k0 + col : p.w;
        mx::cp_async_16(mx::shared_address(&s.b[stage][row][swizzle(row, col)]), src, valid);
    }
}

// acc += the warp's 64 x 32 tile of (x tile) * (w tile)^T over the BK columns of `stage`.
__device__ __forceinline__ void compute_stage(const MmaShared& s, int stage, uint32_t warp_m, uint32_t warp_n,
                                              float (&acc)[MI][NI][4]) {
    const uint32_t lane = threadIdx.x % 32;
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
        // A fragments (m16 x k16): matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15),
        // (rows 8-15, k 8-15) = registers a0..a3 of mma.m16n8k16.
        uint32_t af[MI][4];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
            const uint32_t row = warp_m + mi * 16 + lane % 16;
            const uint32_t col = ks * 16 + (lane / 16) * 8;
            mx::ldmatrix_x4(af[mi], mx::shared_address(&s.a[stage][row][swizzle(row, col)]));
        }
        // B fragments (k16 x n8, w rows are the n index): matrices (n 0-7, k 0-7), (n 0-7, k 8-15),
        // (n 8-15, k 0-7), (n 8-15, k 8-15) = b0, b1 of n8 tile 2np and b0, b1 of tile 2np + 1.
        uint32_t bfrag[NI][2];
#pragma unroll
        for (int np = 0; np < NI / 2; ++np) {
            const uint32_t n = warp_n + np * 16 + lane % 8 + (lane / 16) * 8;
            const uint32_t col = ks * 16 + ((lane / 8) % 2) * 8;
            uint32_t r[4];
            mx::ldmatrix_x4(r, mx::shared_address(&s.b[stage][n][swizzle(n, col)]));
            bfrag[2 * np][0] = r[0];
            bfrag[2 * np][1] = r[1];
            bfrag[2 * np + 1][0] = r[2];
            bfrag[2 * np + 1][1] = r[3];
        }
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) mx::mma_bf16_16816(acc[mi][ni], af[mi], bfrag[ni][0], bfrag[ni][1]);
        }
    }
}

template <int OUT_F32>
__device__ void mma_body(const LinearParams& p) {
    __shared__ __align__(16) MmaShared s;
    const uint32_t m0 = blockIdx.y * BM;
    const uint32_t n0 = blockIdx.x * BN;
    const uint32_t warp = threadIdx.x / 32;
    const uint32_t lane = threadIdx.x % 32;
    const uint32_t warp_m = (warp / WARPS_N) * WARP_M;
    const uint32_t warp_n = (warp % WARPS_N) * WARP_N;

    float acc[MI][NI][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) {
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;
        }
    }

    // Pipeline: tile kt lives in stage kt % STAGES. Before computing tile kt, every thread waits for
    // its own copies of tile kt and the barrier makes all of them visible; the same barrier proves
    // every warp has finished computing tile kt - 1, whose stage the copies of tile kt + STAGES - 1
    // (issued right after it) overwrite. One commit per prologue step and per iteration (possibly
    // empty) keeps "tile kt = group kt" so that wait_group<STAGES - 2> leaves only later tiles pending.
    const uint32_t k_tiles = (p.in_features + BK - 1) / BK;
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
        if ((uint32_t)st < k_tiles) load_stage(p, s, st, m0, n0, st * BK);
        mx::cp_async_commit();
    }
    for (uint32_t kt = 0; kt < k_tiles; ++kt) {
        mx::cp_async_wait<STAGES - 2>();
        __syncthreads();
        const uint32_t next = kt + STAGES - 1;
        if (next < k_tiles) load_stage(p, s, next % STAGES, m0, n0, next * BK);
        mx::cp_async_commit();
        compute_stage(s, kt % STAGES, warp_m, warp_n, acc);
    }
    mx::cp_async_wait<0>();  // nothing is pending here (the last groups are empty); kept for clarity

    // Accumulator layout of mma.m16n8k16: c0, c1 at (row lane / 4, columns 2 (lane % 4), +1);
    // c2, c3 at row lane / 4 + 8.
    const uint32_t g = lane / 4;
    const uint32_t tq = lane % 4;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const uint32_t t = m0 + warp_m + mi * 16 + g + h * 8;
                const uint32_t o = n0 + warp_n + ni * 8 + 2 * tq;
                if (t < p.tokens) {
                    if (o < p.out_features) store_out<OUT_F32>(p, t, o, acc[mi][ni][2 * h]);
                    if (o + 1 < p.out_features) store_out<OUT_F32>(p, t, o + 1, acc[mi][ni][2 * h + 1]);
                }
            }
        }
    }
}

}  // namespace

#define MX_DEFINE(symbol, TILE, OUT_F32)                     \
    MX_ENTRY(symbol, (LINEAR_GEMV_WARPS * 32), LinearParams, \
        gemv_body<TILE, OUT_F32>(p))
MIXTRAL_LINEAR_GEMV_VARIANTS(MX_DEFINE)
#undef MX_DEFINE

#define MX_DEFINE(symbol, OUT_F32)                          \
    MX_ENTRY(symbol, (LINEAR_MMA_THREADS, 2), LinearParams, \
        mma_body<OUT_F32>(p))
MIXTRAL_LINEAR_MMA_VARIANTS(MX_DEFINE)
#undef MX_DEFINE

// linear_mma_decode: a decode batch of up to 16 tokens on the tensor cores (quant_mma.cuh, bf16 weights
// as stored): every weight row read once for the whole batch.
#define MX_DEFINE(symbol, NT, OUT_F32)                                                                             \
    MX_ENTRY(symbol, (QMMA_WARPS * 32, 1), LinearParams,                                                           \
        mx::qmma::dense<QMMA_KIND_BF16, NT, OUT_F32>(p, 0, [&](uint32_t row) {                                     \
            return mx::qmma::RowPtr{reinterpret_cast<const uint8_t*>(p.w + (size_t)row * p.in_features), nullptr}; \
        }))
MIXTRAL_LINEAR_MMA_DECODE_VARIANTS(MX_DEFINE)
#undef MX_DEFINE
