// moe_gemv.cu: the expert MLP for decode batches, GEMV style, SwiGLU fused, over the slots the router
// grouped by expert (slot s = t * top_k + j; the router's expert_offsets / sorted_slots).
//
//   x     [tokens, hidden] bf16                normalised hidden states
//   w1,w3 [experts, inter, hidden] bf16        row-major [out, in] per expert
//   w2    [experts, hidden, inter] bf16
//   act   [tokens * top_k, inter] bf16         moe_up:   act[s] = silu(w1[e] x[t]) * (w3[e] x[t])
//   out   [tokens * top_k, hidden] f32         moe_down: out[s] = topk_weights[s] * (w2[e] act[s])
// The rmsnorm that follows sums out[t * top_k + j] over j into the residual (deterministic: no atomics).
//
// Bandwidth is the whole game: each warp owns weight rows (moe_up: row r of w1 and of w3; moe_down:
// MOE_DOWN_ROWS_PER_WARP rows of w2), each lane issues MOE_UNROLL 16-byte streaming loads per row before
// using them (LDG.E.128, no L1 allocation), and every weight row is read once per tile of an expert's
// slots (slot_tiles.cuh: tiles sized by the expert's own slot count), while the small activation rows
// are shared by all warps through L1. Blocks are launched only for the experts that can have slots
// (slot_tiles.cuh: min(experts, tokens * top_k) grid rows, row y serving the y-th expert with slots).
// hidden and inter are multiples of 8 and the buffers
// 16-byte aligned (checked by the Rust launcher).
//
// Grids: moe_up (ceil(inter / MOE_WARPS), active), moe_down
// (ceil(hidden / (MOE_WARPS * MOE_DOWN_ROWS_PER_WARP)), active), active = min(experts, tokens * top_k);
// MOE_WARPS * 32 threads.
// MAX_TILE (the widest tile, from the batch size) is the template constant: 1, 2, 4 or 8.
// No fast math: expf in silu stays accurate (it is not on the critical path).
#include "quant_mma.cuh"

namespace {

constexpr uint32_t WARP_STEP = 32 * 8;  // bf16 elements one warp covers with one 16-byte load per lane

// acc[r][j] = w[r] . a[j] over `len` elements (len % 8 == 0); every lane returns the full sums.
template <int R, int TILE>
__device__ __forceinline__ void dot_rows(const mx_bf16* const (&w)[R], const mx_bf16* const (&a)[TILE],
                                         uint32_t len, float (&acc)[R][TILE]) {
    const uint32_t lane = threadIdx.x % 32;
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int j = 0; j < TILE; ++j) acc[r][j] = 0.0f;
    }
    for (uint32_t base = 0; base < len; base += WARP_STEP * MOE_UNROLL) {
        uint4 wv[R][MOE_UNROLL];
#pragma unroll
        for (int u = 0; u < (int)MOE_UNROLL; ++u) {
            const uint32_t c = base + u * WARP_STEP + lane * 8;
#pragma unroll
            for (int r = 0; r < R; ++r) wv[r][u] = c < len ? mx::load_stream_16(w[r] + c) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < (int)MOE_UNROLL; ++u) {
            const uint32_t c = base + u * WARP_STEP + lane * 8;
            if (c < len) {
#pragma unroll
                for (int j = 0; j < TILE; ++j) {
                    const uint4 av = mx::load_shared_16(a[j] + c);
#pragma unroll
                    for (int r = 0; r < R; ++r) acc[r][j] = mx::dot8(wv[r][u], av, acc[r][j]);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int j = 0; j < TILE; ++j) acc[r][j] = mx::group_sum(acc[r][j]);
    }
}

// The expert this block serves (slot_tiles.cuh: the blockIdx.y-th with slots) and its slots.
__device__ __forceinline__ uint32_t expert_range(const MoeParams& p, int32_t& begin, int32_t& end) {
    return mx::active_expert(p.expert_offsets, p.experts, (int32_t)(p.tokens * p.top_k), begin, end);
}

template <int MAX_TILE>
__device__ void moe_up_body(const MoeParams& p) {
    int32_t begin, end;
    const uint32_t expert = expert_range(p, begin, end);
    const uint32_t row = blockIdx.x * MOE_WARPS + threadIdx.x / 32;
    if (begin == end || row >= p.inter) return;  // no block-wide synchronisation follows
    const uint32_t lane = threadIdx.x % 32;
    const uint32_t slots = p.tokens * p.top_k;
    const size_t row_offset = ((size_t)expert * p.inter + row) * p.hidden;
    const mx_bf16* const w[2] = {p.w1 + row_offset, p.w3 + row_offset};
    mx::for_slot_tiles<MAX_TILE>(begin, end, [&](auto width, int32_t tile) {
        constexpr int TILE = decltype(width)::value;
        uint32_t slot[TILE];
        const mx_bf16* a[TILE];
#pragma unroll
        for (int j = 0; j < TILE; ++j) {
            slot[j] = (uint32_t)p.sorted_slots[min(tile + j, end - 1)];
            a[j] = p.x + (size_t)(slot[j] < slots ? slot[j] / p.top_k : 0) * p.hidden;
        }
        float acc[2][TILE];
        dot_rows<2, TILE>(w, a, p.hidden, acc);
#pragma unroll
        for (int j = 0; j < TILE; ++j) {
            if (lane == (uint32_t)j && tile + j < end && slot[j] < slots) {
                const float gate = acc[0][j];
                const float silu = gate / (1.0f + expf(-gate));
                p.act[(size_t)slot[j] * p.inter + row] = mx::to_bf16(silu * acc[1][j]);
            }
        }
    });
}

template <int MAX_TILE>
__device__ void moe_down_body(const MoeParams& p) {
    constexpr int R = MOE_DOWN_ROWS_PER_WARP;
    static_assert(R * MAX_TILE <= 32, "one lane per output");
    int32_t begin, end;
    const uint32_t expert = expert_range(p, begin, end);
    const uint32_t row0 = (blockIdx.x * MOE_WARPS + threadIdx.x / 32) * R;
    if (begin == end || row0 >= p.hidden) return;  // no block-wide synchronisation follows
    const uint32_t lane = threadIdx.x % 32;
    const uint32_t slots = p.tokens * p.top_k;
    const mx_bf16* w[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        w[r] = p.w2 + ((size_t)expert * p.hidden + min(row0 + r, p.hidden - 1)) * p.inter;
    }
    mx::for_slot_tiles<MAX_TILE>(begin, end, [&](auto width, int32_t tile) {
        constexpr int TILE = decltype(width)::value;
        uint32_t slot[TILE];
        const mx_bf16* a[TILE];
#pragma unroll
        for (int j = 0; j < TILE; ++j) {
            slot[j] = (uint32_t)p.sorted_slots[min(tile + j, end - 1)];
            a[j] = p.act + (size_t)(slot[j] < slots ? slot[j] : 0) * p.inter;
        }
        float acc[R][TILE];
        dot_rows<R, TILE>(w, a, p.inter, acc);
#pragma unroll
        for (int j = 0; j < TILE; ++j) {
#pragma unroll
            for (int r = 0; r < R; ++r) {
                if (lane == (uint32_t)(j * R + r) && tile + j < end && slot[j] < slots && row0 + r < p.hidden) {
                    p.out[(size_t)slot[j] * p.hidden + row0 + r] = p.topk_weights[slot[j]] * acc[r][j];
                }
            }
        }
    });
}

}  // namespace

