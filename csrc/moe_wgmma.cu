// moe_wgmma.cu: the prefill expert MLP of moe_grouped.cu as Hopper warpgroup GEMMs (`wgmma.mma_async`,
// sm_90a only). Same buffers, grid, tile list and results as moe_grouped_up / moe_grouped_down:
//
//   x     [tokens, hidden] bf16                normalised hidden states
//   w1,w3 [experts, inter, hidden] bf16        row-major [out, in] per expert
//   w2    [experts, hidden, inter] bf16
//   act   [tokens * top_k, inter] bf16         moe_wgmma_up:   act[s] = silu(w1[e] x[t]) * (w3[e] x[t])
//   out   [tokens * top_k, hidden] f32         moe_wgmma_down: out[s] = topk_weights[s] * (w2[e] act[s])
//
// Ran on an H100 (2026-11-28, benches/RESULTS.md): its self-check and tests/gpu_kernels/moe_wgmma.rs
// pass against the CPU reference, so the layouts, descriptors and fragments below (derived from the
// PTX ISA text: wgmma.mma_async, "Shared Memory Matrix Layout", "Matrix Descriptor Format",
// "Register Fragments") hold on hardware. It is slower than moe_grouped (84 / 103 TFLOP/s at 512 /
// 4096 tokens: one warpgroup per block and no producer/consumer pipeline), so nothing uses it unless
// asked (`CudaEngineOptions::hopper_wgmma`), and then only after `moe_wgmma_self_check` passed.
//
// Built for three targets; only sm_90a has a body. On sm_80 and in the compute_90 PTX (which lacks the
// `a` features wgmma needs) each kernel is a `__trap()`: the launcher (src/cuda/ops/moe_wgmma.rs)
// refuses every device whose compute capability is not 9.0, so those bodies are never launched.
//
// Tile. One block = one warpgroup (MOE_WGMMA_THREADS = 128 threads, 4 warps) computes
//   D[64 slots, 128] = A[64 slots, K] * B[128 weight rows, K]^T
// for BM = 64 slots of ONE expert (the moe_grouped tile list: expert-major, 64 slots per tile, rows
// gathered through sorted_slots) with ONE `wgmma.mma_async.m64n128k16.f32.bf16.bf16` per 16-wide k step:
//   moe_wgmma_up:   A = x rows of the tile's tokens, K = hidden; B rows 0..63 = w1[e] rows n0..n0+63 and
//                   B rows 64..127 = w3[e] rows n0..n0+63 (n0 = 64 * blockIdx.y). D column c < 64 is the
//                   gate of output column n0 + c, D column c + 64 its up value: the SwiGLU epilogue finds
//                   both in the same thread (see "Accumulator" below).
//   moe_wgmma_down: A = act rows of the tile's slots, K = inter; B = w2[e] rows n0..n0+127
//                   (n0 = 128 * blockIdx.y); the epilogue scales by topk_weights[s].
// Grid: x = the flattened tile list sized for the worst routing (`floor((slots + min(experts, slots) *
// 63) / 64)`, exactly moe_grouped's), y = ceil(inter / 64) (up) or ceil(hidden / 128) (down). Blocks past
// the last real tile exit before any barrier.
//
// Shared memory, K-major without swizzle (the "interleave" layout of the PTX ISA). A tile of R rows
// (R = 64 for A, 128 for B) and BK = 32 k is made of 8 x 8 bf16 core matrices (8 rows x 16 bytes, the
// 128 bytes of one core matrix contiguous, row r % 8 at byte 16 * (r % 8)). Core matrix (r / 8, k / 8)
// starts at byte ((r / 8) * (BK / 8) + k / 8) * 128, so element (r, k) is at byte
//     ((r / 8) * 4 + k / 8) * 128 + (r % 8) * 16 + (k % 8) * 2.
// In the PTX canonical form for K-major without swizzle, ((8, m), (T, 2k)) : ((1T, SBO), (1, LBO)) with
// T = 8 bf16 (16 bytes): rows within a core matrix are 16 bytes apart (fixed), the next 8 rows are
// SBO = (BK / 8) * 128 = 512 bytes further, the next 8 k (the second core matrix of a k16 step) are
// LBO = 128 bytes further ("leading dimension byte offset, K-major, no swizzle: the offset from the
// first column to the second column of the 8x2 tile"; "stride dimension byte offset, K-major: the
// offset from the first 8 rows to the next 8 rows").
//
// Descriptors (64 bits; PTX "Matrix Descriptor Format", encode(x) = (x & 0x3FFFF) >> 4):
//   bits 0-13  encode(start address)   = tile base + 256 * s for k16 step s in {0, 1} (k chunks 2s, 2s+1)
//   bits 16-29 encode(LBO) = 128 >> 4 = 8
//   bits 32-45 encode(SBO) = 512 >> 4 = 32
//   bits 49-51 base offset = 0 (only used by the swizzled modes)
//   bits 62-63 swizzle     = 0 (none)
// imm-trans-a = imm-trans-b = 0 (both K-major: A is [m][k] row-major, B is [n][k], i.e. the weight rows),
// imm-scale-a = imm-scale-b = 1, scale-d = 1 (the accumulators start at zero).
//
// Copies. Tile copy number c (16 bytes) goes to byte 16 * c of the tile and comes from row
// (c / 32) * 8 + c % 8, k chunk (c / 8) % 4: eight consecutive copies fill one core matrix, so a warp's
// 32 copies fill 512 contiguous bytes (no bank conflicts on the shared stores). Thread tid issues copies
// tid + 128 p (p < 2 for A, p < 4 for B): rows (tid / 32 + 4 p) * 8 + tid % 8, k chunk (tid / 8) % 4.
// Rows past the expert's slots, weight rows past N and k past K are zero-filled (cp.async src-size 0).
//
// Pipeline: MOE_WGMMA_STAGES = 3 stages, copies two k tiles ahead. Iteration kt:
//   cp.async.wait_group 1        this thread's copies of tile kt have landed
//   fence.proxy.async.shared::cta   its generic-proxy shared writes are ordered before async-proxy reads
//   __syncthreads                   ... for every thread; and every warp finished wgmma(kt - 1)
//   cp.async tile kt + 2 -> stage (kt + 2) % 3 = (kt - 1) % 3 (free: wgmma(kt - 1) completed everywhere)
//   wgmma.fence; 2 x wgmma on stage kt % 3; wgmma.commit_group; wgmma.wait_group 0
// One cp.async group is committed per iteration (possibly empty), so "wait_group 1" at iteration kt
// leaves only tile kt + 1 in flight. The tensor core idles between iterations (wait_group 0 before the
// barrier); the other resident blocks of the SM fill that gap (not measured).
//
// Accumulator (PTX "Matrix Fragments for wgmma.mma_async.m64nNk16", f32 D, N = 128, 64 registers
// d[0..63] per thread): thread tid = 32 * w + l (warp w, lane l) holds
//     d[i] = D[16 w + l / 4 + 8 * ((i / 2) % 2)][8 * (i / 4) + 2 * (l % 4) + i % 2],
// i.e. the m16n8 C fragment of mma.sync repeated over the 16 n8 blocks, warp w owning rows 16w..16w+15.
// So d[i] and d[i + 32] are the same row, columns c and c + 64 (gate and up in moe_wgmma_up), and
// (d[i], d[i + 1]) for even i are two adjacent columns (one bf16x2 / float2 store).
//
// Device-side indices are not trusted (as in moe_grouped): offsets are clamped to [0, slots] and made
// non-decreasing per expert, slots outside [0, tokens * top_k) are skipped. hidden and inter are
// multiples of 8, every bf16 buffer and `out` are 16-byte aligned (checked by the launcher).
// No fast math: expf in silu stays accurate (epilogue only).
#include "moe_tiles.cuh"

