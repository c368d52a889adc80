// attention_decode.cu: split-KV flash-decoding over the paged KV cache, GQA, optional sliding window.
//
//   q        [tokens, n_heads, head_dim] bf16 (row stride q_stride), already rotated
//   k_cache,
//   v_cache  [num_blocks, block_size, n_kv_heads, head_dim] bf16
//   block_tables [num_seqs, max_blocks_per_seq] i32, token_seq [tokens] i32, positions [tokens] i32
//   part_out [tokens, n_heads, max_splits, head_dim] f32, part_lse [tokens, n_heads, max_splits] f32
//   out      [tokens, n_heads, head_dim] bf16
//
// Query token t at position p (sequence row token_seq[t]) sees keys j with max(0, p - W + 1) <= j <= p
// (W = window; W = 0: every j <= p), each read from its paged slot; query head h uses KV head
// h / GROUP. Scores are q.k * scale, softmax in f32 (exp2 of log2e-scaled scores: the same function).
//
// attention_decode, grid (max_splits, n_kv_heads, tokens), ATTENTION_THREADS threads: split s covers
// keys [first + s * K, first + (s + 1) * K) of the token's range, K = split_keys_of(its key count): with
// target_splits = 0, split_keys; else the count spread over target_splits splits, at least
// ATTENTION_MIN_SPLIT_KEYS and at most split_keys (computed on the device from the token's position, so
// a captured graph spreads every step's keys over the SMs as the context grows); one block serves
// all GROUP query heads of its KV head, so each K/V row is read once. The split's block-table entries
// are read into shared memory first (at most ATTENTION_MAX_SPLIT_KEYS), so a key's slot is a shared
// read away from its K/V load rather than a dependent global one. Each key row is read by
// HEAD_DIM / 8 lanes with one 16-byte load each, each lane looking up UNROLL keys' slots and issuing their
// loads before using any (the keys and the order of every sum are those of the plain loop). A split
// writes its normalised output and its log2-sum-exp; splits past the token's range exit at once.
// Dynamic shared memory: GROUP * split_keys floats (the scores; K <= split_keys).
//
// The merge, in the same launch: each split that ran takes a ticket from split_done[t, kv head] (an
// atomic add after a __threadfence that publishes its partial results); the one that draws the last
// ticket reads every split's results through L2 (ld.global.cg) and writes, for each query head of the
// group, out = sum_s 2^(lse_s - M) * part_out_s / sum_s 2^(lse_s - M) (M the largest lse_s), then sets
// the counter back to 0 for the next launch. A token with no valid key gets zeros (from split 0).
//
// Template constants: HEAD_DIM in {16, 32, 64, 128}, GROUP = n_heads / n_kv_heads in {1, 2, 4, 6, 8}.
// No fast math (exp2f / log2f accurate: the softmax is the accuracy-critical part).
#include "common.cuh"

namespace {

constexpr uint32_t WARPS = ATTENTION_THREADS / 32;
// Key rows each lane loads before using them (both passes on CUDA cores).
constexpr int UNROLL = 4;
// 8-key groups a warp loads before using any in scores_mma (a lane's D/32 16-byte loads each).
constexpr int MMA_UNROLL = 2;

// First key and number of keys query token t attends to; count = 0 when its row or position is invalid.
__device__ __forceinline__ void key_range(const AttentionDecodeParams& p, uint32_t t, int32_t& first,
                                          int32_t& count) {
    const int32_t pos = p.positions[t];
    const int32_t seq = p.token_seq[t];
    if (pos < 0 || seq < 0 || (uint32_t)seq >= p.num_seqs) {
        first = 0;
        count = 0;
        return;
    }
    const uint32_t seen = (uint32_t)pos + 1;  // keys 0..=pos
    first = (p.window != 0 && seen > p.window) ? (int32_t)(seen - p.window) : 0;
    count = pos - first + 1;
}

// The cache slots of the first position of each logical block one split's keys touch, in shared
// memory (entry i: block first_logical + i of the token's sequence, mx::paged_slot's value, -1 off the
// table), read once by the whole block, so that each key's slot is one shared read away from its K/V
// load instead of a dependent global one. A split covers at most ATTENTION_MAX_SPLIT_KEYS keys, so
// at most that many blocks.
struct SplitBlocks {
    const long long* entries;
    uint32_t first_logical;
    uint32_t block_size;

