// qmoe.cu: the expert MLP of decode batches over packed quantized expert stacks (FP8, INT8, 4-bit
// integer or 4-bit table codes, the layout of src/packed/mod.rs; decoding in csrc/quant.cuh), SwiGLU
// fused: moe_gemv.cu with packed weights, over the slots the router grouped by expert
// (slot s = t * top_k + j).
//
//   x       [tokens, hidden] bf16                         normalised hidden states (16-byte aligned)
//   w1, w3  [experts, inter] packed rows of hidden cols    codes [experts, inter, w13_row_bytes] u8,
//                                                          params [experts, inter, w13_row_params] 32-bit
//   w13_perm [experts, hidden] u32 or null                 shared by w1 and w3
//   w2      [experts, hidden] packed rows of inter cols    codes [experts, hidden, w2_row_bytes] u8,
//                                                          params [experts, hidden, w2_row_params] 32-bit
//   w2_perm [experts, inter] u32 or null
//   table   [QUANT_TABLE_VALUES] f32                       LUT4 only: the values of the 4-bit codes
//   act     [tokens * top_k, inter] bf16    qmoe_up:   act[s] = silu(w1[e] x[t]) * (w3[e] x[t])
//   out     [tokens * top_k, hidden] f32    qmoe_down: out[s] = topk_weights[s] * (w2[e] act[s])
// where w[e] x sums w[e][r][j] * x[perm[e][j]] over the stored columns j (x[j] without perm).
//
// qmoe_up_{fp8,int8,int4,lut4}_t{TILE}: each warp owns row `row` of w1[e] and of w3[e]; qmoe_down: each warp
//   owns MOE_DOWN_ROWS_PER_WARP rows of w2[e]. Each lane takes every 32nd 16-byte chunk of codes and
//   issues QUANT_UNROLL streaming loads per row (halved for TILE >= 4) before decoding them in
//   registers; every weight row is read once per tile of an expert's slots (slot_tiles.cuh: at most
//   TILE from the batch size, as moe_gemv, narrower where the expert has fewer slots). Grids and block size are moe_gemv's: (ceil(inter / MOE_WARPS), active) and
//   (ceil(hidden / (MOE_WARPS * MOE_DOWN_ROWS_PER_WARP)), experts), MOE_WARPS * 32 threads. hidden
//   and inter are multiples of 16 (8-bit) / 32 (4-bit), group_size of 32, codes / x / act / perm
//   16-byte aligned (checked by the Rust launcher). Slots and offsets outside their ranges are skipped.
//   LUT4 reads its 64-byte table into shared memory once per block, before any warp returns.
//
// No fast math: expf in silu stays accurate (it is not on the critical path).
//
// Ran on an H100 (2026-11-28, benches/RESULTS.md): tests/gpu_kernels/quant.rs passes against the
// CPU reference for every kind and tile (LUT4, added later, not yet run on a GPU). Not yet run on sm_80.
#include "quant_mma.cuh"

