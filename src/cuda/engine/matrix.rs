//! Weight matrix stacks on the device, bf16 or packed (quantized, the layout of
//! [`crate::quant::packed`]), and the two products the forward pass takes of them:
//! - [`project`]: a dense projection. Packed weights go through `qlinear` for up to
//!   `LINEAR_GEMV_MAX_TOKENS` tokens; larger chunks expand the matrix to bf16 in a scratch buffer
//!   ([`DequantScratch`]) and take the tensor-core GEMM.
//! - [`experts`]: the routed expert MLPs. Packed stacks go through `qmoe_gemv` for up to
//!   [`QUANT_MOE_GEMV_MAX_TOKENS`] tokens; larger chunks expand all three stacks of the layer and take
//!   the grouped tensor-core GEMM.
//!
//! Which stacks are packed is decided on the host ([`stack_format`]): every matrix of the stack must
//! be packed, in one format, readable by the kernels, and (act-order) the matrices sharing an input
//! must share their column permutation (q/k/v; each expert's w1 and w3); otherwise the stack is
//! stored in bf16 from the dequantized values.

use cudarc::driver::CudaStream;
use half::bf16;

use super::super::args::{LinearArgs, LinearScalars, MoeArgs, MoeScalars, QMoeArgs};
use super::super::error::CudaError;
use super::super::memory::{AnyViewMut, View};
use super::super::module::Kernels;
use super::super::ops::{
    self, DequantShape, PackedView, MOE_GROUPED_MIN_TOKENS,
};
use super::super::select::{select, Choice, Device, Format, Op};
use super::super::region::{DeviceArena, Region};
use crate::quant::PackedKind;
use crate::weights::Weight;

pub use super::super::select::QUANT_MOE_GEMV_MAX_TOKENS;

/// How one stack of matrices is stored on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StackFormat {
    /// bf16 `[count, rows, cols]`.
    Bf16,
    /// Packed codes and parameters, with a `[count, cols]` column permutation when `perm`.
    Packed {
        /// Element format.
        kind: PackedKind,
        /// Whether the stack carries a column permutation.
        perm: bool,
    },
}

impl StackFormat {
    /// Device bytes of `count` matrices `[rows, cols]` in this format (each region rounded up to
    /// the arena's alignment by the caller's arithmetic being an upper bound within 3 * 256 bytes).
    pub fn bytes(self, count: usize, rows: usize, cols: usize) -> usize {
        let matrices = count * rows;
        match self {
            StackFormat::Bf16 => matrices * cols * 2,
            StackFormat::Packed { kind, perm } => {
                matrices * (kind.row_code_bytes(cols) + 4 * kind.row_params(cols))
                    + if perm { count * cols * 4 } else { 0 }
            }
        }
    }
}

/// The format of a stack made of `groups`: each group is matrices that share one input (stored one
/// after the other, e.g. q, k, v; or `w1[e]`, `w3[e]`), which must share a permutation. Packed when
/// every matrix is packed in one kind the kernels read; bf16 otherwise.
pub fn stack_format(groups: &[&[&Weight]]) -> StackFormat {
    let mut kind = None;
    let mut perm = false;
    for group in groups {
        let Some(first) = group.first().and_then(|w| w.tensor.packed()) else {
            return StackFormat::Bf16;
        };
        for w in group.iter() {
            let Some(p) = w.tensor.packed() else {
                return StackFormat::Bf16;
            };
            if p.gpu_layout_ok().is_err() || p.perm != first.perm || p.cols != first.cols {
                return StackFormat::Bf16;
            }
            if *kind.get_or_insert(p.kind) != p.kind {
                return StackFormat::Bf16;
            }
            perm |= p.perm.is_some();
        }
    }
    match kind {
        Some(kind) => StackFormat::Packed { kind, perm },
        None => StackFormat::Bf16,
    }
}

/// A packed stack of `count` matrices `[rows, cols]` on the device.
#[derive(Debug, Clone)]
pub struct PackedRegions {
    /// Element format.
    pub kind: PackedKind,
    /// Matrices.
    pub count: usize,
    /// Rows of each.
    pub rows: usize,
    /// Columns of each.
    pub cols: usize,
    /// `[count, rows, row bytes]`.
    pub codes: Region<u8>,
    /// `[count, rows, row params]`.
    pub params: Region<f32>,
    /// `[count, cols]` input column of each stored column.
    pub perm: Option<Region<u32>>,
}

