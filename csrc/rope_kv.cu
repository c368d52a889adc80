// rope_kv.cu: rotary position embedding on q and k, fused with appending k and v to the paged cache.
//
//   q         [tokens, n_heads, head_dim] bf16 (row stride q_stride), rotated in place
//   k, v      [tokens, n_kv_heads, head_dim] bf16 (row strides k_stride, v_stride), read
//   k_cache,
//   v_cache   [num_blocks, block_size, n_kv_heads, head_dim] bf16, this layer's cache
//   block_tables [num_seqs, max_blocks_per_seq] i32, token_seq [tokens] i32, positions [tokens] i32
//   inv_freq  [head_dim / 2] f32, inv_freq[i] = theta^(-2i/head_dim), computed once on the host
//
// rotate_half convention: with c = cos(a_i), s = sin(a_i), a_i = positions[t] * inv_freq[i] (an f32
// product), dimension i pairs with i + head_dim/2:
//   x'[i] = x[i] * c - x[i + d/2] * s,    x'[i + d/2] = x[i + d/2] * c + x[i] * s.
// The rotated k and the unrotated v of token t land in cache slot
// (block_tables[token_seq[t], positions[t] / block_size], positions[t] % block_size); a token whose
// slot is out of range is not written (q is still rotated).
//
// Angles reach 32k radians (positions up to 32k): the f32 angle is reduced in double precision with
// sincospi, which is exact-range and needs no Payne-Hanek slow path (no local memory). No fast math.
//
// Grid: one block of ROPE_KV_THREADS per token; dynamic shared memory: head_dim/2 float2 (cos, sin).
#include "common.cuh"

namespace {

__device__ __forceinline__ void rotate_pair(const mx_bf16* src, mx_bf16* dst, uint32_t i, uint32_t half, float2 cs) {
    const float x0 = mx::to_f32(src[i]);
    const float x1 = mx::to_f32(src[i + half]);
    const float r0 = x0 * cs.x - x1 * cs.y;
    const float r1 = x1 * cs.x + x0 * cs.y;
    dst[i] = mx::to_bf16(r0);
    dst[i + half] = mx::to_bf16(r1);
}

__device__ void rope_kv_body(const RopeKvParams& p) {
    float2* cos_sin = mx::dynamic_shared<float2>();  // [head_dim / 2]
    const uint32_t t = blockIdx.x;
    if (t >= p.tokens) return;  // uniform over the block
    const uint32_t half = p.head_dim / 2;
    const int32_t pos = p.positions[t];
    for (uint32_t i = threadIdx.x; i < half; i += ROPE_KV_THREADS) {
        const float angle = (float)pos * p.inv_freq[i];
        double s, c;
        sincospi((double)angle * 0.31830988618379067154, &s, &c);  // sin/cos(angle), angle / pi in double
        cos_sin[i] = make_float2((float)c, (float)s);
    }
    __syncthreads();

    mx_bf16* q = p.q + (size_t)t * p.q_stride;
    for (uint32_t idx = threadIdx.x; idx < p.n_heads * half; idx += ROPE_KV_THREADS) {
        const uint32_t head = idx / half, i = idx % half;
        mx_bf16* row = q + head * p.head_dim;
        rotate_pair(row, row, i, half, cos_sin[i]);
    }

    const long long slot = mx::paged_slot(p.block_tables, p.token_seq[t], pos, p.num_seqs, p.max_blocks_per_seq,
                                          p.block_size, p.num_blocks);
    if (slot < 0) return;
    const size_t cache_row = (size_t)slot * p.n_kv_heads * p.head_dim;
    const mx_bf16* k = p.k + (size_t)t * p.k_stride;
    for (uint32_t idx = threadIdx.x; idx < p.n_kv_heads * half; idx += ROPE_KV_THREADS) {
        const uint32_t head = idx / half, i = idx % half;
        rotate_pair(k + head * p.head_dim, p.k_cache + cache_row + head * p.head_dim, i, half, cos_sin[i]);
    }
    const mx_bf16* v = p.v + (size_t)t * p.v_stride;
    for (uint32_t idx = threadIdx.x; idx < p.n_kv_heads * p.head_dim; idx += ROPE_KV_THREADS) {
        p.v_cache[cache_row + idx] = v[idx];
    }
}

}  // namespace

#define MX_DEFINE(symbol)                             \
    MX_ENTRY(symbol, (ROPE_KV_THREADS), RopeKvParams, \
        rope_kv_body(p))
MIXTRAL_ROPE_KV_VARIANTS(MX_DEFINE)
#undef MX_DEFINE
