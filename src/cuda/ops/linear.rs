//! STUB: dense linear op (being written): `y[tokens, out] = x[tokens, in] @ W[out, in]^T`.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use super::super::error::CudaError;
use super::super::module::Kernels;

/// Shapes of [`linear`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearShape {
    /// Rows of x.
    pub tokens: usize,
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
}

/// Output of [`linear`].
pub enum LinearOut<'a> {
    /// bf16.
    Bf16(&'a mut dyn DevicePtrMut<bf16>),
    /// f32.
    F32(&'a mut dyn DevicePtrMut<f32>),
}

/// Buffers of [`linear`].
pub struct LinearBuffers<'a> {
    /// `[tokens, in]`.
    pub x: &'a dyn DevicePtr<bf16>,
    /// `[out, in]`.
    pub w: &'a dyn DevicePtr<bf16>,
    /// `[tokens, out]`.
    pub out: LinearOut<'a>,
}

/// STUB.
pub fn linear(
    _kernels: &Kernels,
    _stream: &CudaStream,
    shape: &LinearShape,
    _b: LinearBuffers<'_>,
) -> Result<(), CudaError> {
    Err(CudaError::Unsupported {
        op: "linear",
        what: "tokens",
        value: shape.tokens,
        reason: "not built yet".into(),
    })
}
