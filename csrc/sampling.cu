// sampling.cu: greedy sampling (`argmax`) and seeded top-k / top-p sampling (`sample`) on the device.
//
// argmax:
//   logits  [rows, vocab] f32
//   out_ids [rows] u32
//
//   out_ids[r] = the lowest id i with logits[r, i] == max(logits[r, :]); NaN is never chosen (it
//   compares false with everything) and a row of NaN gives id 0.
//
// Grid: one block of ARGMAX_THREADS per row; each thread scans a strided part of the row, then a
// warp-shuffle and a shared-memory reduction with the same (value, lower id) order. No math at all.
//
// sample: see the comment above `sample_body` below.
#include "common.cuh"

namespace {

struct Best {
    float value;
    uint32_t id;  // UINT32_MAX: nothing seen yet
};

// True when (value, id) comes before `best`: larger value, or the same value with a lower id.
__device__ __forceinline__ bool better(float value, uint32_t id, const Best& best) {
    return value > best.value || (value == best.value && id < best.id);
}

__device__ __forceinline__ void offer(Best& best, float value, uint32_t id) {
    if (better(value, id, best)) best = Best{value, id};
}

__device__ void argmax_body(const ArgmaxParams& p) {
    __shared__ Best partial[ARGMAX_THREADS / 32];
    const uint32_t row = blockIdx.x;
    if (row >= p.rows) return;  // uniform over the block
    const float* logits = p.logits + (size_t)row * p.vocab;
    Best best{-INFINITY, UINT32_MAX};
    for (uint32_t i = threadIdx.x; i < p.vocab; i += ARGMAX_THREADS) offer(best, logits[i], i);

#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
        const float value = __shfl_xor_sync(mx::FULL_MASK, best.value, offset);
        const uint32_t id = __shfl_xor_sync(mx::FULL_MASK, best.id, offset);
        offer(best, value, id);
    }
    const uint32_t warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) partial[warp] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (uint32_t w = 1; w < ARGMAX_THREADS / 32; ++w) offer(best, partial[w].value, partial[w].id);
        p.out_ids[row] = best.id == UINT32_MAX ? 0u : best.id;
    }
}

}  // namespace

#define MX_DEFINE(symbol) \
    MX_KERNEL void __launch_bounds__(ARGMAX_THREADS) symbol(ArgmaxParams p) { argmax_body(p); }
MIXTRAL_ARGMAX_VARIANTS(MX_DEFINE)
#undef MX_DEFINE

