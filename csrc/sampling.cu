// sampling.cu: greedy sampling (`argmax`) and seeded top-k / top-p sampling (`sample`) on the device.
//
// argmax:
//   logits  [rows, vocab] f32
//   out_ids [rows] u32
//
//   out_ids[r] = the lowest id i with logits[r, i] == max(logits[r, :]), or SAMPLE_NON_FINITE when the
//   row holds a NaN or an infinity (what `sample` and the host sampler refuse: no token is drawn from
//   such a row).
//
// Grid: one block of ARGMAX_THREADS per row; each thread scans a strided part of the row, then a
// warp-shuffle and a shared-memory reduction with the same (value, lower id) order. No math at all.
//
// sample: seeded temperature / top-k / top-p draw per row; see the section comment further down.
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
    int non_finite = 0;
    for (uint32_t i = threadIdx.x; i < p.vocab; i += ARGMAX_THREADS) {
        const float value = logits[i];
        non_finite |= !isfinite(value);
        offer(best, value, i);
    }

#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
        const float value = __shfl_xor_sync(mx::FULL_MASK, best.value, offset);
        const uint32_t id = __shfl_xor_sync(mx::FULL_MASK, best.id, offset);
        offer(best, value, id);
    }
    const uint32_t warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) partial[warp] = best;
    // The barrier also ORs every thread's non-finite flag.
    non_finite = __syncthreads_or(non_finite);
    if (threadIdx.x == 0) {
        for (uint32_t w = 1; w < ARGMAX_THREADS / 32; ++w) offer(best, partial[w].value, partial[w].id);
        p.out_ids[row] = non_finite != 0 ? SAMPLE_NON_FINITE : best.id;
    }
}

}  // namespace

#define MX_DEFINE(symbol)                            \
    MX_ENTRY(symbol, (ARGMAX_THREADS), ArgmaxParams, \
        argmax_body(p))
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
// Ran on an H100 (2026-11-28, benches/RESULTS.md): tests/gpu_kernels/sample.rs (the same ids and
// random state as the host sampler, the host's distribution over many rows) passes.
//
// Per row, exactly the host definition (src/sampling/mod.rs, `Sampler::filtered` and `sample`):
//   score_i = (double)logit_i / (double)T, weight w_i = exp(score_i - score_top) in f64 (the top
//     token has weight exactly 1).
//   top-k (0 < k < vocab): keep the k first in score order (score descending, ties to the lower id).
//   top-p (p < 1): of the kept, keep the shortest prefix whose weight reaches p * total.
//   draw: target = u * total(kept), u = one xoshiro256++ value as (bits >> 11) * 2^-53; walking the
//     kept tokens in the host's list order, the first token whose inclusive cumulative weight
//     exceeds the target; if rounding leaves none (target == total), the last token of positive
//     weight in that order.
// The host's list order, which the top-p prefix and the draw walk follow, depends on the filters:
//   no filter: id order (the list is never sorted);
//   top-k (with or without top-p): score order (sorted by score after the truncation);
//   top-p alone: weight order, ties to the lower id (sorted after the scores became weights, so
//     scores that round to the same weight, e.g. all that underflow to 0, tie and go by id).
// Each order is a key compared as (hi, lo) with lo = 0xFFFFFFFF - id and hi = 0 (id order), the
// f32 logit's `total_cmp` bits (score order: dividing distinct finite f32 values by the same
// positive T in f64 cannot merge or reorder them, and -0.0 stays below +0.0 as under `total_cmp`),
// or the f64 weight's bits (weight order). Larger key = earlier.
//
// Every set above is "all ids whose key is >= t" for some threshold t, so each is found by a
// search on t (first on hi, then on lo) with block-wide counts or f64 weight sums at 7 thresholds
// per pass over the row (the search section below); nothing is sorted, no scratch memory is used
// and shared memory is a fixed few KiB. The sums are parallel (fixed order per launch, hence
// monotone in the set, which the search needs), so they can differ from the host's sequential f64 sums in the last bits: GPU and host
// differ only when the top-p threshold or the uniform falls within that rounding of a boundary.
// exp() is CUDA's f64 exp (<= 1 ulp), the host's is the platform libm's.
//
// A row whose temperature or top_p is out of domain gets SAMPLE_BAD_PARAMS; a row with a NaN or
// infinite logit gets SAMPLE_NON_FINITE. Neither advances the row's random state (the host sampler
// also consumes nothing when it refuses a row). Every other row advances it by exactly one step.
//
// Grid: one block of SAMPLE_THREADS per row. Cost: one pass over the row per search step; a search
// takes 11 steps for the hi of score order, 21 for weight order, none for id order, and 5 for the
// lo of a 32000-id row (at most 11); the bisection this replaced took 32, 62, 0 and 32. One search
// per active filter and one for the draw; logits re-read through the read-only cache; f64 exp per
// kept element per weight pass (per element of the row in weight order, i.e. top-p without top-k,
// which is the slow case). With `fast` set, the fast paths further down take most rows in a few
// passes instead (count passes without exp, one or two with it), and give the row back to the
// search path where they do not apply. Neither has been timed; the fast paths and the 7-way
// search have not run on a GPU.

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

