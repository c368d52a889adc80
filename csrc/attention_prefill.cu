// attention_prefill.cu: causal flash attention (FlashAttention-2 style, bf16 tensor cores) of one
// sequence's prefill queries over the paged KV cache, GQA, optional sliding window.
//
//   q            [tokens, n_heads, head_dim] bf16 (row stride q_stride), already rotated
//   k_cache,
//   v_cache      [num_blocks, block_size, n_kv_heads, head_dim] bf16 (this step's keys already written)
//   block_tables [num_seqs, max_blocks_per_seq] i32; the sequence uses row seq_row
//   out          [tokens, n_heads, head_dim] bf16, contiguous
//
// Query token t sits at position p = start_pos + t and sees keys j with first_visible(p) <= j <= p,
// first_visible(p) = max(0, p + 1 - window) (window 0: 0); query head h reads KV head
// h / (n_heads / n_kv_heads). Scores are (q . k) * scale with the softmax in f32 (computed as exp2 of
// log2e-scaled scores: the same function). A key whose block-table entry is outside [0, num_blocks)
// is skipped (never read); a query with no key left gets zeros.
//
// Grid (ceil(tokens / QUERIES), n_heads), ATTENTION_PREFILL_THREADS = 128 threads (4 warps). A block
// owns QUERIES = 64 consecutive query tokens of one query head, warp w the 16 rows w*16 .. w*16+15.
// Tiles are taken in reverse order of blockIdx.x so that the longest (last) query tiles start first.
// The block walks the keys first_visible(first query) ..= last query in tiles of KEYS = 64:
//   1. threads 0..63 resolve each key's cache slot through the block table (-1: skipped / past the end),
//   2. the block gathers the K rows into k_s[key][d] and the V rows transposed into vt_s[d][key]
//      (16-byte global loads; skipped keys are zero-filled so that no stale value reaches the MMAs),
//   3. each warp whose rows can see some key of the tile computes S = Q K^T with
//      mma.m16n8k16 (bf16 in, f32 accumulate), masks (causal, window, skipped keys) per element,
//      updates its running row max / sum (online softmax in f32 registers), rescales its f32 output
//      accumulator and adds P V (P rounded to bf16 for the MMA, as FlashAttention does).
// Q is held in registers as MMA A-fragments for the whole kernel (read once with scalar loads, so q
// needs no alignment); rows past `tokens` are clamped to the last token and never stored.
// Shared memory (static, below 48 KiB for every HEAD_DIM): k_s KEYS x (HEAD_DIM + PAD) and
// vt_s HEAD_DIM x (KEYS + PAD) bf16, slot_s KEYS x i64; with PAD = 8 the 32-bit fragment reads of
// both are free of bank conflicts and every k_s row starts on a 16-byte boundary.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 .bf16): lane = 4 * g + c (g = lane / 4, c = lane % 4);
// A (16x16, row): regs {A[g][2c..2c+1], A[g+8][2c..], A[g][2c+8..], A[g+8][2c+8..]};
// B (16x8, col): regs {B[2c..2c+1][g], B[2c+8..2c+9][g]}; C/D (16x8): {C[g][2c], C[g][2c+1],
// C[g+8][2c], C[g+8][2c+1]}. The lower index of a pair is the low half of the 32-bit register.
//
// Template constant: HEAD_DIM in {16, 32, 64, 128}. Needs sm_80+ (mma.sync bf16). No fast math.
//
// Ran on an H100 (2026-11-28, benches/RESULTS.md): tests/gpu_kernels/attention_prefill.rs passes
// against the CPU reference. Not yet run on sm_80. It compiles for sm_80 and sm_90a and its SASS was
// read (HMMA present, no local memory). What was checked before it ran: the fragment layouts above against CuTe's
// SM80_16x8x16_F32BF16BF16F32_TN traits (CUTLASS headers), and the index, masking and softmax logic
// by a lane-by-lane host emulation of this file against the reference (head_dim 16 to 128, GQA,
// windows, 1 to 130 tokens, prefixes, an out-of-range block-table entry). The bank-conflict claims
// come from the address arithmetic, not from a profiler.
#include "common.cuh"

