// slot_tiles.cuh: which expert a block of the decode expert GEMVs (moe_gemv.cu, qmoe.cu) serves, and
// how it walks that expert's routed slots [begin, end) of sorted_slots in tiles (slots computed per
// pass over the expert's weight rows).
//
// Grid row blockIdx.y serves the y-th expert, in expert order, among those with slots: a batch of
// `slots` routed slots has at most min(experts, slots) such experts, so the grid has that many rows
// (2 for one token over top-2 of 8 experts, not 8), and a row past the last expert with slots has
// nothing to do.
//
// The kernel variant's MAX_TILE comes from the batch size; the tiles actually used come from the
// expert's own slot count, known only on the device: full MAX_TILE tiles while more than half a tile
// is left, then the smallest compiled tile (1, 2, 4 or MAX_TILE) covering what remains. An expert with
// 2 slots in a batch of 8 tokens takes one pass of a 2-slot tile instead of an 8-slot tile padded with
// 6 repeats, so the arithmetic and activation reads follow the slots, while every weight row is still
// read once per tile.
#pragma once

#include <stdint.h>

namespace mx {

// The expert grid row blockIdx.y serves and its slots [begin, end) into sorted_slots (the router's
// expert_offsets [experts + 1], clamped to the slot count); begin == end when fewer experts than
// grid rows have slots. Block-uniform: every thread reads the same offsets.
__device__ __forceinline__ uint32_t active_expert(const int32_t* expert_offsets, uint32_t experts,
                                                  int32_t slots, int32_t& begin, int32_t& end) {
    begin = 0;
    end = 0;
    uint32_t seen = 0;
    int32_t next = max(0, min(expert_offsets[0], slots));
    for (uint32_t e = 0; e < experts; ++e) {
        const int32_t first = next;
        next = max(first, min(expert_offsets[e + 1], slots));
        if (next == first) continue;
        if (seen == blockIdx.y) {
            begin = first;
            end = next;
            return e;
        }
        ++seen;
    }
    return 0;
}

// A compile-time tile width handed to the per-tile body.
template <int N>
struct SlotTile {
    static constexpr int value = N;
};

// Calls body(SlotTile<T>{}, first) for consecutive tiles covering [begin, end), T <= MAX_TILE: full
// MAX_TILE tiles while more than MAX_TILE / 2 slots are left, then at most one narrower tile for the
// rest (which is at most MAX_TILE / 2: one tile of 4, 2 or 1 covers it). The body must handle
// first + j >= end (a tile wider than what is left) itself.
template <int MAX_TILE, typename Body>
__device__ __forceinline__ void for_slot_tiles(int32_t begin, int32_t end, Body&& body) {
    static_assert(MAX_TILE == 1 || MAX_TILE == 2 || MAX_TILE == 4 || MAX_TILE == 8, "compiled tiles");
    int32_t first = begin;
    for (; end - first > MAX_TILE / 2; first += MAX_TILE) body(SlotTile<MAX_TILE>{}, first);
    const int32_t left = end - first;
    if constexpr (MAX_TILE >= 8) {
        if (left > 2) {
            body(SlotTile<4>{}, first);
            return;
        }
    }
    if constexpr (MAX_TILE >= 4) {
        if (left == 2) {
            body(SlotTile<2>{}, first);
            return;
        }
    }
    if (left == 1) body(SlotTile<1>{}, first);
}

}  // namespace mx