    // Cache slot of position `pos` (within the split), or -1: mx::paged_slot's value.
    __device__ __forceinline__ long long slot(int32_t pos) const {
        const long long start = entries[(uint32_t)pos / block_size - first_logical];
        return start < 0 ? -1 : start + (uint32_t)pos % block_size;
    }
};

// Fills `entries` (shared) for keys begin .. begin + nk - 1 of sequence row `seq`; the caller's next
// barrier makes them visible.
__device__ __forceinline__ SplitBlocks read_split_blocks(const AttentionDecodeParams& p, int32_t seq, int32_t begin,
                                                         int32_t nk, long long* entries) {
    const uint32_t first_logical = (uint32_t)begin / p.block_size;
    const uint32_t count = (uint32_t)(begin + nk - 1) / p.block_size - first_logical + 1;
    for (uint32_t i = threadIdx.x; i < count; i += ATTENTION_THREADS) {
        const int32_t block_start = (int32_t)((first_logical + i) * p.block_size);
        entries[i] = mx::paged_slot(p.block_tables, seq, block_start, p.num_seqs, p.max_blocks_per_seq,
                                    p.block_size, p.num_blocks);
    }
    return SplitBlocks{entries, first_logical, p.block_size};
}

// The cache slots of a lane's U keys first + u * stride (-1 past nk or off the block table) and
// their L consecutive 16-byte pieces at `offset` of `cache` (zeros for -1): every slot looked up,
// then every load issued, before the caller uses any.
template <int U, int L>
__device__ __forceinline__ void load_keys(const AttentionDecodeParams& p, const mx_bf16* cache,
                                          const SplitBlocks& blocks, int32_t begin, int32_t nk, int32_t first,
                                          int32_t stride, size_t offset, long long (&slot)[U], uint4 (&rows)[U][L]) {
    const size_t token_stride = (size_t)p.n_kv_heads * p.head_dim;  // elements per cached token
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int32_t kk = first + u * stride;
        slot[u] = kk < nk ? blocks.slot(begin + kk) : -1;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int i = 0; i < L; ++i) {
            rows[u][i] = slot[u] >= 0 ? mx::load_stream_16(cache + (size_t)slot[u] * token_stride + offset + 8 * i)
                                      : make_uint4(0, 0, 0, 0);
        }
    }
}

// Keys per split of a token with `count` keys (see the file comment); the merge uses the same.
__device__ __forceinline__ uint32_t split_keys_of(const AttentionDecodeParams& p, int32_t count) {
    if (p.target_splits == 0) return p.split_keys;
    const uint32_t spread = ((uint32_t)max(count, 0) + p.target_splits - 1) / p.target_splits;
    return min(p.split_keys, max((uint32_t)ATTENTION_MIN_SPLIT_KEYS, spread));
}

// Splits that run for a token with `count` keys of `keys` each (each takes a merge ticket).
__device__ __forceinline__ uint32_t splits_of(const AttentionDecodeParams& p, int32_t count, uint32_t keys) {
    return min((uint32_t)(((uint64_t)count + keys - 1) / keys), p.max_splits);
}