// Everything up to the kernels uses sm_90a instructions (fence.proxy.async, wgmma); the other targets
// only get the __trap() bodies.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)

namespace {

constexpr int THREADS = (int)MOE_WGMMA_THREADS;
constexpr int BM = (int)MOE_WGMMA_BM;
constexpr int BN = (int)MOE_WGMMA_BN;
constexpr int BK = (int)MOE_WGMMA_BK;
constexpr int STAGES = (int)MOE_WGMMA_STAGES;
constexpr int K_CHUNKS = BK / 8;                  // 16-byte chunks (core matrices) per tile row group
constexpr uint32_t CORE_BYTES = 128;              // one 8 x 8 bf16 core matrix
constexpr uint32_t LBO = CORE_BYTES;              // next core matrix along k
constexpr uint32_t SBO = K_CHUNKS * CORE_BYTES;   // next 8 rows
constexpr uint32_t A_BYTES = BM * BK * 2;
constexpr uint32_t B_BYTES = BN * BK * 2;
constexpr int A_COPIES = BM * K_CHUNKS / THREADS;  // 16-byte copies per thread and stage
constexpr int B_COPIES = BN * K_CHUNKS / THREADS;
constexpr int ACC = BN / 2;                        // f32 accumulators per thread (m64nBNk16)
static_assert(THREADS == 128, "one warpgroup");
static_assert(BM == 64 && BN == 128 && BK == 32, "the descriptors and the wgmma shape below assume 64 x 128 x 32");
static_assert(K_CHUNKS == 4 && THREADS % 32 == 0, "copy mapping: 32 copies per 8-row group");
static_assert(A_COPIES * THREADS == BM * K_CHUNKS && B_COPIES * THREADS == BN * K_CHUNKS, "whole copies");
static_assert(STAGES == 3, "the pipeline loads two tiles ahead into the stage freed one iteration earlier");

struct Smem {
    alignas(128) uint8_t a[STAGES][A_BYTES];
    alignas(128) uint8_t b[STAGES][B_BYTES];
    int32_t slot[BM];  // the tile's slots, -1 for rows past the expert's slots
};
static_assert(sizeof(Smem) <= 48 * 1024, "static shared memory");

// Shared-memory matrix descriptor of a K-major, unswizzled tile whose first core matrix is at `address`.
__device__ __forceinline__ uint64_t descriptor(uint32_t address) {
    return (uint64_t)((address & 0x3FFFF) >> 4) | ((uint64_t)(LBO >> 4) << 16) | ((uint64_t)(SBO >> 4) << 32);
}

// Orders generic-proxy shared-memory writes (cp.async, st.shared) before later async-proxy reads (wgmma).
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }

// Keeps the compiler from moving accesses of the accumulators across the asm statements around them
// (the wgmma writes them asynchronously: only wgmma.wait_group makes them readable).
__device__ __forceinline__ void pin(float (&d)[ACC]) {
#pragma unroll
    for (int i = 0; i < ACC; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// d[64 x 128] += A[64 x 16] * B[128 x 16]^T, both operands K-major in shared memory.
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[ACC], uint64_t a, uint64_t b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, 1, 1, 1, 0, 0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(a), "l"(b)
        : "memory");
}

// UP: act = silu(A w1^T) * (A w3^T) with A = x rows of the tile's tokens, K = hidden, N = inter.
// !UP: out = topk_weights * (A w2^T) with A = act rows of the tile's slots, K = inter, N = hidden.
template <bool UP>
__device__ __forceinline__ void wgmma_body(const MoeParams& p) {
    __shared__ Smem smem;
    uint32_t expert;
    int32_t begin, end;
    if (!mx::find_moe_tile<BM>(p, expert, begin, end)) return;  // the same for every thread: no barrier is skipped
    const uint32_t slots = p.tokens * p.top_k;
    const uint32_t K = UP ? p.hidden : p.inter;
    const uint32_t N = UP ? p.inter : p.hidden;
    const uint32_t n0 = blockIdx.y * (UP ? BN / 2 : BN);  // first output column of the block
    const int tid = threadIdx.x;

    if (tid < BM) {
        int32_t slot = -1;
        if (tid < end - begin) {
            const int32_t s = p.sorted_slots[begin + tid];
            if (s >= 0 && (uint32_t)s < slots) slot = s;
        }
        smem.slot[tid] = slot;
    }
    __syncthreads();

    // This thread's copies: rows (tid / 32 + 4 i) * 8 + tid % 8, k chunk (tid / 8) % 4, shared byte
    // 16 * (tid + 128 i) of the tile (see the header).
    const uint32_t chunk_k = (uint32_t)((tid / 8) % K_CHUNKS) * 8;
    const mx_bf16* a_row[A_COPIES];
    const mx_bf16* b_row[B_COPIES];
#pragma unroll
    for (int i = 0; i < A_COPIES; ++i) {
        const int row = (tid / 32 + 4 * i) * 8 + tid % 8;
        const int32_t slot = smem.slot[row];
        if (slot < 0) {
            a_row[i] = nullptr;
        } else if (UP) {
            a_row[i] = p.x + (size_t)((uint32_t)slot / p.top_k) * p.hidden;
        } else {
            a_row[i] = p.act + (size_t)slot * p.inter;
        }
    }
#pragma unroll
    for (int i = 0; i < B_COPIES; ++i) {
        const uint32_t row = (uint32_t)((tid / 32 + 4 * i) * 8 + tid % 8);  // 0..127
        // UP: rows 0..63 of w1, 64..127 the same rows of w3. DOWN: 128 consecutive rows of w2.
        const uint32_t n = UP ? n0 + row % (BN / 2) : n0 + row;
        const mx_bf16* w = UP ? (row < (uint32_t)(BN / 2) ? p.w1 : p.w3) : p.w2;
        b_row[i] = n < N ? w + ((size_t)expert * N + n) * K : nullptr;
    }
    const uint32_t a_base = mx::shared_address(&smem.a[0][0]);
    const uint32_t b_base = mx::shared_address(&smem.b[0][0]);
    const uint32_t copy_offset = 16u * (uint32_t)tid;

    // Copies the k range [k0, k0 + BK) of A and B into stage s (zeros outside).
    auto load_stage = [&](uint32_t s, uint32_t k0) {
        const uint32_t k = k0 + chunk_k;
        const bool in_k = k < K;
#pragma unroll
        for (int i = 0; i < A_COPIES; ++i) {
            const bool ok = in_k && a_row[i] != nullptr;
            mx::cp_async_16(a_base + s * A_BYTES + copy_offset + 16u * THREADS * i, ok ? a_row[i] + k : p.x, ok);
        }
#pragma unroll
        for (int i = 0; i < B_COPIES; ++i) {
            const bool ok = in_k && b_row[i] != nullptr;
            mx::cp_async_16(b_base + s * B_BYTES + copy_offset + 16u * THREADS * i, ok ? b_row[i] + k : p.x, ok);
        }
    };

    float acc[ACC];
#pragma unroll
    for (int i = 0; i < ACC; ++i) acc[i] = 0.0f;

    const uint32_t k_tiles = (K + BK - 1) / BK;
    load_stage(0, 0);
    mx::cp_async_commit();
    if (1 < k_tiles) load_stage(1, BK);
    mx::cp_async_commit();  // possibly empty: one group per tile slot keeps the wait counts fixed
    for (uint32_t kt = 0; kt < k_tiles; ++kt) {
        mx::cp_async_wait<1>();       // this thread's copies of tile kt have landed
        fence_proxy_async();  // ... and are visible to the async proxy
        __syncthreads();      // ... for every thread; every warp is past wgmma_wait_all of kt - 1
        if (kt + 2 < k_tiles) load_stage((kt + 2) % STAGES, (kt + 2) * BK);
        mx::cp_async_commit();
        const uint32_t s = kt % STAGES;
        const uint32_t a_tile = a_base + s * A_BYTES;
        const uint32_t b_tile = b_base + s * B_BYTES;
        pin(acc);
        wgmma_fence();
#pragma unroll
        for (uint32_t step = 0; step < BK / 16; ++step) {
            // k16 step: core matrices 2 step and 2 step + 1 of every 8-row group.
            wgmma_m64n128k16(acc, descriptor(a_tile + step * 2 * CORE_BYTES),
                             descriptor(b_tile + step * 2 * CORE_BYTES));
        }
        wgmma_commit();
        wgmma_wait_all();
        pin(acc);
    }

    // Epilogue: d[i] is row 16 w + l / 4 + 8 ((i / 2) % 2), column 8 (i / 4) + 2 (l % 4) + i % 2.
    const int warp = tid / 32;
    const int lane = tid % 32;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int32_t slot = smem.slot[16 * warp + lane / 4 + 8 * h];
        if (slot < 0) continue;
        const float weight = UP ? 1.0f : p.topk_weights[slot];
#pragma unroll
        for (int j = 0; j < (UP ? ACC / 8 : ACC / 4); ++j) {
            const int i = 4 * j + 2 * h;                           // d[i], d[i + 1]: one row, two columns
            const uint32_t col = n0 + 8 * j + 2 * (lane % 4);     // even; N % 8 == 0, so col < N => col + 1 < N
            if (col >= N) continue;
            if (UP) {
                const float g0 = acc[i];
                const float g1 = acc[i + 1];
                const float v0 = g0 / (1.0f + expf(-g0)) * acc[i + ACC / 2];
                const float v1 = g1 / (1.0f + expf(-g1)) * acc[i + 1 + ACC / 2];
                *reinterpret_cast<__nv_bfloat162*>(p.act + (size_t)slot * p.inter + col) =
                    __floats2bfloat162_rn(v0, v1);
            } else {
                *reinterpret_cast<float2*>(p.out + (size_t)slot * p.hidden + col) =
                    make_float2(weight * acc[i], weight * acc[i + 1]);
            }
        }
    }
}

}  // namespace

#define MX_BODY(UP) wgmma_body<UP>(p)
#else
// Not sm_90a: wgmma does not exist here. Never launched (the launcher requires compute capability 9.0).
#define MX_BODY(UP) __trap()
#endif

#define MX_DEFINE(symbol)                            \
    MX_ENTRY(symbol, (MOE_WGMMA_THREADS), MoeParams, \
        MX_BODY(true))
MIXTRAL_MOE_WGMMA_UP_VARIANTS(MX_DEFINE)
#undef MX_DEFINE

#define MX_DEFINE(symbol)                            \
    MX_ENTRY(symbol, (MOE_WGMMA_THREADS), MoeParams, \
        MX_BODY(false))
MIXTRAL_MOE_WGMMA_DOWN_VARIANTS(MX_DEFINE)
#undef MX_DEFINE
#undef MX_BODY