// =============================================================================================
// sample: seeded temperature / top-k / top-p sampling, the host `Sampler` (src/sampling/mod.rs)
// without repetition penalty.
//
//   logits      [rows, vocab] f32
//   temperature [rows] f32, finite and > 0 (greedy rows go to `argmax`; the engine decides)
//   top_k       [rows] u32, 0 = off (also off when >= vocab)
//   top_p       [rows] f32 in (0, 1], 1 = off
//   rng_state   [rows, SAMPLE_RNG_WORDS] u64: xoshiro256++ state, the host `Rng`'s four words
//   out_ids     [rows] u32
//
// THIS KERNEL HAS NEVER RUN ON A GPU. It compiles and its SASS was read (no local memory); its
// agreement with the host sampler is only argued below and in tests/gpu_kernels/sample.rs, which
// could not be run when it was written.
//
// Per row, exactly the host definition:
//   score_i = (double)logit_i / (double)T                                  (f64, as the host)
//   rank order: score descending, ties to the lower id. Dividing distinct finite f32 values by the
//     same positive T in f64 cannot merge or reorder them (24-bit mantissas, no f64 overflow or
//     underflow), and -0.0 stays below +0.0 as under the host's `total_cmp`; so the order is that
//     of the 64-bit rank R_i = (order_key(logit_i) << 32) | (0xFFFFFFFF - i), all distinct, larger
//     first.
//   top-k (0 < k < vocab): keep R >= the k-th largest R.
//   weights w_i = exp(score_i - score_top) in f64 (the top token has weight exactly 1).
//   top-p (p < 1): of the kept, keep the shortest rank-order prefix whose mass reaches p * total.
//   draw: target = u * total(kept), u = one xoshiro256++ value as (bits >> 11) * 2^-53; walking the
//     kept tokens in rank order (or in id order when neither filter is active, as the host walks
//     its unsorted list), the first token whose inclusive cumulative weight exceeds the target; if
//     rounding leaves none (target == total), the last token of positive weight in that order.
//
// Every set above is "all ids whose key is >= t" for some threshold t, so each is found by
// bisection on t over u64 with a block-wide count or f64 weight sum per step; nothing is sorted,
// no scratch memory is used and shared memory is a fixed few hundred bytes. The walk key is R in
// rank order and 0xFFFFFFFF - i in id order (larger key = earlier), so the chosen id is always
// 0xFFFFFFFF - low32(t). The sums are parallel (fixed order per launch, hence monotone in the set,
// which the bisection needs), so they can differ from the host's sequential f64 sums in the last
// bits: GPU and host draws differ only when the uniform falls within that rounding of a boundary.
// exp() is CUDA's f64 exp (<= 1 ulp), the host's is the platform libm's.
//
// A row whose temperature or top_p is out of domain gets SAMPLE_BAD_PARAMS; a row with a NaN or
// infinite logit gets SAMPLE_NON_FINITE. Neither advances the row's random state (the host sampler
// also consumes nothing when it refuses a row). Every other row advances it by exactly one step.
//
// Grid: one block of SAMPLE_THREADS per row. Cost: one pass over the row per bisection step (about
// 64 passes per active filter and 64 for the draw in rank order, 32 in id order), logits re-read
// through the read-only cache; f64 exp per element in the weight passes. Correctness first: no
// performance has been measured.

namespace {

static_assert(SAMPLE_THREADS == 1024, "the block reduction below assumes 32 warps");
constexpr uint32_t SAMPLE_WARPS = SAMPLE_THREADS / 32;

struct SumF64 {
    __device__ __forceinline__ double operator()(double a, double b) const { return __dadd_rn(a, b); }
};
struct SumU32 {
    __device__ __forceinline__ uint32_t operator()(uint32_t a, uint32_t b) const { return a + b; }
};
struct MaxU32 {
    __device__ __forceinline__ uint32_t operator()(uint32_t a, uint32_t b) const { return a > b ? a : b; }
};
struct MaxU64 {
    __device__ __forceinline__ uint64_t operator()(uint64_t a, uint64_t b) const { return a > b ? a : b; }
};
struct MinU64 {
    __device__ __forceinline__ uint64_t operator()(uint64_t a, uint64_t b) const { return a < b ? a : b; }
};

// Reduction over the whole block in a fixed order (lanes by xor-butterfly, then the 32 warp
// results by warp 0); every thread gets the result. Every thread of the block must call it.
// Two barriers suffice between consecutive calls of one instantiation: `partial` is read (by warp
// 0) before the second barrier of a call and written again only before the first barrier of the
// next; `result` is read right after the second barrier and written again only after the first
// barrier of the next call, which no thread passes before every thread has read it.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op) {
    __shared__ T partial[SAMPLE_WARPS];
    __shared__ T result;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(mx::FULL_MASK, v, offset));
    const uint32_t warp = threadIdx.x / 32;
    const uint32_t lane = threadIdx.x % 32;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = partial[lane];  // SAMPLE_WARPS == 32: one warp result per lane
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(mx::FULL_MASK, v, offset));
        if (lane == 0) result = v;
    }
    __syncthreads();
    return result;
}

