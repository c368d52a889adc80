// moe_experts_fp8_sm90.cu: the 8-bit expert MLP of moe_experts_q8.cuh over FP8 E4M3 stacks (sm_90a
// only), behind two `extern "C"` host entry points. Its own translation unit, so that the FP8 and
// INT8 GEMMs compile in parallel.
#include "moe_experts_q8.cuh"

// Workspace bytes of the FP8 grouped GEMMs of `experts` experts on a GPU of `sm_count` SMs.
extern "C" size_t mx_moe_cutlass_fp8_workspace_bytes(uint32_t experts, uint32_t sm_count) {
    return mx_cutlass::Fp8Codes::Gemm::workspace_bytes(experts, sm_count);
}

// The six steps of moe_experts_q8.cuh over FP8 stacks on `stream` (a CUstream / cudaStream_t).
extern "C" int mx_moe_cutlass_fp8_run(const MoeCutlassQ8Params* params, void* stream) {
    return mx_cutlass::run_q8<mx_cutlass::Fp8Codes>(*params, static_cast<cudaStream_t>(stream));
}
