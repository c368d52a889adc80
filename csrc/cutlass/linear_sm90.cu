// linear_sm90.cu: the dense prefill projections on CUTLASS's Hopper GEMM (linear_sm90.cuh, sm_90a
// only), one pair of `extern "C"` host entry points per output type, bf16 (q/k/v) and f32 (o, the
// LM head): out [tokens, out_features] = x [tokens, in_features] . w [out_features, in_features]^T.
// Both in one translation unit, so that nvcc reads CUTLASS's headers once (two units took about
// 40 s of a core more on a 2-core VM).
#include "linear_sm90.cuh"

MX_LINEAR_CUTLASS_ENTRIES(bf16, cutlass::bfloat16_t)
MX_LINEAR_CUTLASS_ENTRIES(f32, float)