// Reduction of each of v[0..N) over the whole block in a fixed order (lanes by xor-butterfly, then
// the 32 warp results of v[n] by warp n % 32); every thread gets the N results. Every thread of the
// block must call it. Each v[n] is reduced by the same tree whatever N is.
// Two barriers suffice between consecutive calls of one instantiation: `partial` is read before the
// second barrier of a call and written again only before the first barrier of the next; `result` is
// read right after the second barrier and written again only after the first barrier of the next
// call, which no thread passes before every thread has read it.
template <typename T, uint32_t N, typename Op>
__device__ __forceinline__ void block_reduce_each(T (&v)[N], Op op) {
    __shared__ T partial[N][SAMPLE_WARPS];
    __shared__ T result[N];
    const uint32_t warp = threadIdx.x / 32;
    const uint32_t lane = threadIdx.x % 32;
#pragma unroll
    for (uint32_t n = 0; n < N; ++n) {
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) v[n] = op(v[n], __shfl_xor_sync(mx::FULL_MASK, v[n], offset));
        if (lane == 0) partial[n][warp] = v[n];
    }
    __syncthreads();
    {
        // Every warp reduces one value (warp w reduces v[w % N]; the first N write theirs), so that no
        // shuffle sits under a warp-dependent branch (sm_80's ptxas would call a shuffle subroutine).
        static_assert(N <= SAMPLE_WARPS, "one value per warp");
        const uint32_t n = warp % N;
        T x = partial[n][lane];  // SAMPLE_WARPS == 32: one warp result per lane
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) x = op(x, __shfl_xor_sync(mx::FULL_MASK, x, offset));
        if (lane == 0 && warp < N) result[n] = x;
    }
    __syncthreads();
#pragma unroll
    for (uint32_t n = 0; n < N; ++n) v[n] = result[n];
}

// block_reduce_each of one value.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op) {
    T each[1] = {v};
    block_reduce_each(each, op);
    return each[0];
}