namespace {

constexpr uint32_t THREADS = ATTENTION_PREFILL_THREADS;
constexpr uint32_t WARPS = THREADS / 32;
constexpr uint32_t QUERIES = ATTENTION_PREFILL_QUERIES;
constexpr uint32_t KEYS = ATTENTION_PREFILL_KEYS;
constexpr uint32_t PAD = ATTENTION_PREFILL_PAD;
static_assert(QUERIES == WARPS * 16, "each warp owns one 16-row MMA tile of queries");
static_assert(KEYS % 16 == 0 && KEYS <= THREADS, "one thread resolves each key's slot");
static_assert(PAD % 8 == 0, "k_s rows stay 16-byte aligned");

// Two bf16 values (raw bits) as one register, `lo` in the low half.
__device__ __forceinline__ uint32_t pack_bits(mx_bf16 lo, mx_bf16 hi) {
    return (uint32_t)__bfloat16_as_ushort(lo) | ((uint32_t)__bfloat16_as_ushort(hi) << 16);
}

// Two f32 values rounded to bf16 (nearest even) as one register, `lo` in the low half.
__device__ __forceinline__ uint32_t pack_f32(float lo, float hi) {
    return pack_bits(mx::to_bf16(lo), mx::to_bf16(hi));
}

// Two consecutive bf16 of shared memory as one register (the address is 4-byte aligned).
__device__ __forceinline__ uint32_t shared_pair(const uint16_t* ptr) {
    return *reinterpret_cast<const uint32_t*>(ptr);
}

// The first key position the query at `pos` sees (window 0: no window).
__device__ __forceinline__ uint32_t first_visible(uint32_t pos, uint32_t window) {
    return (window != 0 && pos + 1 > window) ? pos + 1 - window : 0;
}

// Max over the 4 lanes of a quad (the lanes holding one accumulator row).
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(mx::FULL_MASK, v, 1));
    return fmaxf(v, __shfl_xor_sync(mx::FULL_MASK, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(mx::FULL_MASK, v, 1);
    return v + __shfl_xor_sync(mx::FULL_MASK, v, 2);
}

template <int D>
__device__ void attention_prefill_body(const AttentionPrefillParams& p) {
    static_assert(D % 16 == 0 && D >= 16, "head_dim is a multiple of the MMA k-step");
    constexpr uint32_t CHUNKS = D / 8;   // 16-byte chunks per key row
    constexpr int KSTEPS = D / 16;       // k-steps of Q K^T
    constexpr int DTILES = D / 8;        // n-tiles of the output
    constexpr int STILES = KEYS / 8;     // n-tiles of the scores
    constexpr uint32_t GATHER_STEPS = KEYS * CHUNKS / THREADS;  // 16-byte chunks each thread moves per tile
    constexpr uint32_t GATHER_BATCH = GATHER_STEPS < 4 ? GATHER_STEPS : 4;  // loads in flight per thread
    static_assert(KEYS * CHUNKS % THREADS == 0 && GATHER_STEPS % GATHER_BATCH == 0, "the gather divides evenly");
    __shared__ __align__(16) uint16_t k_s[KEYS][D + PAD];
    __shared__ __align__(16) uint16_t vt_s[D][KEYS + PAD];
    __shared__ long long slot_s[KEYS];
    static_assert(sizeof(k_s) + sizeof(vt_s) + sizeof(slot_s) <= 48 * 1024, "static shared memory limit");

    // Uniform over the block: a block past the work (never launched by the host) does nothing.
    if (blockIdx.y >= p.n_heads || p.n_kv_heads == 0 || p.tokens == 0) return;
    const uint32_t tile = gridDim.x - 1 - blockIdx.x;
    const uint32_t h = blockIdx.y;
    if ((uint64_t)tile * QUERIES >= p.tokens) return;
    const uint32_t kvh = h / (p.n_heads / p.n_kv_heads);
    const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t g = lane / 4, c = lane % 4;

    // Tokens t0 .. t_end - 1 belong to this block; positions are below 2^31 (checked on the host).
    const uint32_t t0 = tile * QUERIES;
    const uint32_t t_last = min(t0 + QUERIES, p.tokens) - 1;
    const uint32_t q_last = p.start_pos + t_last;                         // last query position
    const uint32_t key_first = first_visible(p.start_pos + t0, p.window);  // first key any row sees

    // This thread's two accumulator rows, clamped to the last token (padding rows are never stored).
    const uint32_t r0 = t0 + warp * 16 + g, r1 = r0 + 8;
    const uint32_t pos0 = p.start_pos + min(r0, t_last), pos1 = p.start_pos + min(r1, t_last);
    const uint32_t first0 = first_visible(pos0, p.window), first1 = first_visible(pos1, p.window);
    // The warp's key range: a tile wholly outside it is masked for every row, so the warp skips it.
    const uint32_t warp_last = p.start_pos + min(t0 + warp * 16 + 15, t_last);
    const uint32_t warp_first = first_visible(p.start_pos + min(t0 + warp * 16, t_last), p.window);

    // Q as A-fragments: qa[kk] covers dimensions kk*16 .. kk*16+15 of rows r0 / r1.
    uint32_t qa[KSTEPS][4];
    {
        const mx_bf16* q0 = p.q + (size_t)min(r0, t_last) * p.q_stride + (size_t)h * D;
        const mx_bf16* q1 = p.q + (size_t)min(r1, t_last) * p.q_stride + (size_t)h * D;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            const uint32_t col = kk * 16 + c * 2;
            qa[kk][0] = pack_bits(q0[col], q0[col + 1]);
            qa[kk][1] = pack_bits(q1[col], q1[col + 1]);
            qa[kk][2] = pack_bits(q0[col + 8], q0[col + 9]);
            qa[kk][3] = pack_bits(q1[col + 8], q1[col + 9]);
        }
    }

    float o[DTILES][4];
#pragma unroll
    for (int n = 0; n < DTILES; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY;  // running row max (log2 units)
    float l0 = 0.0f, l1 = 0.0f;            // this lane's part of the running row sum
    const float scale_log2 = p.scale * mx::LOG2E;
    const size_t token_stride = (size_t)p.n_kv_heads * D;  // elements per cached token
    const mx_bf16* k_head = p.k_cache + (size_t)kvh * D;
    const mx_bf16* v_head = p.v_cache + (size_t)kvh * D;

    for (uint32_t k0 = key_first; k0 <= q_last; k0 += KEYS) {
        __syncthreads();  // every warp is done with the previous tile's slot_s, k_s and vt_s
        if (threadIdx.x < KEYS) {
            const uint32_t kp = k0 + threadIdx.x;
            slot_s[threadIdx.x] = kp <= q_last ? mx::paged_slot(p.block_tables, (int32_t)p.seq_row, (int32_t)kp,
                                                                p.num_seqs, p.max_blocks_per_seq, p.block_size,
                                                                p.num_blocks)
                                               : -1;
        }
        __syncthreads();
        // Chunk i is 16-byte part i / KEYS of key i % KEYS: a warp covers 32 consecutive keys of one part,
        // so the transposed 2-byte stores into vt_s and the 16-byte stores into k_s are free of bank
        // conflicts (the two halves of a 32-byte sector are read by two warps; L1 is expected to serve the
        // second, not measured).
        // All of this thread's loads are issued before the first shared store (GATHER_BATCH at a time).
#pragma unroll
        for (uint32_t batch = 0; batch < GATHER_STEPS; batch += GATHER_BATCH) {
            uint4 kv[GATHER_BATCH], vv[GATHER_BATCH];
#pragma unroll
            for (uint32_t b = 0; b < GATHER_BATCH; ++b) {
                const uint32_t i = (batch + b) * THREADS + threadIdx.x;
                const long long slot = slot_s[i % KEYS];
                kv[b] = vv[b] = make_uint4(0, 0, 0, 0);
                if (slot >= 0) {
                    const size_t offset = (size_t)slot * token_stride + (i / KEYS) * 8;
                    kv[b] = mx::load_shared_16(k_head + offset);
                    vv[b] = mx::load_shared_16(v_head + offset);
                }
            }
#pragma unroll
            for (uint32_t b = 0; b < GATHER_BATCH; ++b) {
                const uint32_t i = (batch + b) * THREADS + threadIdx.x;
                const uint32_t key = i % KEYS, part = i / KEYS;
                *reinterpret_cast<uint4*>(&k_s[key][part * 8]) = kv[b];
                const uint32_t words[4] = {vv[b].x, vv[b].y, vv[b].z, vv[b].w};
#pragma unroll
                for (int w = 0; w < 4; ++w) {
                    vt_s[part * 8 + 2 * w][key] = (uint16_t)(words[w] & 0xffffu);
                    vt_s[part * 8 + 2 * w + 1][key] = (uint16_t)(words[w] >> 16);
                }
            }
        }
        __syncthreads();

        // Warp-uniform: skip a tile none of the warp's rows can see (its masked update is the identity).
        if (k0 > warp_last || k0 + (KEYS - 1) < warp_first) continue;

        // S = Q K^T for the warp's 16 rows and the tile's KEYS keys.
        float s[STILES][4];
#pragma unroll
        for (int j = 0; j < STILES; ++j) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KSTEPS; ++kk) {
                const uint16_t* krow = &k_s[j * 8 + g][kk * 16 + c * 2];
                mx::mma_bf16_16816(s[j], qa[kk], shared_pair(krow), shared_pair(krow + 8));
            }
        }

        // Mask and scale (log2 units), then the online softmax update of both rows.
        float max0 = -INFINITY, max1 = -INFINITY;
#pragma unroll
        for (int j = 0; j < STILES; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const uint32_t col = j * 8 + c * 2 + e;
                const uint32_t kp = k0 + col;
                const bool present = slot_s[col] >= 0;
                s[j][e] = present && kp >= first0 && kp <= pos0 ? s[j][e] * scale_log2 : -INFINITY;
                s[j][2 + e] = present && kp >= first1 && kp <= pos1 ? s[j][2 + e] * scale_log2 : -INFINITY;
                max0 = fmaxf(max0, s[j][e]);
                max1 = fmaxf(max1, s[j][2 + e]);
            }
        }
        const float new0 = fmaxf(m0, quad_max(max0)), new1 = fmaxf(m1, quad_max(max1));
        // A row with no visible key so far keeps max -inf: its weights are exp2(-inf) = 0, nothing rescales.
        const float alpha0 = new0 == -INFINITY ? 1.0f : exp2f(m0 - new0);
        const float alpha1 = new1 == -INFINITY ? 1.0f : exp2f(m1 - new1);
        const float base0 = new0 == -INFINITY ? 0.0f : new0;
        const float base1 = new1 == -INFINITY ? 0.0f : new1;
        m0 = new0;
        m1 = new1;
        l0 *= alpha0;
        l1 *= alpha1;
