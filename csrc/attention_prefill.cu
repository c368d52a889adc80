// attention_prefill.cu: causal flash attention (FlashAttention-2 style, bf16 tensor cores) of one
// sequence's prefill queries over the paged KV cache, GQA, optional sliding window.
//
//   q            [tokens, n_heads, head_dim] bf16 (row stride q_stride), already rotated
//   k_cache,
//   v_cache      [num_blocks, block_size, n_kv_heads, head_dim] bf16 (this step's keys already written)
//   block_tables [num_seqs, max_blocks_per_seq] i32; the sequence uses row seq_row
//   out          [tokens, n_heads, head_dim] bf16, contiguous
//
// Query token t sits at position p = start_pos + t and sees keys j with first_visible(p) <= j <= p,
// first_visible(p) = max(0, p + 1 - window) (window 0: 0); query head h reads KV head h / G,
// G = n_heads / n_kv_heads. Scores are (q . k) * scale with the softmax in f32 (computed as exp2 of
// log2e-scaled scores: the same function). A key whose block-table entry is outside [0, num_blocks)
// is skipped (never read); a query with no key left gets zeros.
//
// Rows: the G query heads of one KV head share its keys and values, so a block owns ROWS = 128
// consecutive rows of that KV head's [tokens * G] query rows, row f being token f / G and query head
// kvh * G + f % G (rows past tokens * G repeat the last row and are never stored). Warp w of the 8
// owns rows w * 16 .. w * 16 + 15, one m16 MMA tile. Grid (ceil(tokens * G / ROWS), n_kv_heads),
// ATTENTION_PREFILL_THREADS = 256 threads; tiles are taken in reverse order of blockIdx.x so that the
// longest (last) query tiles start first.
//
// The block walks the keys first_visible(its first token) ..= its last token's position in tiles of
// KEYS = 32, double-buffered:
//   1. copies (cp.async, 16 bytes each) of the next tile's K and V rows into the other stage,
//      k_s[stage][key][d] and v_s[stage][key][d] as cached (no transpose); lane l of every warp
//      resolves key l's cache slot through the block table; a key with no slot (or past the block's
//      last position) is zero-filled and marked in absent_s[stage] (one bit per key);
//   2. each warp whose rows can see some key of the current tile computes S = Q K^T with
//      mma.m16n8k16 (bf16 in, f32 accumulate; K B-fragments by ldmatrix.x4), masks (causal, window,
//      absent keys: one 32-bit visibility word per row) only where the tile is not wholly visible
//      to all 16 rows, updates its running row
//      max / sum (online softmax in f32 registers), rescales its f32 output accumulator and adds P V
//      (P rounded to bf16 for the MMA, as FlashAttention does; V B-fragments by ldmatrix.x4.trans);
//   3. a barrier before the stage is refilled.
// Q is held in registers as MMA A-fragments for the whole kernel (read once with scalar loads, so q
// needs no alignment).
// Shared memory (static, below 48 KiB for every HEAD_DIM): 2 stages of K and V tiles, KEYS x
// (HEAD_DIM + PAD) bf16 each. With PAD = 8 a row is 16 bytes past a multiple of 128 bytes, so the 8 row
// addresses of an ldmatrix phase and the 8 16-byte copies of a quarter warp (consecutive keys) fall in
// distinct bank groups, and every row starts on a 16-byte boundary.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 .bf16): lane = 4 * g + c (g = lane / 4, c = lane % 4);
// A (16x16, row): regs {A[g][2c..2c+1], A[g+8][2c..], A[g][2c+8..], A[g+8][2c+8..]};
// B (16x8, col): regs {B[2c..2c+1][g], B[2c+8..2c+9][g]}; C/D (16x8): {C[g][2c], C[g][2c+1],
// C[g+8][2c], C[g+8][2c+1]}. The lower index of a pair is the low half of the 32-bit register.
// For S, B[k][n] = K[key n][dim k]: ldmatrix (no transpose) of 8 keys x 8 dimensions gives lane l
// K[key l / 4][dims 2c, 2c + 1]. For P V, B[k][n] = V[key k][dim n]: ldmatrix.trans of 8 keys x 8
// dimensions gives V[keys 2c, 2c + 1][dim l / 4].
//
// Template constant: HEAD_DIM in {16, 32, 64, 128}. Needs sm_80+ (mma.sync bf16, cp.async, ldmatrix).
// No fast math.
//
// Not run on a GPU in this form (the earlier one, one query head per block and no double buffering,
// passed tests/gpu_kernels/attention_prefill.rs on an H100 on 2026-11-28). It compiles for sm_80
// and sm_90a and its SASS was read (csrc/README.md: HMMA, LDSM, LDGSTS, no local memory). Its
// fragment, copy, stage and mask logic was replayed lane by lane in a host model against a float64
// reference (csrc/README.md says what the model covered); that checks the composition, not the
// hardware.
#include "common.cuh"