// Monotone map of finite f32 to u32 in the order of f32 `total_cmp` (-0.0 below +0.0).
__device__ __forceinline__ uint32_t order_key(float x) {
    const uint32_t bits = __float_as_uint(x);
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Score rank of token `id` in one u64: larger = earlier in the host's score order.
__device__ __forceinline__ uint64_t score_rank(float x, uint32_t id) {
    return ((uint64_t)order_key(x) << 32) | (uint64_t)(0xFFFFFFFFu - id);
}

// The order a row's kept set and its draw walk follow (see the header above `namespace`).
enum class Order { ById, ByScore, ByWeight };

// A position in the walk: larger = earlier; compared as (hi, lo). `lo` is 0xFFFFFFFF - id.
struct Key {
    uint64_t hi;
    uint32_t lo;
};

__device__ __forceinline__ bool at_least(const Key& a, const Key& t) {
    return a.hi > t.hi || (a.hi == t.hi && a.lo >= t.lo);
}

// The token id a key names.
__device__ __forceinline__ uint32_t id_of(uint32_t lo) { return 0xFFFFFFFFu - lo; }

struct Row {
    const float* logits;  // [vocab]
    uint32_t vocab;
    double temperature;
    double top_score;  // score of the top-ranked token
};

// exp(score - top_score) in f64, the host's weight (in [0, 1]; never -0.0).
__device__ __forceinline__ double weight_of(const Row& r, float x) {
    return exp(__dsub_rn(__ddiv_rn((double)x, r.temperature), r.top_score));
}

__device__ __forceinline__ Key key_of(Order order, float x, double w, uint32_t id) {
    uint64_t hi = 0;
    if (order == Order::ByScore) hi = order_key(x);
    if (order == Order::ByWeight) hi = (uint64_t)__double_as_longlong(w);  // w >= +0.0: bits are monotone
    return Key{hi, 0xFFFFFFFFu - id};
}

// Sum of the weights of ids whose key is >= floor. Only weight order needs the weight to form the
// key; the other orders compute exp for the ids inside only (after top-k, k of them).
__device__ double mass_from(const Row& r, Order order, const Key& floor) {
    double acc = 0.0;
    for (uint32_t i = threadIdx.x; i < r.vocab; i += SAMPLE_THREADS) {
        const float x = __ldg(r.logits + i);
        if (order == Order::ByWeight) {
            const double w = weight_of(r, x);
            if (at_least(key_of(order, x, w, i), floor)) acc = __dadd_rn(acc, w);
        } else if (at_least(key_of(order, x, 0.0, i), floor)) {
            acc = __dadd_rn(acc, weight_of(r, x));
        }
    }
    return block_reduce(acc, SumF64{});
}

// Smallest key among ids with key >= floor and a positive weight: the last such token of the walk.
__device__ Key last_positive(const Row& r, Order order, const Key& floor) {
    uint64_t hi = ~0ull;
    for (uint32_t i = threadIdx.x; i < r.vocab; i += SAMPLE_THREADS) {
        const float x = __ldg(r.logits + i);
        const double w = weight_of(r, x);
        const Key k = key_of(order, x, w, i);
        if (at_least(k, floor) && w > 0.0 && k.hi < hi) hi = k.hi;
    }
    hi = block_reduce(hi, MinU64{});
    uint64_t lo = ~0ull;
    for (uint32_t i = threadIdx.x; i < r.vocab; i += SAMPLE_THREADS) {
        const float x = __ldg(r.logits + i);
        const double w = weight_of(r, x);
        const Key k = key_of(order, x, w, i);
        if (at_least(k, floor) && w > 0.0 && k.hi == hi && k.lo < lo) lo = k.lo;
    }
    lo = block_reduce(lo, MinU64{});
    return Key{hi, (uint32_t)lo};
}

// ---------------------------------------------------------------------------------------------
// Searches for the largest key t with pred(t), for predicates of the form "the count (or weight
// sum) of the ids whose key is >= t reaches a bound": true at the least key and, once false, false
// for every larger key. Each pass over the row evaluates pred at SEARCH_CANDIDATES = 7 keys spaced
// 2^shift apart on one coordinate of the key (first hi, then lo within the hi found), so a pass
// narrows the range 8-fold where a bisection step halves it: 11 passes for a 32-bit range instead
// of 32. Each thread keeps a sum per candidate in registers (7 f64 sums are 14 registers; 15 made
// ptxas spill under the 64 registers a 1024-thread block allows). Every sum at a candidate is the one
// a pass for that threshold alone would compute (each thread adds the weights of its own ids in id
// order, then the same reduction tree), so the search finds exactly the key a bisection would.

constexpr uint32_t SEARCH_CANDIDATES = 7;

// The candidates of one pass: base + (j << shift) for j = 1..count, on the hi of keys (on_lo false)
// or on the lo of keys whose hi is `hi` (on_lo true).
struct Candidates {
    bool on_lo;
    uint64_t hi;
    uint64_t base;
    uint32_t shift;
    uint32_t count;  // <= SEARCH_CANDIDATES

    // How many of the SEARCH_CANDIDATES points base + (j << shift), j >= 1, key k is at or above
    // (keys whose hi is above `hi` pass them all when on_lo, keys whose hi is below pass none).
    __device__ __forceinline__ uint32_t passed(const Key& k) const {
        uint64_t v = k.hi;
        if (on_lo) {
            if (k.hi != hi) return k.hi > hi ? SEARCH_CANDIDATES : 0u;
            v = k.lo;
        }
        if (v < base) return 0u;
        const uint64_t steps = (v - base) >> shift;
        return steps < SEARCH_CANDIDATES ? (uint32_t)steps : SEARCH_CANDIDATES;
    }
};

// n[j] = the number of ids whose score key is at or above candidate j + 1 (top-k is always in score
// order).
__device__ void count_at_candidates(const Row& r, const Candidates& c,
                                    uint32_t (&n)[SEARCH_CANDIDATES]) {
#pragma unroll
    for (uint32_t j = 0; j < SEARCH_CANDIDATES; ++j) n[j] = 0;
    for (uint32_t i = threadIdx.x; i < r.vocab; i += SAMPLE_THREADS) {
        const uint32_t passed = c.passed(key_of(Order::ByScore, __ldg(r.logits + i), 0.0, i));
#pragma unroll
        for (uint32_t j = 0; j < SEARCH_CANDIDATES; ++j) n[j] += j < passed ? 1u : 0u;
    }
    block_reduce_each(n, SumU32{});
}

// m[j] = the sum of the weights of ids whose key is >= floor and at or above candidate j + 1.
__device__ void mass_at_candidates(const Row& r, Order order, const Key& floor,
                                   const Candidates& c, double (&m)[SEARCH_CANDIDATES]) {
#pragma unroll
    for (uint32_t j = 0; j < SEARCH_CANDIDATES; ++j) m[j] = 0.0;
    for (uint32_t i = threadIdx.x; i < r.vocab; i += SAMPLE_THREADS) {
        const float x = __ldg(r.logits + i);
        uint32_t passed = 0;
        double w = 0.0;
        if (order == Order::ByWeight) {
            w = weight_of(r, x);
            const Key k = key_of(order, x, w, i);
            if (at_least(k, floor)) passed = c.passed(k);
        } else {
            const Key k = key_of(order, x, 0.0, i);
            if (at_least(k, floor)) passed = c.passed(k);
            if (passed > 0) w = weight_of(r, x);
        }
#pragma unroll
        for (uint32_t j = 0; j < SEARCH_CANDIDATES; ++j) {
            if (j < passed) m[j] = __dadd_rn(m[j], w);
        }
    }
    block_reduce_each(m, SumF64{});
}

// Which candidates of a pass hold (bit j: candidate j + 1; at least the bits below c.count), and
// whether the search ends at the last of them.
struct Verdict {
    uint32_t holds;
    bool stop;
};

// The candidates whose value v[j] (a count or weight sum at candidate j + 1) satisfies ok: bit j.
template <typename T, typename Ok>
__device__ __forceinline__ uint32_t holding(const T (&v)[SEARCH_CANDIDATES], Ok ok) {
    uint32_t bits = 0;
#pragma unroll
    for (uint32_t j = 0; j < SEARCH_CANDIDATES; ++j) bits |= ok(v[j]) ? 1u << j : 0u;
    return bits;
}

// The largest v in [lo, hi] on c's coordinate with pred, for a pred that holds at lo and, once false,
// stays false. `judge(c)` evaluates pred at the c.count candidates in one pass and returns a
// Verdict. Every thread calls it.
template <typename Judge>
__device__ uint64_t largest_value(Candidates c, uint64_t lo, uint64_t hi, Judge judge) {
    while (lo < hi) {
        c.base = lo;
        c.shift = 0;
        while (((hi - lo) >> c.shift) > SEARCH_CANDIDATES) ++c.shift;
        c.count = (uint32_t)((hi - lo) >> c.shift);
        const Verdict v = judge(c);
        const uint32_t holding = v.holds & ((1u << c.count) - 1u);
        const uint32_t last = 32 - __clz(holding);  // the last candidate that holds; 0: none (lo itself)
        lo += (uint64_t)last << c.shift;
        if (v.stop) return lo;
        if (last < c.count) hi = lo + ((1ull << c.shift) - 1);
    }
    return lo;
}

// The largest key t (in (hi, lo) order, t.hi <= max_hi) with pred(t), for a pred that holds at
// Key{0, 0} and, once false, stays false for every larger key: on hi with lo = 0 (the least key of
// each hi), then on lo within that hi, from the least lo an id of the row has. `holds(c)` returns the
// candidates where pred holds (bit j: candidate j + 1) in one pass over the row. Every thread calls it.
template <typename Holds>
__device__ Key largest_key(const Row& r, uint64_t max_hi, Holds holds) {
    const auto judge = [&](const Candidates& c) { return Verdict{holds(c), false}; };
    const uint64_t top = largest_value(Candidates{false, 0, 0, 0, 0}, 0, max_hi, judge);
    const uint64_t least_lo = 0xFFFFFFFFull - (r.vocab - 1);  // id vocab - 1
    const uint64_t lo = largest_value(Candidates{true, top, 0, 0, 0}, least_lo, 0xFFFFFFFFull, judge);
    return Key{top, (uint32_t)lo};
}

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

// u * total for the row's draw, u one step of its random stream (taken by thread 0): the same value
// in every thread. Every thread calls it, once per row.
__device__ double draw_target(const SampleParams& p, uint32_t row, double total) {
    __shared__ double target;
    if (threadIdx.x == 0) target = __dmul_rn(next_uniform(p.rng_state + (size_t)row * SAMPLE_RNG_WORDS), total);
    __syncthreads();
    return target;
}

// ---------------------------------------------------------------------------------------------
// The fast paths (SampleParams::fast = 1): the same ids as the search path above in fewer passes over
// the row. Each gathers at most FAST_CAP ids into shared memory,
// sorts them into the host's list order and reads the cut and the draw off their prefix sums:
//   top-k, k <= FAST_CAP (with or without top-p): a floor on the logits' order keys with k to
//     FAST_CAP ids at or above it, by the search on counts ended at the first pass that finds such a
//     floor (no exp; at most 11 passes), the ids at or above it gathered (more than FAST_CAP when
//     many tie with the k-th: search path), sorted in score order, the first k kept.
//   top-p alone: the total weight (one pass with exp), then the same with a floor of FAST_CAP / 2
//     to FAST_CAP ids, gathered and sorted in weight order. Every id left out has a weight at most
//     the least gathered one (weights rise with scores), so the gathered ids of greater weight are
//     the start of the host's weight order; when the cut falls among them it is the host's, else the
//     search path runs.
//   no filter: each thread sums the weights of a contiguous run of ids, a block scan of the run sums
//     gives each run's start, and each thread walks its run to the uniform.
// A path that gives up has written nothing and left the random state as it was. Sums are parallel
// in a fixed order, as the search path's: deterministic, equal to the host's up to rounding.

constexpr uint32_t FAST_CAP = SAMPLE_THREADS;  // one gathered id per thread

// Ids gathered from one row, with their weights, in list order once sorted.
struct Gathered {
    uint64_t key[FAST_CAP];   // score_rank of the id (0: padding, below every id)
    double weight[FAST_CAP];  // its weight (0 for padding)
    double prefix[FAST_CAP];  // inclusive prefix sums of `weight` in list order
    uint32_t count;           // ids gathered
};

// Smallest power of two >= n (n >= 1).
__device__ __forceinline__ uint32_t pow2_at_least(uint32_t n) { return n <= 1 ? 1u : 1u << (32 - __clz(n - 1)); }

// Gathers every id whose logit's order_key is >= hi_floor (at most FAST_CAP: the caller counted them),
// with its weight, in no particular order (sort_gathered orders them), and pads the list with zero
// entries up to `padded`. Returns the count. Every thread calls it.
__device__ uint32_t gather(const Row& r, uint64_t hi_floor, uint32_t padded, Gathered& g) {
    if (threadIdx.x == 0) g.count = 0;
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < r.vocab; i += SAMPLE_THREADS) {
        const float x = __ldg(r.logits + i);
        if (order_key(x) >= hi_floor) {
            const uint32_t at = atomicAdd(&g.count, 1u);
            if (at < FAST_CAP) {
                g.key[at] = score_rank(x, i);
                g.weight[at] = weight_of(r, x);
            }
        }
    }
    __syncthreads();
    const uint32_t n = min(g.count, FAST_CAP);
    for (uint32_t j = n + threadIdx.x; j < padded; j += SAMPLE_THREADS) {
        g.key[j] = 0;
        g.weight[j] = 0.0;
    }
    __syncthreads();
    return n;
}

