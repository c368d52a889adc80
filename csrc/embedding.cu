// embedding.cu: token-id gather.
//
//   ids   [tokens] u32
//   table [vocab, hidden] bf16
//   out   [tokens, hidden] bf16 (OUT_F32 = 0) or f32 (OUT_F32 = 1)
//
//   out[t, :] = table[ids[t], :]; an id >= vocab gives a row of zeros (ids are validated on the host,
//   this only keeps a bad id from reading outside the table).
//
// Grid: one block of EMBEDDING_THREADS per token. Pure data movement, no math.
#include "common.cuh"

namespace {

template <int OUT_F32>
__device__ void embedding_body(const EmbeddingParams& p) {
    const uint32_t t = blockIdx.x;
    if (t >= p.tokens) return;
    const uint32_t id = p.ids[t];
    const bool valid = id < p.vocab;
    const mx_bf16* src = p.table + (size_t)(valid ? id : 0) * p.hidden;
    for (uint32_t i = threadIdx.x; i < p.hidden; i += EMBEDDING_THREADS) {
        const float value = valid ? mx::to_f32(src[i]) : 0.0f;
        if constexpr (OUT_F32 != 0) {
            static_cast<float*>(p.out)[(size_t)t * p.hidden + i] = value;
        } else {
            static_cast<mx_bf16*>(p.out)[(size_t)t * p.hidden + i] = mx::to_bf16(value);
        }
    }
}

}  // namespace

#define MX_DEFINE(symbol, OUT_F32)                         \
    MX_ENTRY(symbol, (EMBEDDING_THREADS), EmbeddingParams, \
        embedding_body<OUT_F32>(p))
MIXTRAL_EMBEDDING_VARIANTS(MX_DEFINE)
#undef MX_DEFINE
