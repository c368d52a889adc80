// linear_f32_sm90.cu: the dense prefill projection with f32 output (o, the LM head) on CUTLASS's Hopper
// GEMM (linear_sm90.cuh): out [tokens, out_features] f32 = x [tokens, in_features] . w [out_features, in_features]^T.
#include "linear_sm90.cuh"

MX_LINEAR_CUTLASS_ENTRIES(f32, float)