impl PackedRegions {
    /// Allocates (zero-filled) a stack of `count` matrices `[rows, cols]`; `share_perm` reuses
    /// another stack's permutation (w3 shares w1's).
    pub fn allocate(
        arena: &mut DeviceArena,
        (kind, perm): (PackedKind, bool),
        (count, rows, cols): (usize, usize, usize),
        share_perm: Option<&Region<u32>>,
        what: &str,
    ) -> Result<PackedRegions, CudaError> {
        let matrices = count * rows;
        let codes = arena.zeroed(
            matrices * kind.row_code_bytes(cols),
            &format!("{what} codes"),
        )?;
        let params = arena.zeroed(matrices * kind.row_params(cols), &format!("{what} scales"))?;
        let perm = match (perm, share_perm) {
            (false, _) => None,
            (true, Some(shared)) => Some(shared.clone()),
            (true, None) => Some(arena.zeroed(count * cols, &format!("{what} permutation"))?),
        };
        Ok(PackedRegions {
            kind,
            count,
            rows,
            cols,
            codes,
            params,
            perm,
        })
    }

    fn view(&self) -> PackedView<'_> {
        PackedView {
            kind: self.kind,
            codes: self.codes.view(),
            params: self.params.view(),
            perm: self.perm.as_ref().map(Region::view),
        }
    }
}

/// One stack of weight matrices on the device.
#[derive(Debug, Clone)]
pub enum DeviceMatrix {
    /// bf16 `[count, rows, cols]`.
    Bf16(Region<bf16>),
    /// Packed.
    Packed(PackedRegions),
}

impl DeviceMatrix {
    /// The packed stack, if packed.
    pub fn packed(&self) -> Option<&PackedRegions> {
        match self {
            DeviceMatrix::Packed(p) => Some(p),
            DeviceMatrix::Bf16(_) => None,
        }
    }
}

/// bf16 buffers packed stacks are expanded into for chunks too large for the packed kernels:
/// `dense` for the largest packed projection, `w1`, `w3`, `w2` for one layer's expert stacks.
#[derive(Debug, Default)]
pub struct DequantScratch {
    /// `[rows, cols]` of the largest packed projection.
    pub dense: Option<Region<bf16>>,
    /// `[experts, inter, hidden]`.
    pub w1: Option<Region<bf16>>,
    /// `[experts, inter, hidden]`.
    pub w3: Option<Region<bf16>>,
    /// `[experts, hidden, inter]`.
    pub w2: Option<Region<bf16>>,
}

fn no_scratch(what: &'static str, tokens: usize) -> CudaError {
    CudaError::Unsupported {
        op: "forward",
        what,
        value: tokens,
        reason: "tokens past the packed kernels' range, and no dequantization scratch".into(),
    }
}

/// Expands `p` into the start of `scratch` (bf16, input-column order), which the bf16 kernels then
/// read (they touch only the first `count * rows * cols` elements).
fn expand<'a>(
    kernels: &Kernels,
    stream: &CudaStream,
    p: &PackedRegions,
    scratch: Option<&'a Region<bf16>>,
    tokens: usize,
) -> Result<&'a Region<bf16>, CudaError> {
    let scratch = scratch.ok_or_else(|| no_scratch("tokens", tokens))?;
    let elements = p.count * p.rows * p.cols;
    let mut out = scratch.sub(0, elements).ok_or(CudaError::BufferTooSmall {
        op: "dequantize",
        buffer: "scratch",
        expected: elements,
        actual: scratch.len_elems(),
    })?;
    ops::dequantize(
        kernels,
        stream,
        &DequantShape {
            count: p.count as u32,
            rows: p.rows as u32,
            cols: p.cols as u32,
        },
        p.view(),
        out.view_mut(),
    )?;
    Ok(scratch)
}

