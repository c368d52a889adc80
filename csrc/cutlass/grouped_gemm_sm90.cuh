// grouped_gemm_sm90.cuh: the one CUTLASS Hopper grouped GEMM type of the expert-MLP shims (sm_90a
// only), per input element, and the per-group arrays it reads from the device. Each group g computes
//
//   D_g [M_g, N_g] f32 row-major = A_g [M_g, K_g] row-major . B_g [N_g, K_g]^T
//
// with A and B of one element type: bf16 (tiles 128 x 128 x 64, f32 accumulation), FP8 E4M3 (128 x
// 128 x 128, the same 128 bytes of K per stage; CUTLASS's FP8 mainloop promotes the tensor cores'
// partial sums into f32 registers every few k-blocks) or INT8 (128 x 128 x 128, exact i32
// accumulation, converted to f32 by the epilogue). B is a weight matrix's rows ("column-major" in CUTLASS's terms).
// `KernelPtrArrayTmaWarpSpecializedCooperative` (TMA, warp-specialized, persistent), cluster 1 x 1,
// no C operand. A group with M = 0 is skipped by the grouped tile scheduler.
//
// The expert shims lay their 3 * experts groups out the same way (set_expert_group): group g < 2E is
// the up GEMM of expert g % E against w1 (g < E) or w3, group 2E + e the down GEMM of expert e, over
// the expert-sorted rows expert_offsets[e] .. expert_offsets[e + 1].
//
// Alignment: TMA needs 16-byte aligned rows; the Rust planners check hidden and inter for it.
//
// The shims' `extern "C"` entry points are declared in the generated shims.h (included here), so a
// definition that differs from the Rust declarations' source does not compile.
#pragma once

#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "../generated/params.h"
#include "../generated/shims.h"

namespace mx_cutlass {

__host__ __device__ constexpr size_t round16(size_t bytes) { return (bytes + 15) / 16 * 16; }

inline int cuda_code(cudaError_t e) { return (int)e; }
inline int cutlass_code(cutlass::Status s) {
    return s == cutlass::Status::kSuccess ? 0 : (int)MOE_CUTLASS_STATUS_BASE + (int)s;
}

// D = alpha * acc with alpha = 1 and no C: the epilogue of every GEMM of the shims.
template <class Arguments>
void plain_epilogue(Arguments& args) {
    auto& fusion = args.epilogue.thread;
    fusion.alpha = 1.0f;
    fusion.beta = 0.0f;
    fusion.alpha_ptr = nullptr;
    fusion.beta_ptr = nullptr;
}

// Runs the CUTLASS GEMM `Gemm` over `args` on `stream` in `workspace` (`workspace_bytes` bytes):
// 0, or the error code of the shims (a workspace smaller than the query is refused).
template <class Gemm>
int run_gemm(const typename Gemm::Arguments& args, uint8_t* workspace, size_t workspace_bytes, cudaStream_t stream) {
    Gemm gemm;
    if (Gemm::get_workspace_size(args) > workspace_bytes) {
        return (int)MOE_CUTLASS_STATUS_BASE + (int)cutlass::Status::kErrorWorkspaceNull;
    }
    if (int c = cutlass_code(gemm.can_implement(args))) return c;
    if (int c = cutlass_code(gemm.initialize(args, workspace, stream))) return c;
    return cutlass_code(gemm.run(stream));
}

template <class ElementAB_, int TILE_K, class ElementAccumulator_ = float>
struct GroupedGemm {
    using ElementAB = ElementAB_;
    using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // (M, N, K)
    using ElementD = float;
    using ElementAccumulator = ElementAccumulator_;
    using ElementCompute = float;
    using LayoutA = cutlass::layout::RowMajor;
    using LayoutB = cutlass::layout::ColumnMajor;
    using LayoutD = cutlass::layout::RowMajor;
    static constexpr int ALIGN_AB = 16 / sizeof(ElementAB);
    static constexpr int ALIGN_D = 16 / sizeof(ElementD);

    using TileShape = cute::Shape<cute::_128, cute::_128, cute::Int<TILE_K>>;
    using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
    using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
    using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;

    using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
        cutlass::epilogue::collective::EpilogueTileAuto, ElementAccumulator, ElementCompute,
        void, LayoutD*, ALIGN_D,  // no C operand
        ElementD, LayoutD*, ALIGN_D, EpilogueSchedule,
        cutlass::epilogue::fusion::LinearCombination<ElementD, ElementCompute>>::CollectiveOp;

    using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementAB, LayoutA*, ALIGN_AB, ElementAB,
        LayoutB*, ALIGN_AB, ElementAccumulator, TileShape, ClusterShape,
        cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
        KernelSchedule>::CollectiveOp;