// Merges the `splits` partial results of each query head of KV head kvh of token t into `out` (see the
// file comment); every thread of the block calls it. Reads the other blocks' results through L2.
template <int D, int G>
__device__ void merge_splits(const AttentionDecodeParams& p, uint32_t t, uint32_t kvh, uint32_t splits) {
    __shared__ float m_s[G], denom_s[G];
    if (threadIdx.x < (uint32_t)G) {
        const size_t base = ((size_t)t * p.n_heads + (size_t)kvh * G + threadIdx.x) * p.max_splits;
        float m = -INFINITY;
        for (uint32_t s = 0; s < splits; ++s) m = fmaxf(m, __ldcg(p.part_lse + base + s));
        float denom = 0.0f;
        if (m != -INFINITY) {
            for (uint32_t s = 0; s < splits; ++s) denom += exp2f(__ldcg(p.part_lse + base + s) - m);
        }
        m_s[threadIdx.x] = m;
        denom_s[threadIdx.x] = denom;
    }
    __syncthreads();
    for (uint32_t idx = threadIdx.x; idx < (uint32_t)(G * D); idx += ATTENTION_THREADS) {
        const uint32_t g = idx / D, d = idx % D;
        const size_t head = (size_t)t * p.n_heads + (size_t)kvh * G + g;
        const size_t base = head * p.max_splits;
        const float m = m_s[g], denom = denom_s[g];
        float o = 0.0f;
        if (denom > 0.0f) {
            for (uint32_t s = 0; s < splits; ++s) {
                o = fmaf(exp2f(__ldcg(p.part_lse + base + s) - m), __ldcg(p.part_out + (base + s) * D + d), o);
            }
            o /= denom;
        }
        p.out[head * D + d] = mx::to_bf16(o);
    }
}

// Takes this split's merge ticket (after a barrier over its writes) and, drawing the last one of its
// (token, KV head), merges the splits and resets the counter. Recomputes the token's split count from
// its position rather than keeping it live through the split's work.
template <int D, int G>
__device__ void merge_if_last(const AttentionDecodeParams& p) {
    __shared__ bool last;
    const uint32_t kvh = blockIdx.y, t = blockIdx.z;
    int32_t first, count;
    key_range(p, t, first, count);
    const uint32_t splits = splits_of(p, count, split_keys_of(p, count));
    uint32_t* done = p.split_done + (size_t)t * p.n_kv_heads + kvh;
    if (threadIdx.x == 0) {
        __threadfence();  // this split's results are visible device-wide before its ticket
        last = atomicAdd(done, 1u) == splits - 1;
    }
    __syncthreads();
    if (!last) return;  // uniform over the block
    __threadfence();  // the other splits' results (published before their tickets) are read after ours
    merge_splits<D, G>(p, t, kvh, splits);
    if (threadIdx.x == 0) *done = 0u;
}

// The scores of the split's keys (see attention_decode_body), on CUDA cores: each key row is read by
// TG = D / 8 lanes with one 16-byte load each, the group's dot products summed over those lanes by
// shuffles. Fills scores[g * sk + key] (-inf for a key off the block table), the last statement a
// barrier (which also publishes the split's block-table entries).
template <int D, int G>
__device__ void scores_simt(const AttentionDecodeParams& p, const SplitBlocks& blocks, uint32_t t, uint32_t kvh,
                            int32_t begin, int32_t nk, float* scores) {
    constexpr int TG = D / 8;    // lanes per key row, one 16-byte chunk each
    constexpr int KPW = 32 / TG;  // key rows per warp step
    __shared__ float q_s[G][D];
    const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t sub = lane / TG, part = lane % TG;
    const uint32_t sk = p.split_keys;  // the row stride of `scores`

    // The group's queries, scaled so that the scores come out in log2 units.
    const float q_scale = p.scale * mx::LOG2E;
    for (uint32_t idx = threadIdx.x; idx < (uint32_t)(G * D); idx += ATTENTION_THREADS) {
        const uint32_t g = idx / D, d = idx % D;
        const size_t head = (size_t)kvh * G + g;
        q_s[g][d] = mx::to_f32(p.q[(size_t)t * p.q_stride + head * D + d]) * q_scale;
    }
    __syncthreads();
    float qr[G][8];
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
        for (int i = 0; i < 8; ++i) qr[g][i] = q_s[g][part * 8 + i];
    }

    const size_t head_offset = (size_t)kvh * D + part * 8;

    // The loop is uniform over the warp (the shuffles need every lane). Each lane looks up the
    // slots of its UNROLL keys, then issues their loads, then uses them: the keys a warp covers and each
    // key's score are those of a loop without the unrolling.
    constexpr int32_t STRIDE = WARPS * KPW;  // keys between a warp's consecutive steps
    // Every warp runs the same number of steps (keys past nk load nothing), so the shuffles of the
    // sums stay in code that every warp runs.
    for (int32_t base = 0; base < nk; base += STRIDE * UNROLL) {
        const int32_t step = base + (int32_t)warp * KPW;
        long long slot[UNROLL];
        uint4 kv[UNROLL][1];
        load_keys(p, p.k_cache, blocks, begin, nk, step + (int32_t)sub, STRIDE, head_offset, slot, kv);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int32_t kk = step + u * STRIDE + (int32_t)sub;
#pragma unroll
            for (int g = 0; g < G; ++g) {
                const float s = mx::group_sum<TG>(mx::dot8(kv[u][0], qr[g], 0.0f));
                if (kk < nk && part == 0) scores[g * sk + kk] = slot[u] >= 0 ? s : -INFINITY;
            }
        }
    }
    __syncthreads();
}

