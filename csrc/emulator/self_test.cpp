// self_test.cpp: kernels that check the emulator itself (src/cuda/emulator.rs's unit tests run
// them): the values of its warp collectives, that a read racing a write differs between the two
// thread orders, that launches on different OS threads each have their own shared memory, and that
// what would hang or be undefined on a GPU ends the launch with an error (and a stack overflow the
// process).
// One block of 64 threads each; out [64] int32.
#include "../common.cuh"

namespace {

// out[t] = the xor-5 lane's index + 100 * the popcount of the ballot of odd lanes + 1000 * the
// match of lanes holding t / 4 (a bit per lane in the low lanes' mask, summed as a count).
__device__ void emulator_shuffles_body(const MxEmulatorSelfTestParams& p) {
    const int t = (int)threadIdx.x;
    const int other = __shfl_xor_sync(mx::FULL_MASK, t, 5);
    const uint32_t odd = __ballot_sync(mx::FULL_MASK, t % 2);
    const uint32_t peers = __match_any_sync(mx::FULL_MASK, t / 4);
    p.out[t] = other + 100 * __popc(odd) + 1000 * __popc(peers);
}

// Thread 0 sets a shared flag that the others read with no barrier between: 1 when thread 0 ran
// first, 0 otherwise (the flag is cleared, with a barrier, before).
__device__ void emulator_unsynchronised_read_body(const MxEmulatorSelfTestParams& p) {
    __shared__ int flag;
    if (threadIdx.x == 0) flag = 0;
    __syncthreads();
    if (threadIdx.x == 0) flag = 1;
    p.out[threadIdx.x] = flag;
}

// Odd lanes wait at __syncthreads while even lanes of the same warp shuffle: a hang on a GPU.
__device__ void emulator_split_warp_body(const MxEmulatorSelfTestParams& p) {
    if (threadIdx.x % 2) {
        __syncthreads();
    } else {
        p.out[threadIdx.x] = __shfl_xor_sync(mx::FULL_MASK, 1, 2);
    }
}

// Lane 0 returns and the rest of its warp shuffles: undefined on a GPU.
__device__ void emulator_exited_lane_body(const MxEmulatorSelfTestParams& p) {
    if (threadIdx.x == 0) return;
    p.out[threadIdx.x] = __shfl_xor_sync(mx::FULL_MASK, (int)threadIdx.x, 1);
}

// Thread 0 keeps the launch's seed (out[0] on entry) in shared memory; every thread reads it after
// each of 100 barriers (other launches run on other OS threads meanwhile) and writes it back, or -1
// if it ever changed.
__device__ void emulator_shared_per_launch_body(const MxEmulatorSelfTestParams& p) {
    __shared__ int seed;
    if (threadIdx.x == 0) seed = p.out[0];
    __syncthreads();
    const int first = seed;
    bool same = true;
    for (int i = 0; i < 100; ++i) {
        __syncthreads();
        same = same && seed == first;
    }
    p.out[threadIdx.x] = same ? first : -1;
}

__device__ void emulator_trap_body(const MxEmulatorSelfTestParams&) {
    if (threadIdx.x == 7) __trap();
}

// Thread 5 loads 16 bytes from an address 8 bytes past a 16-byte boundary within out (a GPU's
// misaligned address fault); the others load from the boundary.
__device__ void emulator_misaligned_load_body(const MxEmulatorSelfTestParams& p) {
    const uintptr_t boundary = (reinterpret_cast<uintptr_t>(p.out) + 15) & ~(uintptr_t)15;
    const uint4 v = *reinterpret_cast<const uint4*>(boundary + (threadIdx.x == 5 ? 8 : 0));
    p.out[threadIdx.x] = (int)v.x;
}

// Thread 3 copies 16 bytes with cp.async from 8 bytes past a 16-byte boundary within out (a GPU's
// misaligned address fault); the others from the boundary.
__device__ void emulator_misaligned_cp_async_body(const MxEmulatorSelfTestParams& p) {
    __shared__ __align__(16) uint4 stage[64];
    const uintptr_t boundary = (reinterpret_cast<uintptr_t>(p.out) + 15) & ~(uintptr_t)15;
    const void* source = reinterpret_cast<const void*>(boundary + (threadIdx.x == 3 ? 8 : 0));
    mx::cp_async_16(mx::shared_address(&stage[threadIdx.x]), source, true);
    mx::cp_async_commit();
    mx::cp_async_wait<0>();
    p.out[threadIdx.x] = (int)stage[threadIdx.x].x;
}

// Thread 9 writes one past the end of a shared array (another variable's bytes on a GPU).
__device__ void emulator_shared_index_past_end_body(const MxEmulatorSelfTestParams& p) {
    __shared__ int slots[64];
    slots[threadIdx.x + (threadIdx.x == 9 ? 55 : 0)] = 1;
    __syncthreads();
    p.out[threadIdx.x] = slots[threadIdx.x];
}

// Thread 31 shifts a 32-bit value by 32 (x86 shifts by 0, PTX's shl gives 0).
__device__ void emulator_wide_shift_body(const MxEmulatorSelfTestParams& p) {
    p.out[threadIdx.x] = (int)(1u << (threadIdx.x % 32 + 1));
}

// Thread 12 converts 3e9 to an int (PTX saturates to 2147483647, x86 gives -2147483648).
__device__ void emulator_float_to_int_overflow_body(const MxEmulatorSelfTestParams& p) {
    p.out[threadIdx.x] = (int)(threadIdx.x == 12 ? 3e9f : (float)threadIdx.x);
}

// Each thread cp.asyncs 16 bytes (four ints 100 + t; from shared memory, which only the emulator
// allows) over four -1s and reads them before and after waiting: out[t] = 1 when the read before
// saw the -1s, + 2 when the read after saw 100 + t (3: a copy lands at the wait, not before).
__device__ void emulator_cp_async_lands_at_the_wait_body(const MxEmulatorSelfTestParams& p) {
    __shared__ __align__(16) int stage[64][4];
    __shared__ __align__(16) int source[64][4];
    for (int i = 0; i < 4; ++i) {
        stage[threadIdx.x][i] = -1;
        source[threadIdx.x][i] = 100 + (int)threadIdx.x;
    }
    mx::cp_async_16(mx::shared_address(stage[threadIdx.x]), source[threadIdx.x], true);
    mx::cp_async_commit();
    const int before = stage[threadIdx.x][0];
    mx::cp_async_wait<0>();
    const int after = stage[threadIdx.x][3];
    p.out[threadIdx.x] = (before == -1 ? 1 : 0) + (after == 100 + (int)threadIdx.x ? 2 : 0);
}

// A frame of 200 KiB, more than any emulated thread's stack holds (at most 192 KiB above its guard
// page): the stack-clash probes touch each page on the way down, so it faults on the guard page
// (the test process dies of SIGSEGV) before anything lands in the thread's Fiber.
__device__ void emulator_deep_stack_body(const MxEmulatorSelfTestParams& p) {
    volatile char frame[200 * 1024];
    frame[0] = (char)threadIdx.x;
    p.out[threadIdx.x] = frame[0];
}

}  // namespace

// One entry per kernel of MX_EMULATOR_SELF_TESTS (cuda_emulator.h): emulator_x runs emulator_x_body.
#define MX_SELF_TEST_ENTRY(symbol) MX_ENTRY(symbol, (64), MxEmulatorSelfTestParams, symbol##_body(p))
MX_EMULATOR_SELF_TESTS(MX_SELF_TEST_ENTRY)