// Whether entry a comes before entry b: score order (larger key first) or weight order (larger weight
// first, ties to the lower id, i.e. the larger low word of the key). Weights are never -0.0.
__device__ __forceinline__ bool before(const Gathered& g, uint32_t a, uint32_t b, bool by_weight) {
    if (by_weight) {
        const uint64_t wa = (uint64_t)__double_as_longlong(g.weight[a]);
        const uint64_t wb = (uint64_t)__double_as_longlong(g.weight[b]);
        if (wa != wb) return wa > wb;
        return (uint32_t)g.key[a] > (uint32_t)g.key[b];
    }
    return g.key[a] > g.key[b];
}

// Sorts the first `padded` entries (a power of two <= FAST_CAP) into list order: a bitonic network,
// one entry per thread. The keys are distinct, so the order does not depend on the gathering's.
// Every thread calls it.
__device__ void sort_gathered(Gathered& g, uint32_t padded, bool by_weight) {
    const uint32_t i = threadIdx.x;
    for (uint32_t size = 2; size <= padded; size *= 2) {
        for (uint32_t stride = size / 2; stride > 0; stride /= 2) {
            const uint32_t j = i ^ stride;
            if (i < padded && j > i) {
                // Runs of `size` alternate direction; the last merge (size == padded) is all in list order.
                const bool in_order = (i & size) == 0;
                if (in_order ? before(g, j, i, by_weight) : before(g, i, j, by_weight)) {
                    const uint64_t key = g.key[i];
                    g.key[i] = g.key[j];
                    g.key[j] = key;
                    const double weight = g.weight[i];
                    g.weight[i] = g.weight[j];
                    g.weight[j] = weight;
                }
            }
            __syncthreads();
        }
    }
}

