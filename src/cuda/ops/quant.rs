//! Launchers of the kernels that read quantized weights in the packed layout of
//! [`crate::quant::packed`] (FP8 / INT8 codes with a scale per row, 4-bit codes with a
//! `(scale, zero)` pair per row and group, an optional act-order permutation of the input columns):
//! - [`qlinear`]: the dense projection of a decode batch (at most `LINEAR_GEMV_MAX_TOKENS` tokens),
//!   the same product and outputs as [`super::linear`];
//! - [`qmoe_gemv`]: the routed expert MLPs of a decode batch, the same buffers and results as
//!   [`super::moe_gemv`];
//! - [`dequantize`]: a stack of packed matrices expanded to bf16 `[count, rows, cols]` in input-column
//!   order, for the tensor-core kernels of prefill chunks.
//!
//! STUB: the kernels are not written yet; every launcher refuses with `CudaError::Unsupported`.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use super::{LinearOut, LinearShape, MoeShape};
use crate::cuda::error::CudaError;
use crate::cuda::module::Kernels;
use crate::quant::PackedKind;

/// A stack of `count` packed matrices `[rows, cols]` on the device (one for a projection, one per
/// expert for the expert stacks), laid out as [`crate::quant::packed`] describes, matrix after
/// matrix.
pub struct QuantWeights<'a> {
    /// Element format, the same for every matrix of the stack.
    pub kind: PackedKind,
    /// `[count, rows, row bytes]` codes (row bytes `cols`, or `cols / 2` for 4-bit); 16-byte aligned.
    pub codes: &'a dyn DevicePtr<u8>,
    /// `[count, rows]` scales (8-bit) or `[count, rows, groups, 2]` `(scale, zero)` pairs (4-bit).
    pub params: &'a dyn DevicePtr<f32>,
    /// `None`, or `[count, cols]`: the input column of each stored column of each matrix.
    pub perm: Option<&'a dyn DevicePtr<u32>>,
}

/// Buffers of [`qlinear`].
pub struct QLinearBuffers<'a> {
    /// `[tokens, in_features]` input rows (16-byte aligned).
    pub x: &'a dyn DevicePtr<bf16>,
    /// One packed matrix `[out_features, in_features]`.
    pub w: QuantWeights<'a>,
    /// `[tokens, out_features]` output.
    pub out: LinearOut<'a>,
}

/// Buffers of [`qmoe_gemv`]: those of [`super::MoeBuffers`] with packed expert stacks. `w1` and
/// `w3` must share their permutation (the same buffer, or none for both).
pub struct QMoeBuffers<'a> {
    /// `[tokens, hidden]` normalised hidden states (16-byte aligned).
    pub x: &'a dyn DevicePtr<bf16>,
    /// `experts` packed `[inter, hidden]` gate projections.
    pub w1: QuantWeights<'a>,
    /// `experts` packed `[inter, hidden]` up projections.
    pub w3: QuantWeights<'a>,
    /// `experts` packed `[hidden, inter]` down projections.
    pub w2: QuantWeights<'a>,
    /// `[tokens, top_k]` routing weights.
    pub topk_weights: &'a dyn DevicePtr<f32>,
    /// `[experts + 1]` slot offsets per expert.
    pub expert_offsets: &'a dyn DevicePtr<i32>,
    /// `[tokens * top_k]` slots grouped by expert.
    pub sorted_slots: &'a dyn DevicePtr<i32>,
    /// `[tokens * top_k, inter]` scratch: SwiGLU activations per slot.
    pub act: &'a mut dyn DevicePtrMut<bf16>,
    /// `[tokens * top_k, hidden]` weighted expert output per slot.
    pub out: &'a mut dyn DevicePtrMut<f32>,
}

/// Shapes of [`dequantize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DequantShape {
    /// Matrices in the stack.
    pub count: usize,
    /// Rows of each.
    pub rows: usize,
    /// Columns of each.
    pub cols: usize,
}

fn not_yet(op: &'static str) -> CudaError {
    CudaError::Unsupported {
        op,
        what: "kernel",
        value: 0,
        reason: "quantized kernels are not built yet".into(),
    }
}

/// `out[t, o] = sum_i x[t, i] * w[o, i]` with `w` packed, f32 accumulation; at most
/// `LINEAR_GEMV_MAX_TOKENS` tokens (prefill chunks [`dequantize`] and use [`super::linear`]).
pub fn qlinear(
    _kernels: &Kernels,
    _stream: &CudaStream,
    _shape: &LinearShape,
    _b: QLinearBuffers<'_>,
) -> Result<(), CudaError> {
    Err(not_yet("qlinear"))
}

/// The routed expert MLPs of a decode batch over packed expert stacks: `act = silu(w1 x) * (w3 x)`,
/// `out = weight * (w2 act)` per slot.
pub fn qmoe_gemv(
    _kernels: &Kernels,
    _stream: &CudaStream,
    _shape: &MoeShape,
    _b: QMoeBuffers<'_>,
) -> Result<(), CudaError> {
    Err(not_yet("qmoe_gemv"))
}

/// Expands the packed stack `w` to bf16 `out` `[count, rows, cols]` in input-column order
/// (`out[m][r][perm[j]] = value of stored column j`).
pub fn dequantize(
    _kernels: &Kernels,
    _stream: &CudaStream,
    _shape: &DequantShape,
    _w: QuantWeights<'_>,
    _out: &mut dyn DevicePtrMut<bf16>,
) -> Result<(), CudaError> {
    Err(not_yet("dequantize"))
}
