// moe_experts_q8_sm90.cu: the 8-bit expert MLP of moe_experts_q8.cuh (sm_90a only) over FP8 E4M3
// stacks and over INT8 stacks, behind two `extern "C"` host entry points per format. Both formats
// in one translation unit, so that nvcc reads CUTLASS's headers once (two units took about 30 s of
// a core more on a 2-core VM).
#include "moe_experts_q8.cuh"

// Workspace bytes of the FP8 grouped GEMMs of `experts` experts on a GPU of `sm_count` SMs.
extern "C" size_t mx_moe_cutlass_fp8_workspace_bytes(uint32_t experts, uint32_t sm_count) {
    return mx_cutlass::Fp8Codes::Gemm::workspace_bytes(experts, sm_count);
}

// The six steps of moe_experts_q8.cuh over FP8 stacks on `stream` (a CUstream / cudaStream_t).
extern "C" int mx_moe_cutlass_fp8_run(const MoeCutlassQ8Params* params, void* stream) {
    return mx_cutlass::run_q8<mx_cutlass::Fp8Codes>(*params, static_cast<cudaStream_t>(stream));
}

// Workspace bytes of the INT8 grouped GEMMs of `experts` experts on a GPU of `sm_count` SMs.
extern "C" size_t mx_moe_cutlass_int8_workspace_bytes(uint32_t experts, uint32_t sm_count) {
    return mx_cutlass::Int8Codes::Gemm::workspace_bytes(experts, sm_count);
}

// The six steps of moe_experts_q8.cuh over INT8 stacks on `stream` (a CUstream / cudaStream_t).
extern "C" int mx_moe_cutlass_int8_run(const MoeCutlassQ8Params* params, void* stream) {
    return mx_cutlass::run_q8<mx_cutlass::Int8Codes>(*params, static_cast<cudaStream_t>(stream));
}