// g.prefix[j] = weight[0] + ... + weight[j] for j < n (n <= FAST_CAP) in a fixed order: a scan over
// the lanes of each warp, then the totals of the warps before it. Every thread calls it.
__device__ void scan_gathered(Gathered& g, uint32_t n) {
    __shared__ double warp_total[SAMPLE_WARPS];
    const uint32_t i = threadIdx.x, lane = i % 32, warp = i / 32;
    double v = i < n ? g.weight[i] : 0.0;
#pragma unroll
    for (uint32_t d = 1; d < 32; d *= 2) {
        const double below = __shfl_up_sync(mx::FULL_MASK, v, d);
        if (lane >= d) v = __dadd_rn(below, v);
    }
    if (lane == 31) warp_total[warp] = v;
    __syncthreads();
    double base = 0.0;
    for (uint32_t w = 0; w < warp; ++w) base = __dadd_rn(base, warp_total[w]);
    if (i < n) g.prefix[i] = __dadd_rn(base, v);
    __syncthreads();
}

// The first j < n with pred(j), or n when there is none (n <= FAST_CAP). Every thread calls it.
template <typename Pred>
__device__ uint32_t first_index(uint32_t n, Pred pred) {
    const uint64_t j = threadIdx.x < n && pred(threadIdx.x) ? threadIdx.x : ~0ull;
    const uint64_t first = block_reduce(j, MinU64{});
    return first == ~0ull ? n : (uint32_t)first;
}