#define MX_DEFINE(symbol, TILE)                   \
    MX_ENTRY(symbol, (MOE_WARPS * 32), MoeParams, \
        moe_up_body<TILE>(p))
MIXTRAL_MOE_UP_VARIANTS(MX_DEFINE)
#undef MX_DEFINE

#define MX_DEFINE(symbol, TILE)                   \
    MX_ENTRY(symbol, (MOE_WARPS * 32), MoeParams, \
        moe_down_body<TILE>(p))
MIXTRAL_MOE_DOWN_VARIANTS(MX_DEFINE)
#undef MX_DEFINE

// moe_mma_up / moe_mma_down: the expert MLP of a decode batch on the tensor cores (quant_mma.cuh, bf16
// weights as stored): every weight row of an expert read once per pass of up to 8 * MAX_NT slots.
namespace {
__device__ __forceinline__ mx::qmma::RowPtr moe_row(const MoeParams& p, int m, size_t matrix_row) {
    const mx_bf16* w = m == 0 ? p.w1 + matrix_row * p.hidden : m == 1 ? p.w3 + matrix_row * p.hidden
                                                                      : p.w2 + matrix_row * p.inter;
    return {reinterpret_cast<const uint8_t*>(w), nullptr};
}
}  // namespace

#define MX_DEFINE(symbol, MAX_NT)                                                                            \
    MX_ENTRY(symbol, (QMMA_WARPS * 32, 1), MoeParams,                                                        \
        mx::qmma::expert_up<QMMA_KIND_BF16, MAX_NT>(p, 0, [&](int m, size_t r) { return moe_row(p, m, r); }))
MIXTRAL_MOE_MMA_UP_VARIANTS(MX_DEFINE)
#undef MX_DEFINE

#define MX_DEFINE(symbol, MAX_NT)                                                                              \
    MX_ENTRY(symbol, (QMMA_WARPS * 32, 1), MoeParams,                                                          \
        mx::qmma::expert_down<QMMA_KIND_BF16, MAX_NT>(p, 0, [&](int m, size_t r) { return moe_row(p, m, r); }))
MIXTRAL_MOE_MMA_DOWN_VARIANTS(MX_DEFINE)
#undef MX_DEFINE
