//! STUB: device top-k / top-p sampling (being written).

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use super::super::error::CudaError;
use super::super::module::Kernels;

/// u64 words of RNG state per row.
pub const RNG_STATE_WORDS: usize = 4;

/// Shapes of [`sample`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleShape {
    /// Rows.
    pub rows: usize,
    /// Row length.
    pub vocab: usize,
}

/// Buffers of [`sample`].
pub struct SampleBuffers<'a> {
    /// logits.
    pub logits: &'a dyn DevicePtr<f32>,
    /// temperature.
    pub temperature: &'a dyn DevicePtr<f32>,
    /// top_k.
    pub top_k: &'a dyn DevicePtr<u32>,
    /// top_p.
    pub top_p: &'a dyn DevicePtr<f32>,
    /// rng state.
    pub rng_state: &'a mut dyn DevicePtrMut<u64>,
    /// ids.
    pub out_ids: &'a mut dyn DevicePtrMut<u32>,
}

/// STUB.
pub fn rng_state_for_seed(seed: u64) -> Vec<u64> {
    vec![seed; RNG_STATE_WORDS]
}

/// STUB.
pub fn sample(
    _kernels: &Kernels,
    _stream: &CudaStream,
    shape: &SampleShape,
    _b: SampleBuffers<'_>,
) -> Result<(), CudaError> {
    Err(CudaError::Unsupported {
        op: "sample",
        what: "rows",
        value: shape.rows,
        reason: "not built yet".into(),
    })
}
