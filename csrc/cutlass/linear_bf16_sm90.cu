// linear_bf16_sm90.cu: the dense prefill projection with bf16 output (q/k/v) on CUTLASS's Hopper GEMM
// (linear_sm90.cuh): out [tokens, out_features] bf16 = x [tokens, in_features] . w [out_features, in_features]^T.
#include "linear_sm90.cuh"

MX_LINEAR_CUTLASS_ENTRIES(bf16, cutlass::bfloat16_t)
