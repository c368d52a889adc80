//! STUB: grouped expert GEMM (being written).

use cudarc::driver::CudaStream;

use super::super::error::CudaError;
use super::super::module::Kernels;
use super::{moe_gemv, MoeBuffers, MoeShape};

/// STUB.
pub fn moe_grouped_gemm(
    _kernels: &Kernels,
    _stream: &CudaStream,
    shape: &MoeShape,
    _b: MoeBuffers<'_>,
) -> Result<(), CudaError> {
    Err(CudaError::Unsupported {
        op: "moe_grouped_gemm",
        what: "tokens",
        value: shape.tokens,
        reason: "not built yet".into(),
    })
}

/// STUB: always the GEMV.
pub fn moe_experts(
    kernels: &Kernels,
    stream: &CudaStream,
    shape: &MoeShape,
    b: MoeBuffers<'_>,
) -> Result<(), CudaError> {
    moe_gemv(kernels, stream, shape, b)
}