namespace {

// The expert this block serves (slot_tiles.cuh: the blockIdx.y-th with slots) and its slots.
__device__ __forceinline__ uint32_t expert_range(const QMoeParams& p, int32_t& begin, int32_t& end) {
    return mx::active_expert(p.expert_offsets, p.experts, (int32_t)(p.tokens * p.top_k), begin, end);
}

template <int KIND, int MAX_TILE>
__device__ void qmoe_up_body(const QMoeParams& p) {
    mx::quant::load_table<KIND>(p.table);  // before any warp returns
    int32_t begin, end;
    const uint32_t expert = expert_range(p, begin, end);
    const uint32_t row = blockIdx.x * MOE_WARPS + threadIdx.x / 32;
    if (begin == end || row >= p.inter) return;  // no block-wide synchronisation follows
    const uint32_t lane = threadIdx.x % 32;
    const uint32_t slots = p.tokens * p.top_k;
    const size_t matrix_row = (size_t)expert * p.inter + row;
    const uint8_t* const codes[2] = {p.w1_codes + matrix_row * p.w13_row_bytes,
                                     p.w3_codes + matrix_row * p.w13_row_bytes};
    const float* const params[2] = {p.w1_params + matrix_row * p.w13_row_params,
                                    p.w3_params + matrix_row * p.w13_row_params};
    const uint32_t* perm = p.w13_perm != nullptr ? p.w13_perm + (size_t)expert * p.hidden : nullptr;
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
        mx::quant::dot_rows<KIND, 2, TILE>(codes, params, perm, a, p.hidden, p.group_size, acc);
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

template <int KIND, int MAX_TILE>
__device__ void qmoe_down_body(const QMoeParams& p) {
    constexpr int R = MOE_DOWN_ROWS_PER_WARP;
    static_assert(R * MAX_TILE <= 32, "one lane per output");
    mx::quant::load_table<KIND>(p.table);  // before any warp returns
    int32_t begin, end;
    const uint32_t expert = expert_range(p, begin, end);
    const uint32_t row0 = (blockIdx.x * MOE_WARPS + threadIdx.x / 32) * R;
    if (begin == end || row0 >= p.hidden) return;  // no block-wide synchronisation follows
    const uint32_t lane = threadIdx.x % 32;
    const uint32_t slots = p.tokens * p.top_k;
    // Rows past the end re-read the last row (in bounds); their results are never stored.
    const uint8_t* codes[R];
    const float* params[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const size_t matrix_row = (size_t)expert * p.hidden + min(row0 + r, p.hidden - 1);
        codes[r] = p.w2_codes + matrix_row * p.w2_row_bytes;
        params[r] = p.w2_params + matrix_row * p.w2_row_params;
    }
    const uint32_t* perm = p.w2_perm != nullptr ? p.w2_perm + (size_t)expert * p.inter : nullptr;
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
        mx::quant::dot_rows<KIND, R, TILE>(codes, params, perm, a, p.inter, p.group_size, acc);
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

// The row of matrix m (0: w1, 1: w3, 2: w2) `matrix_row` of the expert stacks, for the tensor-core
// decode kernels.
__device__ __forceinline__ mx::qmma::RowPtr qmoe_row(const QMoeParams& p, int m, size_t matrix_row) {
    switch (m) {
        case 0: return {p.w1_codes + matrix_row * p.w13_row_bytes, p.w1_params + matrix_row * p.w13_row_params};
        case 1: return {p.w3_codes + matrix_row * p.w13_row_bytes, p.w3_params + matrix_row * p.w13_row_params};
        default: return {p.w2_codes + matrix_row * p.w2_row_bytes, p.w2_params + matrix_row * p.w2_row_params};
    }
}

}  // namespace

#define MX_DEFINE(symbol, KIND, TILE)                 \
    MX_ENTRY(symbol, (MOE_WARPS * 32, 1), QMoeParams, \
        qmoe_up_body<KIND, TILE>(p))
MIXTRAL_QMOE_UP_VARIANTS(MX_DEFINE)
#undef MX_DEFINE

#define MX_DEFINE(symbol, KIND, TILE)                 \
    MX_ENTRY(symbol, (MOE_WARPS * 32, 1), QMoeParams, \
        qmoe_down_body<KIND, TILE>(p))
MIXTRAL_QMOE_DOWN_VARIANTS(MX_DEFINE)
#undef MX_DEFINE

// qmoe_mma_up / qmoe_mma_down: the expert MLP on the tensor cores (quant_mma.cuh: FP8, INT8, INT4 in groups
// of multiples of 128).
#define MX_DEFINE(symbol, KIND, MAX_NT)                                                                        \
    MX_ENTRY(symbol, (QMMA_WARPS * 32, 1), QMoeParams,                                                         \
        mx::qmma::expert_up<KIND, MAX_NT>(p, p.group_size, [&](int m, size_t r) { return qmoe_row(p, m, r); }))
MIXTRAL_QMOE_MMA_UP_VARIANTS(MX_DEFINE)
#undef MX_DEFINE

#define MX_DEFINE(symbol, KIND, MAX_NT)                                                                          \
    MX_ENTRY(symbol, (QMMA_WARPS * 32, 1), QMoeParams,                                                           \
        mx::qmma::expert_down<KIND, MAX_NT>(p, p.group_size, [&](int m, size_t r) { return qmoe_row(p, m, r); }))
MIXTRAL_QMOE_MMA_DOWN_VARIANTS(MX_DEFINE)
#undef MX_DEFINE