// The scores on the tensor cores (GROUP up to 8, head_dim 64 or 128): S = Q K^T by
// mma.sync.m16n8k16, the group's query heads rows 0..G-1 of A (the other rows zero), 8 keys the
// columns of B. Lane 4n + c (mma_bf16_16816's numbering) loads dimensions [c * D/4, (c + 1) * D/4)
// of key n with D/32 16-byte loads, and each k-step's slots are matched to them in A and B alike:
// step s, slots 2c..2c+1 and 2c+8..2c+9 are dimensions c * D/4 + 4s + 0..1 and 4s + 2..3. The
// slots of a step are a permutation of 16 dimensions and the steps cover each dimension once, so
// the sums are the dot products with no key row exchanged between lanes (the shuffled sums of
// scores_simt are gone). A bf16 query times a bf16 key is exact in f32; the sums run in f32 in the
// tensor cores' order, and the scale is applied to the f32 score (scores_simt scales the query).
// Fills scores as scores_simt does, a barrier first (publishing the block-table entries) and last.
template <int D, int G>
__device__ void scores_mma(const AttentionDecodeParams& p, const SplitBlocks& blocks, uint32_t t, uint32_t kvh,
                           int32_t begin, int32_t nk, float* scores) {
    static_assert(G <= 8, "the group's heads fit rows 0..7 of one m16 tile");
    static_assert(D == 64 || D == 128, "a lane's quarter of a key row is whole 16-byte loads");
    constexpr int CHUNK = D / 4;      // dimensions per lane
    constexpr int LOADS = CHUNK / 8;  // 16-byte loads per lane and key
    constexpr int STEPS = D / 16;     // k-steps
    const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t n = lane / 4, c = lane % 4;  // A row (query head) and B column (key); k-slot pair
    const uint32_t sk = p.split_keys;           // the row stride of `scores`

    // A: query head n of the group (zero past G), this lane's quarter of it.
    uint32_t a[STEPS][4];
    {
        const mx_bf16* qh = p.q + (size_t)t * p.q_stride + ((size_t)kvh * G + min(n, (uint32_t)G - 1)) * D + c * CHUNK;
#pragma unroll
        for (int s = 0; s < STEPS; ++s) {
            a[s][0] = n < (uint32_t)G ? mx::pack_bits(qh[4 * s], qh[4 * s + 1]) : 0u;
            a[s][2] = n < (uint32_t)G ? mx::pack_bits(qh[4 * s + 2], qh[4 * s + 3]) : 0u;
            a[s][1] = a[s][3] = 0u;
        }
    }
    __syncthreads();  // the block-table entries

    const float scale = p.scale * mx::LOG2E;  // scores in log2 units
    const size_t offset = (size_t)kvh * D + c * CHUNK;
    constexpr int32_t STRIDE = WARPS * 8;  // keys between a warp's consecutive 8-key groups
    // Every warp runs the same number of steps (groups past nk load nothing), as scores_simt.
    for (int32_t base = 0; base < nk; base += STRIDE * MMA_UNROLL) {
        long long slot[MMA_UNROLL];
        uint4 kr[MMA_UNROLL][LOADS];
        load_keys(p, p.k_cache, blocks, begin, nk, base + (int32_t)(warp * 8 + n), STRIDE, offset, slot, kr);
#pragma unroll
        for (int u = 0; u < MMA_UNROLL; ++u) {
            float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int s = 0; s < STEPS; ++s) {
                // Dimensions 4s .. 4s + 3 of this lane's quarter: two words of load s / 2.
                const uint4 w = kr[u][s / 2];
                const uint32_t b0 = s % 2 == 0 ? w.x : w.z;
                const uint32_t b1 = s % 2 == 0 ? w.y : w.w;
                mx::mma_bf16_16816(d, a[s], b0, b1);
            }
            // d[0..1]: query head n, keys 2c and 2c + 1 of the group.
            const int32_t group = base + u * STRIDE + (int32_t)warp * 8;
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int32_t kk = group + 2 * (int32_t)c + j;
                if (n < (uint32_t)G && kk < nk) {
                    scores[n * sk + kk] = blocks.slot(begin + kk) >= 0 ? d[j] * scale : -INFINITY;
                }
            }
        }
    }
    __syncthreads();
}

