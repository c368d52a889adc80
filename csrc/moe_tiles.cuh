// moe_tiles.cuh: the flattened tile list of the grouped expert GEMMs (moe_grouped.cu):
// expert-major tiles of BM slots over the router's per-expert grouping (expert_offsets into
// sorted_slots), one tile per block along grid x. The host sizes grid x for the worst routing
// (src/cuda/ops/moe_grouped.rs, max_tiles); blocks past the last real tile find none and exit.
#pragma once

#include "common.cuh"

namespace mx {

// The tile blockIdx.x of the flattened list (expert-major, BM slots per tile): its expert and its rows
// sorted_slots[begin, end) (end - begin in 1..=BM). False when the index is past the last tile.
// Offsets are clamped to [0, tokens * top_k] and made non-decreasing per expert (device data is not
// trusted).
template <int BM>
__device__ __forceinline__ bool find_moe_tile(const MoeParams& p, uint32_t& expert, int32_t& begin, int32_t& end) {
    const int32_t slots = (int32_t)(p.tokens * p.top_k);
    const long long index = blockIdx.x;
    long long first = 0;  // index of expert e's first tile
    for (uint32_t e = 0; e < p.experts; ++e) {
        const int32_t lo = max(0, min(p.expert_offsets[e], slots));
        const int32_t hi = max(lo, min(p.expert_offsets[e + 1], slots));
        const long long tiles = ((long long)(hi - lo) + BM - 1) / BM;
        if (index < first + tiles) {
            expert = e;
            begin = lo + (int32_t)(index - first) * BM;
            end = (int32_t)min((long long)begin + BM, (long long)hi);
            return true;
        }
        first += tiles;
    }
    return false;
}

}  // namespace mx