// Draws from the first `keep` entries of the sorted list as the host walks its list: the first entry
// of positive weight whose inclusive sum exceeds u * sum(kept); if rounding leaves none, the last
// entry of positive weight (the list starts with the top id, of weight 1). Advances the row's random
// state by one step and writes the id. Every thread calls it.
__device__ void draw_gathered(const SampleParams& p, uint32_t row, const Gathered& g, uint32_t keep) {
    const double target = draw_target(p, row, g.prefix[keep - 1]);
    uint32_t chosen = first_index(keep, [&](uint32_t j) { return g.weight[j] > 0.0 && g.prefix[j] > target; });
    if (chosen == keep) {
        const uint64_t j = threadIdx.x < keep && g.weight[threadIdx.x] > 0.0 ? threadIdx.x + 1 : 0;
        chosen = (uint32_t)block_reduce(j, MaxU64{}) - 1;
    }
    if (threadIdx.x == 0) p.out_ids[row] = id_of((uint32_t)g.key[chosen]);
}

// An order_key floor and the number of ids whose logit's order_key is at or above it.
struct Floor {
    uint64_t hi;
    uint32_t count;
};

// A floor h in [0, max_hi] with least <= count(h) <= most, where count(h) is the number of ids whose
// logit's order_key is >= h (non-increasing in h, and count(0) = vocab > most >= least): the search
// on counts, ended at the first pass that finds such an h, usually long before the search to one
// value would. When no h has at most `most` (ties), the largest h with count(h) >= least. Every
// thread calls it.
__device__ Floor floor_with_count_in(const Row& r, uint64_t max_hi, uint32_t least, uint32_t most) {
    Floor f{0, r.vocab};
    const auto judge = [&](const Candidates& c) {
        uint32_t n[SEARCH_CANDIDATES];
        count_at_candidates(r, c, n);
        const uint32_t holds = holding(n, [&](uint32_t v) { return v >= least; });
        // The last candidate that holds, with its count (an unrolled walk: n stays in registers).
#pragma unroll
        for (uint32_t j = 0; j < SEARCH_CANDIDATES; ++j) {
            if (j < c.count && (holds >> j & 1u)) f = Floor{c.base + ((uint64_t)(j + 1) << c.shift), n[j]};
        }
        return Verdict{holds, f.count <= most};
    };
    largest_value(Candidates{false, 0, 0, 0, 0}, 0, max_hi, judge);
    return f;
}