// Monotone map of finite f32 to u32 in the order of f32 `total_cmp` (-0.0 below +0.0).
__device__ __forceinline__ uint32_t order_key(float x) {
    const uint32_t bits = __float_as_uint(x);
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Rank of token `id`: larger = earlier in the host's order (higher score, then lower id).
__device__ __forceinline__ uint64_t rank_of(float x, uint32_t id) {
    return ((uint64_t)order_key(x) << 32) | (uint64_t)(0xFFFFFFFFu - id);
}

// Position key of the draw's walk: the rank, or the id order (lower id = larger key).
__device__ __forceinline__ uint64_t walk_of(uint64_t rank, uint32_t id, bool by_id) {
    return by_id ? (uint64_t)(0xFFFFFFFFu - id) : rank;
}

// The token id a rank or walk key names.
__device__ __forceinline__ uint32_t id_of(uint64_t key) { return 0xFFFFFFFFu - (uint32_t)(key & 0xFFFFFFFFu); }

struct Row {
    const float* logits;  // [vocab]
    uint32_t vocab;
    double temperature;
    double top_score;  // score of the top-ranked token
};

// exp(score - top_score) in f64, the host's weight.
__device__ __forceinline__ double weight_of(const Row& r, float x) {
    return exp(__dsub_rn(__ddiv_rn((double)x, r.temperature), r.top_score));
}

// Number of ids with rank >= t.
__device__ uint32_t count_from(const Row& r, uint64_t t) {
    uint32_t n = 0;
    for (uint32_t i = threadIdx.x; i < r.vocab; i += SAMPLE_THREADS) n += rank_of(__ldg(r.logits + i), i) >= t ? 1u : 0u;
    return block_reduce(n, SumU32{});
}

// Sum of the weights of ids with rank >= floor and walk key >= from.
__device__ double mass_from(const Row& r, uint64_t floor, uint64_t from, bool by_id) {
    double acc = 0.0;
    for (uint32_t i = threadIdx.x; i < r.vocab; i += SAMPLE_THREADS) {
        const float x = __ldg(r.logits + i);
        const uint64_t rank = rank_of(x, i);
        if (rank >= floor && walk_of(rank, i, by_id) >= from) acc = __dadd_rn(acc, weight_of(r, x));
    }
    return block_reduce(acc, SumF64{});
}

// Smallest walk key among ids with rank >= floor and a positive weight (the last such in the walk).
__device__ uint64_t last_positive(const Row& r, uint64_t floor, bool by_id) {
    uint64_t best = ~0ull;
    for (uint32_t i = threadIdx.x; i < r.vocab; i += SAMPLE_THREADS) {
        const float x = __ldg(r.logits + i);
        const uint64_t rank = rank_of(x, i);
        if (rank >= floor && weight_of(r, x) > 0.0) {
            const uint64_t walk = walk_of(rank, i, by_id);
            best = walk < best ? walk : best;
        }
    }
    return block_reduce(best, MinU64{});
}

// Midpoint for "largest t in [lo, hi] with pred(t)": lies in (lo, hi] when lo < hi, no overflow.
__device__ __forceinline__ uint64_t upper_mid(uint64_t lo, uint64_t hi) { return lo + (hi - lo) / 2 + 1; }

// One xoshiro256++ step on `s` (the host `Rng::next_u64`), as a uniform in [0, 1) with 53 bits.
__device__ __forceinline__ double next_uniform(uint64_t* s) {
    uint64_t s0 = s[0], s1 = s[1], s2 = s[2], s3 = s[3];
    const uint64_t sum = s0 + s3;
    const uint64_t result = ((sum << 23) | (sum >> 41)) + s0;
    const uint64_t t = s1 << 17;
    s2 ^= s0;
    s3 ^= s1;
    s1 ^= s2;
    s0 ^= s3;
    s2 ^= t;
    s3 = (s3 << 45) | (s3 >> 19);
    s[0] = s0;
    s[1] = s1;
    s[2] = s2;
    s[3] = s3;
    return __dmul_rn((double)(result >> 11), 0x1.0p-53);
}

__device__ void sample_body(const SampleParams& p) {
    __shared__ double draw_target;
    const uint32_t row = blockIdx.x;
    if (row >= p.rows || p.vocab == 0) return;  // uniform over the block (the launcher refuses vocab 0)

    // Parameters (every thread reads the same values, so every branch below is block-uniform).
    const float temperature = p.temperature[row];
    const uint32_t top_k = p.top_k[row];
    const float top_p = p.top_p[row];
    if (!(temperature > 0.0f) || !isfinite(temperature) || !(top_p > 0.0f && top_p <= 1.0f)) {
        if (threadIdx.x == 0) p.out_ids[row] = SAMPLE_BAD_PARAMS;
        return;
    }

    Row r;
    r.logits = p.logits + (size_t)row * p.vocab;
    r.vocab = p.vocab;
    r.temperature = (double)temperature;

    // Pass 1: every logit finite, and the top-ranked token.
    uint32_t bad = 0;
    uint64_t top = 0;
    for (uint32_t i = threadIdx.x; i < r.vocab; i += SAMPLE_THREADS) {
        const float x = __ldg(r.logits + i);
        if (!isfinite(x)) bad = 1;
        const uint64_t rank = rank_of(x, i);
        top = rank > top ? rank : top;
    }
    bad = block_reduce(bad, MaxU32{});
    top = block_reduce(top, MaxU64{});
    if (bad != 0) {
        if (threadIdx.x == 0) p.out_ids[row] = SAMPLE_NON_FINITE;
        return;
    }
    r.top_score = __ddiv_rn((double)__ldg(r.logits + id_of(top)), r.temperature);

    const bool k_active = top_k > 0 && top_k < r.vocab;
    const bool p_active = top_p < 1.0f;
    const bool by_id = !k_active && !p_active;

    // Kept set: rank >= floor.
    uint64_t floor = 0;
    if (k_active) {
        // The k-th largest rank: the largest t with count(rank >= t) >= k (t = 0 counts all).
        uint64_t lo = 0, hi = top;
        while (lo < hi) {
            const uint64_t mid = upper_mid(lo, hi);
            if (count_from(r, mid) >= top_k) lo = mid;
            else hi = mid - 1;
        }
        floor = lo;
    }
    if (p_active) {
        // The shortest rank prefix of the kept whose mass reaches p * total: the largest t >= floor
        // with mass(rank >= t) >= threshold (t = floor gives the total itself, which reaches it).
        const double total = mass_from(r, floor, 0, false);
        const double threshold = __dmul_rn((double)top_p, total);
        uint64_t lo = floor, hi = top;
        while (lo < hi) {
            const uint64_t mid = upper_mid(lo, hi);
            if (mass_from(r, mid, 0, false) >= threshold) lo = mid;
            else hi = mid - 1;
        }
        floor = lo;
    }

    const double total = mass_from(r, floor, 0, by_id);
    if (threadIdx.x == 0) {
        uint64_t* state = static_cast<uint64_t*>(p.rng_state) + (size_t)row * SAMPLE_RNG_WORDS;
        draw_target = __dmul_rn(next_uniform(state), total);
    }
    __syncthreads();
    const double target = draw_target;

    uint64_t chosen;
    if (total > target) {
        // The first token of the walk whose inclusive cumulative weight exceeds the target: the
        // largest walk key t with mass(walk >= t) > target (t = 0 gives the total).
        uint64_t lo = 0, hi = by_id ? 0xFFFFFFFFull : top;
        while (lo < hi) {
            const uint64_t mid = upper_mid(lo, hi);
            if (mass_from(r, floor, mid, by_id) > target) lo = mid;
            else hi = mid - 1;
        }
        chosen = lo;
    } else {
        chosen = last_positive(r, floor, by_id);
    }
    if (threadIdx.x == 0) p.out_ids[row] = id_of(chosen);
}

}  // namespace

#define MX_DEFINE(symbol) \
    MX_KERNEL void __launch_bounds__(SAMPLE_THREADS) symbol(SampleParams p) { sample_body(p); }
MIXTRAL_SAMPLE_VARIANTS(MX_DEFINE)
#undef MX_DEFINE