    using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
    using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

    using StrideA = typename Kernel::InternalStrideA;
    using StrideB = typename Kernel::InternalStrideB;
    using StrideD = typename Kernel::InternalStrideD;
    using Shape3 = typename ProblemShape::UnderlyingProblemShape;

    // The per-group arrays inside a `groups` buffer, each `count` entries long and 16-byte aligned.
    struct Arrays {
        Shape3* shapes;
        const ElementAB** a;
        const ElementAB** b;
        ElementD** d;
        StrideA* stride_a;
        StrideB* stride_b;
        StrideD* stride_d;
    };

    // Bytes of one group's entries across all the arrays (each array rounded up per group, so that
    // `count` groups take at most `count * group_bytes()` bytes however the arrays are split).
    __host__ __device__ static constexpr size_t group_bytes() {
        return round16(sizeof(Shape3)) + 3 * round16(sizeof(void*)) + round16(sizeof(StrideA)) +
               round16(sizeof(StrideB)) + round16(sizeof(StrideD));
    }
    static_assert(group_bytes() <= MOE_CUTLASS_GROUP_BYTES, "MOE_CUTLASS_GROUP_BYTES too small");

    __host__ __device__ static Arrays arrays(uint8_t* base, uint32_t count) {
        Arrays g;
        size_t at = 0;
        auto take = [&](size_t each) {
            uint8_t* p = base + at;
            at += round16(each * count);
            return p;
        };
        g.shapes = reinterpret_cast<Shape3*>(take(sizeof(Shape3)));
        g.a = reinterpret_cast<const ElementAB**>(take(sizeof(void*)));
        g.b = reinterpret_cast<const ElementAB**>(take(sizeof(void*)));
        g.d = reinterpret_cast<ElementD**>(take(sizeof(void*)));
        g.stride_a = reinterpret_cast<StrideA*>(take(sizeof(StrideA)));
        g.stride_b = reinterpret_cast<StrideB*>(take(sizeof(StrideB)));
        g.stride_d = reinterpret_cast<StrideD*>(take(sizeof(StrideD)));
        return g;
    }

    // Group i of `g`: D [m, n] = A [m, k] . B [n, k]^T, all packed.
    __device__ static void set(const Arrays& g, uint32_t i, int m, int n, int k, const ElementAB* a,
                               const ElementAB* b, ElementD* d) {
        g.a[i] = a;
        g.b[i] = b;
        g.d[i] = d;
        g.shapes[i] = Shape3(m, n, k);
        g.stride_a[i] = cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(m, k, 1));
        g.stride_b[i] = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(n, k, 1));
        g.stride_d[i] = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(m, n, 1));
    }

    // The arguments of the grouped GEMM over `count` groups starting at group `first` of `g`.
    static typename Gemm::Arguments arguments(const Arrays& g, uint32_t first, uint32_t count, int sm_count) {
        cutlass::KernelHardwareInfo hw;
        hw.device_id = 0;  // unused when sm_count is given
        hw.sm_count = sm_count;
        typename Gemm::Arguments args{
            cutlass::gemm::GemmUniversalMode::kGrouped,
            {(int)count, g.shapes + first, nullptr},  // shapes on the device only
            {g.a + first, g.stride_a + first, g.b + first, g.stride_b + first},
            {{}, nullptr, nullptr, g.d + first, g.stride_d + first},
            hw};
        plain_epilogue(args);
        return args;
    }

    // Workspace bytes of the up (2 * experts groups) and down (experts groups) GEMMs, the larger:
    // they share one workspace. It depends on the group and SM counts only, so no arrays are needed.
    static size_t workspace_bytes(uint32_t experts, uint32_t sm_count) {
        const Arrays none{};
        const size_t up = Gemm::get_workspace_size(arguments(none, 0, 2 * experts, (int)sm_count));
        const size_t down = Gemm::get_workspace_size(arguments(none, 0, experts, (int)sm_count));
        return up > down ? up : down;
    }

    // Runs the grouped GEMM over groups `first` .. `first + count` of `g` on `stream`: 0, or the
    // error code of the shims' header.
    static int run(const Arrays& g, uint32_t first, uint32_t count, uint32_t sm_count, uint8_t* workspace,
                   size_t workspace_bytes, cudaStream_t stream) {
        return run_gemm<Gemm>(arguments(g, first, count, (int)sm_count), workspace, workspace_bytes, stream);
    }
};