// The number of ids whose logit's order_key is above h. Every thread calls it.
__device__ uint32_t count_above(const Row& r, uint64_t h) {
    uint32_t n[SEARCH_CANDIDATES];
    count_at_candidates(r, Candidates{false, 0, h, 0, 1}, n);
    return n[0];
}

// top-k with k <= FAST_CAP, then top-p when p_active. max_hi: order_key of the top logit.
__device__ bool fast_top_k(const SampleParams& p, uint32_t row, const Row& r, uint64_t max_hi, uint32_t top_k,
                           float top_p, bool p_active, Gathered& g) {
    // A floor with at least k and at most FAST_CAP ids at or above it (the whole row when it fits):
    // sorted in score order, its first k are the top-k.
    const Floor f = r.vocab <= FAST_CAP ? Floor{0, r.vocab} : floor_with_count_in(r, max_hi, top_k, FAST_CAP);
    if (f.count > FAST_CAP) return false;
    const uint32_t padded = pow2_at_least(f.count);
    gather(r, f.hi, padded, g);
    sort_gathered(g, padded, false);
    scan_gathered(g, top_k);  // the first k entries are the top-k
    uint32_t keep = top_k;
    if (p_active) {
        const double threshold = __dmul_rn((double)top_p, g.prefix[top_k - 1]);
        const uint32_t cut = first_index(top_k, [&](uint32_t j) { return g.prefix[j] >= threshold; });
        keep = cut == top_k ? top_k : cut + 1;
    }
    draw_gathered(p, row, g, keep);
    return true;
}

// top-p alone; false when the cut does not fall among the gathered ids of greater weight than the
// least gathered one.
__device__ bool fast_top_p(const SampleParams& p, uint32_t row, const Row& r, uint64_t max_hi, float top_p,
                           Gathered& g) {
    const double total = mass_from(r, Order::ByWeight, Key{0, 0u});
    // Every id when the row fits; else the ids at or above a floor with FAST_CAP / 2 to FAST_CAP ids
    // at or above it, or, when ties allow none, the next floor up (fewer than FAST_CAP / 2 ids; none
    // when more than FAST_CAP tie with the top).
    Floor f{0, r.vocab};
    if (r.vocab > FAST_CAP) {
        f = floor_with_count_in(r, max_hi, FAST_CAP / 2, FAST_CAP);
        if (f.count > FAST_CAP) f = Floor{f.hi + 1, count_above(r, f.hi)};
    }
    const uint64_t h = f.hi;
    const uint32_t n = f.count;
    if (n == 0 || n > FAST_CAP) return false;
    const uint32_t padded = pow2_at_least(n);
    gather(r, h, padded, g);
    sort_gathered(g, padded, true);
    scan_gathered(g, n);
    // The leading entries of weight above the least gathered one (all of them when every id is here).
    const double least = g.weight[n - 1];
    const uint32_t m = h == 0 ? n : first_index(n, [&](uint32_t j) { return !(g.weight[j] > least); });
    const double threshold = __dmul_rn((double)top_p, total);
    if (m == 0 || !(g.prefix[m - 1] >= threshold)) return false;
    const uint32_t cut = first_index(m, [&](uint32_t j) { return g.prefix[j] >= threshold; });
    draw_gathered(p, row, g, cut + 1);
    return true;
}

