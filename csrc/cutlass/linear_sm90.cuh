// linear_sm90.cuh: the dense projection of prefill chunks (q/k/v, o, the LM head) on CUTLASS's Hopper
// GEMM (sm_90a only), one type per output element (both instantiated by linear_sm90.cu):
//
//   out [tokens, out_features] bf16 or f32 = x [tokens, in_features] bf16 . w [out_features, in_features]^T bf16
//
// with f32 accumulation, rounded once at the store. It is computed transposed: CUTLASS's
// D [M, N] = A [M, K] . B [N, K]^T with M = out_features (A = w, row-major), N = tokens (B = x,
// K-contiguous rows: "column-major" in CUTLASS's terms) and D column-major (element (m, n) at
// n * M + m), which is `out` row-major. So the weight rows take the 128-row side of a tile at any
// token count, and a chunk of 17 to 128 tokens is one tile column.
//
// Tiles 128 x 128 x 64, `KernelTmaWarpSpecializedCooperative` (TMA loads, two consumer warpgroups of
// wgmma), cluster 1 x 1, no C operand, and CUTLASS's stream-K tile scheduler over `sm_count`
// persistent blocks: where the output tiles are fewer than the SMs (Mixtral's q/k/v at up to 128
// tokens: 48 tiles on an H100's 132 SMs; o: 32) the K loops of the tiles are split between blocks
// and the partial accumulators meet in `workspace` (reduced in a fixed order: the result does not
// depend on timing); with enough tiles its heuristic runs them data-parallel.
//
// Alignment: TMA needs 16-byte aligned rows and starts: in_features and out_features multiples of 8
// and 16-byte aligned buffers (checked by the Rust planner, src/cuda/ops/linear_cutlass.rs).
// Errors: each entry returns 0, a cudaError_t (1..999), or MOE_CUTLASS_STATUS_BASE + cutlass::Status.
#pragma once

#include "grouped_gemm_sm90.cuh"

namespace mx_linear_cutlass {


template <class ElementD_>
struct DenseGemm {
    using ElementAB = cutlass::bfloat16_t;
    using ElementD = ElementD_;
    using LayoutA = cutlass::layout::RowMajor;
    using LayoutB = cutlass::layout::ColumnMajor;
    using LayoutD = cutlass::layout::ColumnMajor;
    static constexpr int ALIGN_AB = 16 / sizeof(ElementAB);
    static constexpr int ALIGN_D = 16 / sizeof(ElementD);

    using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
    using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;

    using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
        cutlass::epilogue::collective::EpilogueTileAuto, float, float,
        void, LayoutD, ALIGN_D,  // no C operand
        ElementD, LayoutD, ALIGN_D, cutlass::epilogue::TmaWarpSpecializedCooperative,
        cutlass::epilogue::fusion::LinearCombination<ElementD, float>>::CollectiveOp;

    using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementAB, LayoutA, ALIGN_AB, ElementAB, LayoutB,
        ALIGN_AB, float, TileShape, ClusterShape,
        cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
        cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

    using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop, Epilogue,
                                                        cutlass::gemm::StreamKScheduler>;
    using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

    // The GEMM's arguments for `p` (M = out_features, N = tokens, K = in_features).
    static typename Gemm::Arguments arguments(const LinearCutlassParams& p) {
        const int m = (int)p.out_features, n = (int)p.tokens, k = (int)p.in_features;
        cutlass::KernelHardwareInfo hw;
        hw.device_id = 0;  // unused when sm_count is given
        hw.sm_count = (int)p.sm_count;
        const auto stride_a = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, cute::make_shape(m, k, 1));
        const auto stride_b = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, cute::make_shape(n, k, 1));
        const auto stride_d = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, cute::make_shape(m, n, 1));
        typename Gemm::Arguments args{
            cutlass::gemm::GemmUniversalMode::kGemm,
            {m, n, k, 1},
            {reinterpret_cast<const ElementAB*>(p.w), stride_a, reinterpret_cast<const ElementAB*>(p.x), stride_b},
            {{}, nullptr, stride_d, static_cast<ElementD*>(p.out), stride_d},
            hw};
        mx_cutlass::plain_epilogue(args);
        return args;
    }

    // Workspace bytes of the GEMM of `p`'s shape on `p.sm_count` SMs (buffers unused).
    static size_t workspace_bytes(const LinearCutlassParams& p) { return Gemm::get_workspace_size(arguments(p)); }

    // Runs the GEMM of `p` on `stream`: 0, or the error code of the header; zero tokens launch nothing.
    static int run(const LinearCutlassParams& p, cudaStream_t stream) {
        if (p.tokens == 0) return 0;
        return mx_cutlass::run_gemm<Gemm>(arguments(p), p.workspace, p.workspace_bytes, stream);
    }
};

}  // namespace mx_linear_cutlass

// The two `extern "C"` entries of one output element type: mx_linear_cutlass_<NAME>_workspace_bytes
// (buffers unused) and mx_linear_cutlass_<NAME>_run (on a CUstream / cudaStream_t).
#define MX_LINEAR_CUTLASS_ENTRIES(NAME, ELEMENT_D)                                                       \
    extern "C" size_t mx_linear_cutlass_##NAME##_workspace_bytes(const LinearCutlassParams* params) {    \
        return mx_linear_cutlass::DenseGemm<ELEMENT_D>::workspace_bytes(*params);                         \
    }                                                                                                      \
    extern "C" int mx_linear_cutlass_##NAME##_run(const LinearCutlassParams* params, void* stream) {      \
        return mx_linear_cutlass::DenseGemm<ELEMENT_D>::run(*params, static_cast<cudaStream_t>(stream)); \
    }