namespace {

constexpr uint32_t THREADS = ATTENTION_PREFILL_THREADS;
constexpr uint32_t WARPS = THREADS / 32;
constexpr uint32_t ROWS = ATTENTION_PREFILL_ROWS;
constexpr uint32_t KEYS = ATTENTION_PREFILL_KEYS;
constexpr uint32_t PAD = ATTENTION_PREFILL_PAD;
static_assert(ROWS == WARPS * 16, "each warp owns one 16-row MMA tile of query rows");
static_assert(KEYS == 32, "lane l of every warp resolves key l of a tile; absent_s holds one bit per key");
static_assert(PAD % 8 == 0, "shared rows stay 16-byte aligned");

// Two f32 values rounded to bf16 (nearest even) as one register, `lo` in the low half.
__device__ __forceinline__ uint32_t pack_f32(float lo, float hi) {
    return mx::pack_bits(mx::to_bf16(lo), mx::to_bf16(hi));
}

// The first key position the query at `pos` sees (window 0: no window).
__device__ __forceinline__ uint32_t first_visible(uint32_t pos, uint32_t window) {
    return (window != 0 && pos + 1 > window) ? pos + 1 - window : 0;
}

// Max over the 4 lanes of a quad (the lanes holding one accumulator row).
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(mx::FULL_MASK, v, 1));
    return fmaxf(v, __shfl_xor_sync(mx::FULL_MASK, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(mx::FULL_MASK, v, 1);
    return v + __shfl_xor_sync(mx::FULL_MASK, v, 2);
}

// One query row of the block: its token, query head and the keys it sees.
struct Row {
    uint32_t token, head, first, pos;
};

__device__ __forceinline__ Row row_at(const AttentionPrefillParams& p, uint32_t f, uint32_t last, uint32_t group,
                                      uint32_t kvh) {
    const uint32_t clamped = min(f, last);
    const uint32_t token = clamped / group;
    const uint32_t pos = p.start_pos + token;
    return Row{token, kvh * group + clamped % group, first_visible(pos, p.window), pos};
}

// Bit j set: key k0 + j of a KEYS-key tile is in the row's range first ..= pos.
__device__ __forceinline__ uint32_t visible_keys(const Row& r, uint32_t k0) {
    const int lo = max((int)r.first - (int)k0, 0);
    const int hi = min((int)r.pos - (int)k0, (int)KEYS - 1);
    return hi < lo ? 0u : (0xffffffffu >> (KEYS - 1 - hi)) & (0xffffffffu << lo);
}

template <int D>
struct Tiles {
    uint16_t k[2][KEYS][D + PAD];
    uint16_t v[2][KEYS][D + PAD];
    uint32_t absent[2];  // bit j: key j of the stage's tile has no cache slot (zero-filled)
};

// Starts the copies of the keys k0 .. k0 + KEYS - 1 (those past `key_last` are absent) into `stage`.
// Lane l handles key l; warp w the 16-byte parts w, w + WARPS, ... of its K and V rows.
template <int D>
__device__ __forceinline__ void load_tile(const AttentionPrefillParams& p, Tiles<D>& t, int stage, uint32_t k0,
                                          uint32_t key_last, const mx_bf16* k_head, const mx_bf16* v_head) {
    constexpr uint32_t CHUNKS = D / 8;  // 16-byte parts per key row
    const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t kp = k0 + lane;
    const long long slot = kp <= key_last ? mx::paged_slot(p.block_tables, (int32_t)p.seq_row, (int32_t)kp,
                                                           p.num_seqs, p.max_blocks_per_seq, p.block_size,
                                                           p.num_blocks)
                                          : -1;
    const bool present = slot >= 0;
    const uint32_t absent = __ballot_sync(mx::FULL_MASK, !present);
    if (threadIdx.x == 0) t.absent[stage] = absent;
    const size_t offset = present ? (size_t)slot * p.n_kv_heads * D : 0;
#pragma unroll
    for (uint32_t part = warp; part < CHUNKS; part += WARPS) {
        mx::cp_async_16(mx::shared_address(&t.k[stage][lane][part * 8]), k_head + offset + part * 8, present);
        mx::cp_async_16(mx::shared_address(&t.v[stage][lane][part * 8]), v_head + offset + part * 8, present);
    }
}

template <int D>
__device__ void attention_prefill_body(const AttentionPrefillParams& p) {
    static_assert(D % 16 == 0 && D >= 16, "head_dim is a multiple of the MMA k-step");
    constexpr int KSTEPS = D / 16;   // k-steps of Q K^T
    constexpr int DTILES = D / 8;    // n-tiles of the output
    constexpr int STILES = KEYS / 8; // n-tiles of the scores
    __shared__ __align__(16) Tiles<D> t;
    static_assert(sizeof(Tiles<D>) <= 48 * 1024, "static shared memory limit");

    // Uniform over the block: a block past the work (never launched by the host) does nothing.
    if (blockIdx.y >= p.n_kv_heads || p.n_kv_heads == 0 || p.tokens == 0) return;
    const uint32_t group = p.n_heads / p.n_kv_heads;
    const uint32_t rows = p.tokens * group;  // below 2^32 (checked on the host)
    const uint32_t tile = gridDim.x - 1 - blockIdx.x;
    if ((uint64_t)tile * ROWS >= rows) return;
    const uint32_t kvh = blockIdx.y;
    const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t g = lane / 4, c = lane % 4;

    // Rows f0 .. f0 + ROWS - 1 belong to this block; positions are below 2^31 (checked on the host).
    const uint32_t f0 = tile * ROWS, last = rows - 1;
    const Row block_first = row_at(p, f0, last, group, kvh);
    const uint32_t key_first = block_first.first;                   // first key any row sees
    const uint32_t key_last = row_at(p, f0 + ROWS - 1, last, group, kvh).pos;  // last key any row sees

    // This thread's two accumulator rows, and the warp's key range: its rows' positions grow with f.
    const Row r0 = row_at(p, f0 + warp * 16 + g, last, group, kvh);
    const Row r1 = row_at(p, f0 + warp * 16 + g + 8, last, group, kvh);
    const Row warp_first = row_at(p, f0 + warp * 16, last, group, kvh);
    const Row warp_last = row_at(p, f0 + warp * 16 + 15, last, group, kvh);

    // Q as A-fragments: qa[kk] covers dimensions kk*16 .. kk*16+15 of rows r0 / r1.
    uint32_t qa[KSTEPS][4];
    {
        const mx_bf16* q0 = p.q + (size_t)r0.token * p.q_stride + (size_t)r0.head * D;
        const mx_bf16* q1 = p.q + (size_t)r1.token * p.q_stride + (size_t)r1.head * D;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            const uint32_t col = kk * 16 + c * 2;
            qa[kk][0] = mx::pack_bits(q0[col], q0[col + 1]);
            qa[kk][1] = mx::pack_bits(q1[col], q1[col + 1]);
            qa[kk][2] = mx::pack_bits(q0[col + 8], q0[col + 9]);
            qa[kk][3] = mx::pack_bits(q1[col + 8], q1[col + 9]);
        }
    }

    float o[DTILES][4];
#pragma unroll
    for (int n = 0; n < DTILES; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY;  // running row max (log2 units)
    float l0 = 0.0f, l1 = 0.0f;            // this lane's part of the running row sum
    const float scale_log2 = p.scale * mx::LOG2E;
    const mx_bf16* k_head = p.k_cache + (size_t)kvh * D;
    const mx_bf16* v_head = p.v_cache + (size_t)kvh * D;

    // Pipeline: tile i lives in stage i % 2. Iteration i first starts the copies of tile i + 1 (its
    // stage was last read in iteration i - 1, which ended with a barrier), then waits for its own
    // copies of tile i (one commit per tile, possibly empty, so wait_group 1 leaves only tile i + 1
    // pending); the barrier makes every thread's copies and absent bits of tile i visible.
    const uint32_t n_tiles = (key_last - key_first) / KEYS + 1;
    load_tile<D>(p, t, 0, key_first, key_last, k_head, v_head);
    mx::cp_async_commit();
    for (uint32_t i = 0; i < n_tiles; ++i) {
        const int stage = i % 2;
        const uint32_t k0 = key_first + i * KEYS;
        if (i + 1 < n_tiles) load_tile<D>(p, t, stage ^ 1, k0 + KEYS, key_last, k_head, v_head);
        mx::cp_async_commit();
        mx::cp_async_wait<1>();
        __syncthreads();

        // Warp-uniform: a tile none of the warp's rows can see is skipped (its masked update is the
        // identity); one every row wholly sees needs no mask.
        const uint32_t absent = t.absent[stage];
        const bool seen = k0 <= warp_last.pos && k0 + (KEYS - 1) >= warp_first.first;
        const bool whole = absent == 0 && k0 >= warp_last.first && k0 + (KEYS - 1) <= warp_first.pos;
        if (seen) {
            // S = Q K^T for the warp's 16 rows and the tile's KEYS keys; one ldmatrix.x4 gives the
            // B-fragments of n-tiles 2 np and 2 np + 1 at k-step kk: matrices (keys +0..7, dims +0..7),
            // (keys +0..7, dims +8..15), (keys +8..15, dims +0..7), (keys +8..15, dims +8..15).
            float s[STILES][4];
#pragma unroll
            for (int j = 0; j < STILES; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KSTEPS; ++kk) {
#pragma unroll
                for (int np = 0; np < STILES / 2; ++np) {
                    const uint32_t key = np * 16 + lane % 8 + (lane / 16) * 8;
                    const uint32_t dim = kk * 16 + ((lane / 8) % 2) * 8;
                    uint32_t b[4];
                    mx::ldmatrix_x4(b, mx::shared_address(&t.k[stage][key][dim]));
                    mx::mma_bf16_16816(s[2 * np], qa[kk], b[0], b[1]);
                    mx::mma_bf16_16816(s[2 * np + 1], qa[kk], b[2], b[3]);
                }
            }

            // Scale (log2 units); mask (a key's bit clear in the row's visibility word) only a tile
            // some row does not wholly see; then the online softmax update of both rows.
#pragma unroll
            for (int j = 0; j < STILES; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) s[j][e] *= scale_log2;
            }
            if (!whole) {
                const uint32_t see0 = ~absent & visible_keys(r0, k0), see1 = ~absent & visible_keys(r1, k0);
#pragma unroll
                for (int j = 0; j < STILES; ++j) {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const uint32_t col = j * 8 + c * 2 + e;
                        if (((see0 >> col) & 1u) == 0) s[j][e] = -INFINITY;
                        if (((see1 >> col) & 1u) == 0) s[j][2 + e] = -INFINITY;
                    }
                }
            }
            float max0 = -INFINITY, max1 = -INFINITY;
#pragma unroll
            for (int j = 0; j < STILES; ++j) {
                max0 = fmaxf(max0, fmaxf(s[j][0], s[j][1]));
                max1 = fmaxf(max1, fmaxf(s[j][2], s[j][3]));
            }
            const float new0 = fmaxf(m0, quad_max(max0)), new1 = fmaxf(m1, quad_max(max1));
            // A row with no visible key so far keeps max -inf: its weights are exp2(-inf) = 0, nothing
            // rescales.
            const float alpha0 = new0 == -INFINITY ? 1.0f : exp2f(m0 - new0);
            const float alpha1 = new1 == -INFINITY ? 1.0f : exp2f(m1 - new1);
            const float base0 = new0 == -INFINITY ? 0.0f : new0;
            const float base1 = new1 == -INFINITY ? 0.0f : new1;
            m0 = new0;
            m1 = new1;
            l0 *= alpha0;
            l1 *= alpha1;
#pragma unroll
            for (int n = 0; n < DTILES; ++n) {
                o[n][0] *= alpha0;
                o[n][1] *= alpha0;
                o[n][2] *= alpha1;
                o[n][3] *= alpha1;
            }
#pragma unroll
            for (int j = 0; j < STILES; ++j) {
                s[j][0] = exp2f(s[j][0] - base0);
                s[j][1] = exp2f(s[j][1] - base0);
                s[j][2] = exp2f(s[j][2] - base1);
                s[j][3] = exp2f(s[j][3] - base1);
                l0 += s[j][0] + s[j][1];
                l1 += s[j][2] + s[j][3];
            }

            // O += P V: the score accumulators of keys kk*16 .. kk*16+15 are the A-fragment of step kk;
            // one ldmatrix.x4.trans gives the B-fragments of output n-tiles 2 np and 2 np + 1: matrices
            // (keys +0..7, dims 2np), (keys +8..15, dims 2np), (keys +0..7, dims 2np+1), (keys +8..15,
            // dims 2np+1), 8 dimensions each.
#pragma unroll
            for (int kk = 0; kk < KEYS / 16; ++kk) {
                const uint32_t pa[4] = {
                    pack_f32(s[2 * kk][0], s[2 * kk][1]),
                    pack_f32(s[2 * kk][2], s[2 * kk][3]),
                    pack_f32(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                    pack_f32(s[2 * kk + 1][2], s[2 * kk + 1][3]),
                };
#pragma unroll
                for (int np = 0; np < DTILES / 2; ++np) {
                    const uint32_t key = kk * 16 + ((lane / 8) % 2) * 8 + lane % 8;
                    const uint32_t dim = (np * 2 + lane / 16) * 8;
                    uint32_t b[4];
                    mx::ldmatrix_x4_trans(b, mx::shared_address(&t.v[stage][key][dim]));
                    mx::mma_bf16_16816(o[2 * np], pa, b[0], b[1]);
                    mx::mma_bf16_16816(o[2 * np + 1], pa, b[2], b[3]);
                }
            }
        }
        __syncthreads();  // every warp is done with this stage before iteration i + 1 refills it
    }

    // Normalise and store the rows that exist; a row that saw no key gets zeros.
    const float sum0 = quad_sum(l0), sum1 = quad_sum(l1);
    const float inv0 = sum0 > 0.0f ? 1.0f / sum0 : 0.0f;
    const float inv1 = sum1 > 0.0f ? 1.0f / sum1 : 0.0f;
    const uint32_t f_mine = f0 + warp * 16 + g;
    if (f_mine <= last) {
        mx_bf16* out = p.out + ((size_t)r0.token * p.n_heads + r0.head) * D;
#pragma unroll
        for (int n = 0; n < DTILES; ++n) {
            out[n * 8 + c * 2] = mx::to_bf16(o[n][0] * inv0);
            out[n * 8 + c * 2 + 1] = mx::to_bf16(o[n][1] * inv0);
        }
    }
    if (f_mine + 8 <= last) {
        mx_bf16* out = p.out + ((size_t)r1.token * p.n_heads + r1.head) * D;
#pragma unroll
        for (int n = 0; n < DTILES; ++n) {
            out[n * 8 + c * 2] = mx::to_bf16(o[n][2] * inv1);
            out[n * 8 + c * 2 + 1] = mx::to_bf16(o[n][3] * inv1);
        }
    }
}

}  // namespace

#define MX_DEFINE(symbol, HEAD_DIM)                                          \
    MX_ENTRY(symbol, (ATTENTION_PREFILL_THREADS, 1), AttentionPrefillParams, \
        attention_prefill_body<HEAD_DIM>(p))
MIXTRAL_ATTENTION_PREFILL_VARIANTS(MX_DEFINE)
#undef MX_DEFINE