// No filter: the host walks the ids in order.
__device__ void fast_by_id(const SampleParams& p, uint32_t row, const Row& r, Gathered& g) {
    const uint32_t run = (r.vocab + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
    const uint32_t begin = min(threadIdx.x * run, r.vocab);
    const uint32_t end = min(begin + run, r.vocab);
    double sum = 0.0;
    uint64_t last_positive = 0;  // id + 1 of the run's last id of positive weight; 0: none
    for (uint32_t i = begin; i < end; ++i) {
        const double w = weight_of(r, __ldg(r.logits + i));
        sum = __dadd_rn(sum, w);
        if (w > 0.0) last_positive = i + 1;
    }
    g.weight[threadIdx.x] = sum;
    __syncthreads();
    scan_gathered(g, SAMPLE_THREADS);
    const double target = draw_target(p, row, g.prefix[SAMPLE_THREADS - 1]);
    double cumulative = threadIdx.x == 0 ? 0.0 : g.prefix[threadIdx.x - 1];
    uint64_t found = ~0ull;
    for (uint32_t i = begin; i < end; ++i) {
        const double w = weight_of(r, __ldg(r.logits + i));
        cumulative = __dadd_rn(cumulative, w);
        if (w > 0.0 && cumulative > target) {
            found = i;
            break;
        }
    }
    found = block_reduce(found, MinU64{});
    if (found == ~0ull) found = block_reduce(last_positive, MaxU64{}) - 1;  // the top id has weight 1
    if (threadIdx.x == 0) p.out_ids[row] = (uint32_t)found;
}

// The fast path of a row whose parameters and logits passed the checks: true when it wrote the id
// (and advanced the random state), false when the search path must run (nothing changed).
__device__ bool sample_fast(const SampleParams& p, uint32_t row, const Row& r, uint64_t max_hi, uint32_t top_k,
                            float top_p, bool k_active, bool p_active) {
    __shared__ Gathered g;
    if (k_active) return top_k <= FAST_CAP && fast_top_k(p, row, r, max_hi, top_k, top_p, p_active, g);
    if (p_active) return fast_top_p(p, row, r, max_hi, top_p, g);
    fast_by_id(p, row, r, g);
    return true;
}

__device__ void sample_body(const SampleParams& p) {
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
        const uint64_t rank = score_rank(x, i);
        top = rank > top ? rank : top;
    }
    bad = block_reduce(bad, MaxU32{});
    top = block_reduce(top, MaxU64{});
    if (bad != 0) {
        if (threadIdx.x == 0) p.out_ids[row] = SAMPLE_NON_FINITE;
        return;
    }
    const float top_logit = __ldg(r.logits + id_of((uint32_t)(top & 0xFFFFFFFFu)));
    r.top_score = __ddiv_rn((double)top_logit, r.temperature);

    const bool k_active = top_k > 0 && top_k < r.vocab;
    const bool p_active = top_p < 1.0f;
    if (p.fast != 0 && sample_fast(p, row, r, order_key(top_logit), top_k, top_p, k_active, p_active)) return;
    // The host walks its list unsorted without filters, sorted by score after top-k, and sorted by
    // weight (ties to the lower id) after top-p alone.
    const Order order = k_active ? Order::ByScore : (p_active ? Order::ByWeight : Order::ById);
    uint64_t max_hi = 0;
    if (order == Order::ByScore) max_hi = order_key(top_logit);
    if (order == Order::ByWeight) max_hi = (uint64_t)__double_as_longlong(1.0);  // the top weight

    // Kept set: key >= floor.
    Key floor{0, 0u};
    if (k_active) {
        // The k-th key in score order: the largest t with count(key >= t) >= k.
        floor = largest_key(r, max_hi, [&](const Candidates& c) {
            uint32_t n[SEARCH_CANDIDATES];
            count_at_candidates(r, c, n);
            return holding(n, [&](uint32_t v) { return v >= top_k; });
        });
    }
    if (p_active) {
        // The shortest prefix of the kept whose mass reaches p * total: the largest t with
        // mass(key >= floor and >= t) >= threshold (t <= floor gives the total, which reaches it).
        const double threshold = __dmul_rn((double)top_p, mass_from(r, order, floor));
        floor = largest_key(r, max_hi, [&](const Candidates& c) {
            double m[SEARCH_CANDIDATES];
            mass_at_candidates(r, order, floor, c, m);
            return holding(m, [&](double v) { return v >= threshold; });
        });
    }

    const double total = mass_from(r, order, floor);
    const double target = draw_target(p, row, total);

    Key chosen;
    if (total > target) {
        // The first token of the walk whose inclusive cumulative weight exceeds the target: the
        // largest t with mass(key >= floor and >= t) > target (t <= floor gives the total).
        chosen = largest_key(r, max_hi, [&](const Candidates& c) {
            double m[SEARCH_CANDIDATES];
            mass_at_candidates(r, order, floor, c, m);
            return holding(m, [&](double v) { return v > target; });
        });
    } else {
        chosen = last_positive(r, order, floor);
    }
    if (threadIdx.x == 0) p.out_ids[row] = id_of(chosen.lo);
}

}  // namespace

#define MX_DEFINE(symbol)                            \
    MX_ENTRY(symbol, (SAMPLE_THREADS), SampleParams, \
        sample_body(p))
MIXTRAL_SAMPLE_VARIANTS(MX_DEFINE)
#undef MX_DEFINE