/// `out = x @ w^T` over `s` for a bf16 or packed `w` (see the module documentation).
pub fn project<'a>(
    kernels: &Kernels,
    stream: &CudaStream,
    s: &LinearScalars,
    x: View<'a, bf16>,
    w: &'a DeviceMatrix,
    out: AnyViewMut<'a>,
    scratch: &'a DequantScratch,
) -> Result<(), CudaError> {
    let dense = match w {
        DeviceMatrix::Bf16(w) => w,
        DeviceMatrix::Packed(p)
            if select(
                Op::Projection,
                s.tokens as usize,
                Format::Packed,
                Device::default(),
            ) == Choice::QLinear =>
        {
            return ops::qlinear(kernels, stream, s, x, p.view(), out);
        }
        DeviceMatrix::Packed(p) => expand(
            kernels,
            stream,
            p,
            scratch.dense.as_ref(),
            s.tokens as usize,
        )?,
    };
    let w = dense.view();
    ops::linear(kernels, stream, s, LinearArgs { x, w, out })
}

/// The routing buffers and outputs of [`experts`] (those of [`MoeArgs`] besides the weights).
pub struct ExpertIo<'a> {
    /// `[tokens, hidden]` normalised hidden states.
    pub x: &'a Region<bf16>,
    /// `[tokens, top_k]` routing weights.
    pub topk_weights: &'a Region<f32>,
    /// `[experts + 1]` slot offsets per expert.
    pub expert_offsets: &'a Region<i32>,
    /// `[tokens * top_k]` slots grouped by expert.
    pub sorted_slots: &'a Region<i32>,
    /// `[tokens * top_k, inter]` scratch.
    pub act: &'a mut Region<bf16>,
    /// `[tokens * top_k, hidden]` weighted expert outputs.
    pub out: &'a mut Region<f32>,
}

/// Which tensor-core kernels run the expert GEMMs of chunks of [`MOE_GROUPED_MIN_TOKENS`] tokens
/// or more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupedKernel {
    /// `moe_grouped_gemm` (mma.sync; every supported GPU).
    #[default]
    Mma,
    /// `moe_wgmma_gemm` (Hopper warpgroup MMA), once its self-check passed on this device.
    Wgmma,
}