#pragma unroll
        for (int n = 0; n < DTILES; ++n) {
            o[n][0] *= alpha0;
            o[n][1] *= alpha0;
            o[n][2] *= alpha1;
            o[n][3] *= alpha1;
        }
#pragma unroll
        for (int j = 0; j < STILES; ++j) {
            s[j][0] = exp2f(s[j][0] - base0);
            s[j][1] = exp2f(s[j][1] - base0);
            s[j][2] = exp2f(s[j][2] - base1);
            s[j][3] = exp2f(s[j][3] - base1);
            l0 += s[j][0] + s[j][1];
            l1 += s[j][2] + s[j][3];
        }

        // O += P V: the score accumulators of keys kk*16 .. kk*16+15 are the A-fragment of step kk.
#pragma unroll
        for (int kk = 0; kk < KEYS / 16; ++kk) {
            const uint32_t pa[4] = {
                pack_f32(s[2 * kk][0], s[2 * kk][1]),
                pack_f32(s[2 * kk][2], s[2 * kk][3]),
                pack_f32(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                pack_f32(s[2 * kk + 1][2], s[2 * kk + 1][3]),
            };
#pragma unroll
            for (int n = 0; n < DTILES; ++n) {
                const uint16_t* vrow = &vt_s[n * 8 + g][kk * 16 + c * 2];
                mx::mma_bf16_16816(o[n], pa, shared_pair(vrow), shared_pair(vrow + 8));
            }
        }
    }

    // Normalise and store the rows that exist; a row that saw no key gets zeros.
    const float sum0 = quad_sum(l0), sum1 = quad_sum(l1);
    const float inv0 = sum0 > 0.0f ? 1.0f / sum0 : 0.0f;
    const float inv1 = sum1 > 0.0f ? 1.0f / sum1 : 0.0f;
    if (r0 <= t_last) {
        mx_bf16* out = p.out + ((size_t)r0 * p.n_heads + h) * D;
#pragma unroll
        for (int n = 0; n < DTILES; ++n) {
            out[n * 8 + c * 2] = mx::to_bf16(o[n][0] * inv0);
            out[n * 8 + c * 2 + 1] = mx::to_bf16(o[n][1] * inv0);
        }
    }
    if (r1 <= t_last) {
        mx_bf16* out = p.out + ((size_t)r1 * p.n_heads + h) * D;
#pragma unroll
        for (int n = 0; n < DTILES; ++n) {
            out[n * 8 + c * 2] = mx::to_bf16(o[n][2] * inv1);
            out[n * 8 + c * 2 + 1] = mx::to_bf16(o[n][3] * inv1);
        }
    }
}

}  // namespace

#define MX_DEFINE(symbol, HEAD_DIM)                                                                   \
    MX_KERNEL void __launch_bounds__(ATTENTION_PREFILL_THREADS) symbol(AttentionPrefillParams p) { \
        attention_prefill_body<HEAD_DIM>(p);                                                        \
    }
MIXTRAL_ATTENTION_PREFILL_VARIANTS(MX_DEFINE)
#undef MX_DEFINE