// One split of one (token, KV head): its scores on CUDA cores or, with MMA, on the tensor cores, then
// the softmax over them, P.V and the merge.
template <int D, int G, bool MMA>
__device__ void attention_decode_body(const AttentionDecodeParams& p) {
    static_assert(D % 8 == 0 && D / 8 <= 32 && 32 % (D / 8) == 0, "a key row is a power-of-two lane group");
    constexpr int TG = D / 8;    // lanes per key row in P.V, one 16-byte chunk each
    constexpr int KPW = 32 / TG;  // key rows per warp step
    __shared__ float red[WARPS][G][D];
    __shared__ float m_s[G], l_s[G];
    float* scores = mx::dynamic_shared<float>();  // [G][split_keys]

    const uint32_t split = blockIdx.x, kvh = blockIdx.y, t = blockIdx.z;
    if (t >= p.tokens || kvh >= p.n_kv_heads) return;  // uniform over the block
    int32_t first, count;
    key_range(p, t, first, count);
    const uint32_t keys = split_keys_of(p, count);
    if ((uint64_t)split * keys >= (uint64_t)count) {  // uniform: nothing in this split
        if (count == 0 && split == 0) merge_splits<D, G>(p, t, kvh, 0);  // no key at all: zeros
        return;
    }
    const int32_t begin = first + (int32_t)(split * keys);
    const int32_t nk = min((int32_t)keys, first + count - begin);
    const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t sub = lane / TG, part = lane % TG;
    const uint32_t sk = p.split_keys;  // the row stride of `scores`

    // The split's block-table entries (visible after the first barrier of the scores).
    __shared__ long long block_entries[ATTENTION_MAX_SPLIT_KEYS];
    const SplitBlocks blocks = read_split_blocks(p, p.token_seq[t], begin, nk, block_entries);
    if constexpr (MMA) {
        scores_mma<D, G>(p, blocks, t, kvh, begin, nk, scores);
    } else {
        scores_simt<D, G>(p, blocks, t, kvh, begin, nk, scores);
    }
    const size_t head_offset = (size_t)kvh * D + part * 8;
    constexpr int32_t STRIDE = WARPS * KPW;  // keys between a warp's consecutive P.V steps

    // Softmax statistics; warp w handles heads w, w + WARPS, ... Every warp takes the same number of
    // rounds (a warp without a head in a round reads nothing), so the shuffles stay in code that every
    // warp runs.
#pragma unroll
    for (uint32_t round = 0; round < (G + WARPS - 1) / WARPS; ++round) {
        const uint32_t g = warp + round * WARPS;
        const bool owns = g < (uint32_t)G;
        const int32_t n = owns ? nk : 0;
        float m = -INFINITY;
        for (int32_t i = lane; i < n; i += 32) m = fmaxf(m, scores[g * sk + i]);
        m = mx::group_max(m);
        float l = 0.0f;
        for (int32_t i = lane; i < n; i += 32) {
            const float e = m == -INFINITY ? 0.0f : exp2f(scores[g * sk + i] - m);
            scores[g * sk + i] = e;
            l += e;
        }
        l = mx::group_sum(l);
        if (owns && lane == 0) {
            m_s[g] = m;
            l_s[g] = l;
        }
    }
    __syncthreads();

    // P.V: lane group `sub` takes key rows, lane `part` owns 8 dimensions of each.
    float acc[G][8];
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] = 0.0f;
    }
    // As the scores: UNROLL slot lookups, then their loads, then the products in key order.
    for (int32_t step = warp * KPW; step < nk; step += STRIDE * UNROLL) {
        long long slot[UNROLL];
        uint4 vv[UNROLL][1];
        load_keys(p, p.v_cache, blocks, begin, nk, step + (int32_t)sub, STRIDE, head_offset, slot, vv);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (slot[u] < 0) continue;  // also every key past nk
            const int32_t kk = step + u * STRIDE + (int32_t)sub;
            float vf[8];
            mx::unpack8(vv[u][0], vf);
#pragma unroll
            for (int g = 0; g < G; ++g) {
                const float pg = scores[g * sk + kk];
#pragma unroll
                for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(pg, vf[i], acc[g][i]);
            }
        }
    }
    // Sum over the lane groups of the warp (lanes with the same `part`), then over the warps.
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
#pragma unroll
            for (int offset = TG; offset < 32; offset *= 2) {
                acc[g][i] += __shfl_xor_sync(mx::FULL_MASK, acc[g][i], offset);
            }
        }
    }
    if (sub == 0) {
#pragma unroll
        for (int g = 0; g < G; ++g) {
#pragma unroll
            for (int i = 0; i < 8; ++i) red[warp][g][part * 8 + i] = acc[g][i];
        }
    }
    __syncthreads();

    for (uint32_t idx = threadIdx.x; idx < (uint32_t)(G * D); idx += ATTENTION_THREADS) {
        const uint32_t g = idx / D, d = idx % D;
        float o = 0.0f;
#pragma unroll
        for (uint32_t w = 0; w < WARPS; ++w) o += red[w][g][d];
        const float l = l_s[g];
        const size_t head = (size_t)kvh * G + g;
        const size_t base = ((size_t)t * p.n_heads + head) * p.max_splits + split;
        p.part_out[base * D + d] = l > 0.0f ? o / l : 0.0f;
        if (d == 0) p.part_lse[base] = l > 0.0f ? m_s[g] + log2f(l) : -INFINITY;
    }

    __syncthreads();  // every thread's results written before thread 0 publishes them
    merge_if_last<D, G>(p);
}

}  // namespace

#define MX_DEFINE(symbol, HEAD_DIM, GROUP)                       \
    MX_ENTRY(symbol, (ATTENTION_THREADS), AttentionDecodeParams, \
        attention_decode_body<HEAD_DIM, GROUP, false>(p))
MIXTRAL_ATTENTION_DECODE_VARIANTS(MX_DEFINE)
#undef MX_DEFINE

#define MX_DEFINE(symbol, HEAD_DIM, GROUP)                       \
    MX_ENTRY(symbol, (ATTENTION_THREADS), AttentionDecodeParams, \
        attention_decode_body<HEAD_DIM, GROUP, true>(p))
MIXTRAL_ATTENTION_DECODE_MMA_VARIANTS(MX_DEFINE)
#undef MX_DEFINE