/// The routed expert MLPs of one layer over bf16 or packed stacks (see the module documentation);
/// `grouped` picks the tensor-core kernels of large chunks.
pub fn experts<'a>(
    kernels: &Kernels,
    stream: &CudaStream,
    shape: &MoeScalars,
    [w1, w3, w2]: [&'a DeviceMatrix; 3],
    io: ExpertIo<'a>,
    scratch: &'a DequantScratch,
    grouped: GroupedKernel,
) -> Result<(), CudaError> {
    let device = Device {
        hopper_experts: grouped == GroupedKernel::Wgmma,
    };
    if let (Some(p1), Some(p3), Some(p2)) = (w1.packed(), w3.packed(), w2.packed()) {
        if select(Op::Experts, shape.tokens as usize, Format::Packed, device) == Choice::QMoeGemv {
            let (w1, w3, w2) = (p1.view(), p3.view(), p2.view());
            let s = *shape;
            let args = QMoeArgs {
                x: io.x.view(),
                w1_codes: w1.codes,
                w1_params: w1.params,
                w3_codes: w3.codes,
                w3_params: w3.params,
                w13_perm: ops::shared_perm(w1.perm, w3.perm)?,
                w2_codes: w2.codes,
                w2_params: w2.params,
                w2_perm: w2.perm,
                topk_weights: io.topk_weights.view(),
                expert_offsets: io.expert_offsets.view(),
                sorted_slots: io.sorted_slots.view(),
                act: io.act.view_mut(),
                out: io.out.view_mut(),
            };
            return ops::qmoe_gemv(kernels, stream, &s, [w1.kind, w3.kind, w2.kind], args);
        }
    }
    let dense = |w: &'a DeviceMatrix, s: &'a Option<Region<bf16>>| match w {
        DeviceMatrix::Bf16(r) => Ok(r),
        DeviceMatrix::Packed(p) => expand(kernels, stream, p, s.as_ref(), shape.tokens as usize),
    };
    let args = MoeArgs {
        x: io.x.view(),
        w1: dense(w1, &scratch.w1)?.view(),
        w3: dense(w3, &scratch.w3)?.view(),
        w2: dense(w2, &scratch.w2)?.view(),
        topk_weights: io.topk_weights.view(),
        expert_offsets: io.expert_offsets.view(),
        sorted_slots: io.sorted_slots.view(),
        act: io.act.view_mut(),
        out: io.out.view_mut(),
    };
    if grouped == GroupedKernel::Wgmma && shape.tokens as usize >= MOE_GROUPED_MIN_TOKENS {
        ops::moe_wgmma_gemm(kernels, stream, shape, args)
    } else {
        ops::moe_experts(kernels, stream, shape, args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::TensorView;
    use crate::quant::{int4, PackedMatrix};
    use std::sync::Arc;

    fn packed_weight(p: PackedMatrix) -> Weight {
        let (rows, cols) = (p.rows, p.cols);
        let tensor =
            TensorView::from_packed("w", vec![rows, cols], Arc::new(p), "/tmp/none").unwrap();
        Weight { rows, cols, tensor }
    }

    fn fp8(rows: usize, cols: usize) -> Weight {
        let w: Vec<f32> = (0..rows * cols).map(|i| (i % 13) as f32 * 0.01).collect();
        packed_weight(
            crate::quant::packed::quantize(crate::quant::QuantFormat::Fp8, &w, rows, cols)
                .unwrap()
                .unwrap(),
        )
    }

    fn int4(rows: usize, cols: usize, perm: Option<Vec<u32>>) -> Weight {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| (i % 7) as f32 * 0.1 - 0.3)
            .collect();
        let mut p = PackedMatrix::from_rtn(&int4::quantize_rtn(&w, rows, cols, 32)).unwrap();
        p.perm = perm;
        packed_weight(p)
    }

    fn float(rows: usize, cols: usize) -> Weight {
        let tensor =
            TensorView::from_f32("w", vec![rows, cols], vec![0.5; rows * cols], "/tmp/none")
                .unwrap();
        Weight { rows, cols, tensor }
    }

    #[test]
    fn one_kind_across_the_stack_is_packed() {
        let (a, b) = (fp8(4, 32), fp8(8, 32));
        assert_eq!(
            stack_format(&[&[&a, &b]]),
            StackFormat::Packed {
                kind: PackedKind::Fp8,
                perm: false
            }
        );
        let c = int4(4, 64, None);
        assert_eq!(
            stack_format(&[&[&a], &[&c]]),
            StackFormat::Bf16,
            "mixed kinds"
        );
        assert_eq!(stack_format(&[&[&a, &float(4, 32)]]), StackFormat::Bf16);
        assert_eq!(
            stack_format(&[&[&fp8(4, 24)]]),
            StackFormat::Bf16,
            "24 columns"
        );
    }

    #[test]
    fn matrices_sharing_an_input_must_share_the_permutation() {
        let perm: Vec<u32> = (0..64).rev().collect();
        let other: Vec<u32> = (0..64).collect();
        let (a, b) = (int4(4, 64, Some(perm.clone())), int4(4, 64, Some(perm)));
        let packed = StackFormat::Packed {
            kind: PackedKind::Int4 { group_size: 32 },
            perm: true,
        };
        assert_eq!(stack_format(&[&[&a, &b]]), packed);
        let c = int4(4, 64, Some(other));
        assert_eq!(stack_format(&[&[&a, &c]]), StackFormat::Bf16);
        // Different groups (different inputs, e.g. two experts) may differ.
        assert_eq!(stack_format(&[&[&a], &[&c]]), packed);
        assert_eq!(stack_format(&[&[&a], &[&int4(4, 64, None)]]), packed);
    }

    #[test]
    fn stack_bytes_follow_the_packed_layout() {
        let fp8 = StackFormat::Packed {
            kind: PackedKind::Fp8,
            perm: false,
        };
        assert_eq!(fp8.bytes(8, 14336, 4096), 8 * 14336 * (4096 + 4));
        let int4 = StackFormat::Packed {
            kind: PackedKind::Int4 { group_size: 128 },
            perm: true,
        };
        assert_eq!(
            int4.bytes(8, 14336, 4096),
            8 * 14336 * (2048 + 4 * 64) + 8 * 4096 * 4
        );
        assert_eq!(StackFormat::Bf16.bytes(2, 3, 8), 96);
        // Mixtral-8x7B's expert stacks of one layer, w1 + w3 + w2: fp8 about half of bf16.
        let bf16 = 3 * StackFormat::Bf16.bytes(8, 14336, 4096);
        let q = 3 * fp8.bytes(8, 14336, 4096);
        assert!(q * 2 < bf16 + bf16 / 100);
    }
}
