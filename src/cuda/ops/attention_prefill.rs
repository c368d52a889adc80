//! STUB: prefill flash attention (being written).

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use super::super::error::CudaError;
use super::super::module::Kernels;
use super::PagedCacheShape;

/// Shapes of [`attention_prefill`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionPrefillShape {
    /// Query tokens (consecutive positions).
    pub tokens: usize,
    /// Position of the first query token.
    pub start_pos: usize,
    /// Block-table row of the sequence.
    pub seq_row: usize,
    /// Query heads.
    pub n_heads: usize,
    /// KV heads.
    pub n_kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Row stride of q.
    pub q_stride: usize,
    /// Cache shape.
    pub cache: PagedCacheShape,
    /// Sliding window.
    pub window: Option<usize>,
}

/// Buffers of [`attention_prefill`].
pub struct AttentionPrefillBuffers<'a> {
    /// q.
    pub q: &'a dyn DevicePtr<bf16>,
    /// k cache.
    pub k_cache: &'a dyn DevicePtr<bf16>,
    /// v cache.
    pub v_cache: &'a dyn DevicePtr<bf16>,
    /// block tables.
    pub block_tables: &'a dyn DevicePtr<i32>,
    /// out.
    pub out: &'a mut dyn DevicePtrMut<bf16>,
}

/// STUB.
pub fn attention_prefill(
    _kernels: &Kernels,
    _stream: &CudaStream,
    shape: &AttentionPrefillShape,
    _b: AttentionPrefillBuffers<'_>,
) -> Result<(), CudaError> {
    Err(CudaError::Unsupported {
        op: "attention_prefill",
        what: "tokens",
        value: shape.tokens,
        reason: "not built yet".into(),
    })
}
