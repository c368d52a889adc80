// router.cu: the MoE router in one kernel, `router`: one block of ROUTER_THREADS per token.
//
// Every block, for its token t (one warp per expert at a time for the products, then thread 0):
//   x [tokens, hidden] bf16, gate [experts, hidden] bf16 (hidden a multiple of 8)
//   logits[t, e]    = x[t] . gate[e]                         f32 accumulation, [tokens, experts]
//   p[t, :]         = softmax(logits[t, :]) over all experts  f32, accurate expf
//   topk_ids[t, j]  = the j-th largest p (ties: lower expert index), [tokens, top_k] i32
//   topk_weights[t, j] = p[t, topk_ids[t, j]] / sum_j' p[t, topk_ids[t, j']], [tokens, top_k] f32
//
// The last block to finish its top-k (a ticket from the atomic counter `done`, taken after a
// __threadfence that publishes the block's top-k) then groups every slot s = t * top_k + j with its
// first warp, reading the other blocks' top-k through L2 (ld.global.cg), and sets `done` back to 0
// for the next launch (the counter starts at 0: it is allocated zeroed):
//   expert_counts [experts] i32: slots routed to each expert
//   expert_offsets [experts + 1] i32: exclusive prefix sum of the counts
//   sorted_slots [tokens * top_k] i32: the slots grouped by expert, ascending slot within an expert
//   (a stable counting sort: deterministic, so decode steps replay identically).
// One launch per layer where there were two (top-k, then a one-warp grouping kernel).
//
// experts <= ROUTER_MAX_EXPERTS, top_k <= ROUTER_MAX_TOP_K, checked by the Rust launcher.
// No fast math: softmax and selection must match the CPU reference.
//
// The single-kernel form has not run on a GPU (the two-kernel one passed
// tests/gpu_kernels/router.rs on an H100 on 2026-11-28).
#include "common.cuh"

namespace {

// Thread 0 of token t's block: softmax of the logits in `prob` and the top-k with renormalised
// weights.
__device__ void select_top_k(const RouterParams& p, uint32_t t, float* prob, unsigned char* taken) {
    // Softmax over all experts (a handful: one thread is enough).
    float max_logit = -INFINITY;
    for (uint32_t e = 0; e < p.experts; ++e) max_logit = fmaxf(max_logit, prob[e]);
    float total = 0.0f;
    for (uint32_t e = 0; e < p.experts; ++e) {
        prob[e] = expf(prob[e] - max_logit);
        total += prob[e];
    }
    for (uint32_t e = 0; e < p.experts; ++e) prob[e] /= total;

    // Top-k by repeated selection; a strict `>` keeps the lower index on ties.
    float chosen_sum = 0.0f;
    for (uint32_t j = 0; j < p.top_k; ++j) {
        uint32_t best = ROUTER_MAX_EXPERTS;  // none yet: the first expert not taken always qualifies
        float best_p = 0.0f;
        for (uint32_t e = 0; e < p.experts; ++e) {
            if (!taken[e] && (best == ROUTER_MAX_EXPERTS || prob[e] > best_p)) {
                best = e;
                best_p = prob[e];
            }
        }
        taken[best] = 1;
        chosen_sum += best_p;
        p.topk_ids[(size_t)t * p.top_k + j] = (int32_t)best;
        p.topk_weights[(size_t)t * p.top_k + j] = best_p;
    }
    for (uint32_t j = 0; j < p.top_k; ++j) p.topk_weights[(size_t)t * p.top_k + j] /= chosen_sum;
}

// Token blockIdx.x's logits (one warp per expert at a time), then its softmax and top-k.
__device__ void top_k_of_token(const RouterParams& p, float* prob, unsigned char* taken) {
    const uint32_t t = blockIdx.x;
    const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const mx_bf16* x = p.x + (size_t)t * p.hidden;

    for (uint32_t e = warp; e < p.experts; e += ROUTER_THREADS / 32) {
        const mx_bf16* g = p.gate + (size_t)e * p.hidden;
        float acc = 0.0f;
        for (uint32_t c = lane * 8; c < p.hidden; c += 32 * 8) {
            acc = mx::dot8(mx::load_stream_16(g + c), mx::load_shared_16(x + c), acc);
        }
        acc = mx::group_sum(acc);
        if (lane == 0) {
            prob[e] = acc;
            taken[e] = 0;
            p.logits[(size_t)t * p.experts + e] = acc;
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) select_top_k(p, t, prob, taken);
}

// The grouping of every slot by expert, by the first warp of the last block (`cursor`: shared,
// ROUTER_MAX_EXPERTS entries). The top-k of the other blocks is read through L2: this block's L1
// never held it.
__device__ void group_slots(const RouterParams& p, int32_t* cursor) {
    const uint32_t lane = threadIdx.x;
    const uint32_t slots = p.tokens * p.top_k;
    for (uint32_t e = lane; e < p.experts; e += 32) cursor[e] = 0;
    __syncwarp();

    for (uint32_t i = lane; i < slots; i += 32) {
        const int32_t e = __ldcg(p.topk_ids + i);
        if (e >= 0 && (uint32_t)e < p.experts) atomicAdd(&cursor[e], 1);
    }
    __syncwarp();

    if (lane == 0) {
        int32_t offset = 0;
        for (uint32_t e = 0; e < p.experts; ++e) {
            const int32_t count = cursor[e];
            p.expert_counts[e] = count;
            p.expert_offsets[e] = offset;
            cursor[e] = offset;
            offset += count;
        }
        p.expert_offsets[p.experts] = offset;
    }
    __syncwarp();

    // Stable placement, 32 slots at a time in slot order: a lane's rank among the lanes of the same
    // expert comes from a match mask; the lowest such lane then advances that expert's cursor.
    const uint32_t lanes_below = (1u << lane) - 1u;
    for (uint32_t base = 0; base < slots; base += 32) {
        const uint32_t i = base + lane;
        int32_t e = i < slots ? __ldcg(p.topk_ids + i) : -1;
        if (e < 0 || (uint32_t)e >= p.experts) e = -1;
        const uint32_t peers = __match_any_sync(mx::FULL_MASK, e);
        const int32_t rank = __popc(peers & lanes_below);
        int32_t start = 0;
        if (e >= 0) start = cursor[e];
        __syncwarp();
        if (e >= 0) {
            p.sorted_slots[start + rank] = (int32_t)i;
            if (rank == 0) cursor[e] = start + __popc(peers);
        }
        __syncwarp();
    }
}

__device__ void router_body(const RouterParams& p) {
    __shared__ float prob[ROUTER_MAX_EXPERTS];
    __shared__ unsigned char taken[ROUTER_MAX_EXPERTS];
    __shared__ int32_t cursor[ROUTER_MAX_EXPERTS];
    __shared__ bool last;
    if (blockIdx.x >= p.tokens) return;  // uniform over the block (never launched by the host)
    top_k_of_token(p, prob, taken);
    if (threadIdx.x == 0) {
        __threadfence();  // this block's top-k is visible device-wide before its ticket
        last = atomicAdd(p.done, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last || threadIdx.x >= 32) return;  // uniform over the block, then over warp 0
    __threadfence();  // every other block's top-k (published before its ticket) is read after ours
    group_slots(p, cursor);
    if (threadIdx.x == 0) *p.done = 0u;
}

}  // namespace

#define MX_DEFINE(symbol)                            \
    MX_ENTRY(symbol, (ROUTER_THREADS), RouterParams, \
        router_body(p))
MIXTRAL_ROUTER_VARIANTS(MX_DEFINE)
#undef MX_DEFINE