// The expert MLP's group g of 3 * experts (see the header): up GEMMs read `xs` [S, hidden] and
// write `gate_up` [2, S, inter]; down GEMMs read `act` [S, inter] and write `down` [S, hidden]. The
// weight stacks are [experts, inter, hidden] (w1, w3) and [experts, hidden, inter] (w2).
template <class G>
__device__ void set_expert_group(const typename G::Arrays& arrays, uint32_t g, uint32_t experts,
                                 const int32_t* expert_offsets, size_t slots, uint32_t hidden, uint32_t inter,
                                 const void* xs, const void* act, const void* w1, const void* w3,
                                 const void* w2, float* gate_up, float* down) {
    using E = typename G::ElementAB;
    const uint32_t e = g % experts;
    const int first = expert_offsets[e];
    const int m = expert_offsets[e + 1] - first;
    if (g < 2 * experts) {
        const bool up = g >= experts;
        const size_t n = inter, k = hidden;
        G::set(arrays, g, m, (int)n, (int)k, static_cast<const E*>(xs) + first * k,
               static_cast<const E*>(up ? w3 : w1) + e * n * k, gate_up + (up ? slots * n : 0) + first * n);
    } else {
        const size_t n = hidden, k = inter;
        G::set(arrays, g, m, (int)n, (int)k, static_cast<const E*>(act) + first * k,
               static_cast<const E*>(w2) + e * n * k, down + first * n);
    }
}

// Whether expert-sorted row r belongs to the experts held: expert_offsets holds the router's
// absolute row offsets of a range of its experts (all of them, or a rank's), so a rank's rows are
// expert_offsets[0] .. expert_offsets[experts] and every other row is another rank's.
__device__ __forceinline__ bool row_held(const int32_t* expert_offsets, uint32_t experts, uint32_t r) {
    return (uint32_t)expert_offsets[0] <= r && r < (uint32_t)expert_offsets[experts];
}

// The expert whose expert-sorted rows hold row r: the last e with expert_offsets[e] <= r.
__device__ __forceinline__ uint32_t expert_of_row(const int32_t* expert_offsets, uint32_t experts, uint32_t r) {
    uint32_t lo = 0, hi = experts;  // expert_offsets[lo] <= r < expert_offsets[hi]
    while (hi - lo > 1) {
        const uint32_t mid = (lo + hi) / 2;
        if ((uint32_t)expert_offsets[mid] <= r) lo = mid; else hi = mid;
    }
    return lo;
}

// Step 1 of an expert shim, one thread per group g of 3 * experts: the group's shape, pointers and
// strides from the router's offsets (set_expert_group), for either shim's parameters `P`.
template <class G, class P>
__global__ void expert_setup(P p) {
    const uint32_t groups = 3 * p.experts;
    const uint32_t g = blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= groups) return;
    set_expert_group<G>(G::arrays(p.groups, groups), g, p.experts, p.expert_offsets, (size_t)p.tokens * p.top_k,
                        p.hidden, p.inter, p.xs, p.act, p.w1, p.w3, p.w2, p.gate_up, p.down);
}

// Threads of the expert shims' per-row kernels (gather, SwiGLU, scatter: one block per
// expert-sorted row; a block whose row is not held returns at once).
constexpr int ROW_THREADS = 256;

// The six steps of an expert shim on `stream`, each kernel taking the shim's parameters `p`:
// expert_setup, gather, the up GEMM (groups 0 .. 2E), SwiGLU, the down
// GEMM (groups 2E .. 3E), scatter (one block of ROW_THREADS per expert-sorted row each). Zero slots
// launch nothing. Returns 0 or the error code of the shims' header.
template <class G, class P>
int run_expert_mlp(const P& p, cudaStream_t stream, void (*gather)(P), void (*swiglu)(P), void (*scatter)(P)) {
    const uint32_t slots = p.tokens * p.top_k, groups = 3 * p.experts;
    if (slots == 0) return 0;
    const typename G::Arrays arrays = G::arrays(p.groups, groups);
    expert_setup<G, P><<<(groups + 127) / 128, 128, 0, stream>>>(p);
    gather<<<slots, ROW_THREADS, 0, stream>>>(p);
    if (int c = cuda_code(cudaGetLastError())) return c;
    if (int c = G::run(arrays, 0, 2 * p.experts, p.sm_count, p.workspace, p.workspace_bytes, stream)) return c;
    swiglu<<<slots, ROW_THREADS, 0, stream>>>(p);
    if (int c = cuda_code(cudaGetLastError())) return c;
    if (int c = G::run(arrays, 2 * p.experts, p.experts, p.sm_count, p.workspace, p.workspace_bytes, stream)) return c;
    scatter<<<slots, ROW_THREADS, 0, stream>>>(p);
    return cuda_code(cudaGetLastError());
}

}  // namespace mx_cutlass
