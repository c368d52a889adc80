//! Weight matrix stacks on the device, bf16 or packed (quantized, the layout of
//! [`crate::quant::packed`]), and the two products the forward pass takes of them:
//! - [`project`]: a dense projection;
//! - [`experts`]: the routed expert MLPs.
//!
//! The selection table ([`select`](super::super::select)) picks the kernels from the token count
//! and the format; where it picks a bf16 kernel for packed weights, the stack is first expanded into
//! a bf16 scratch buffer ([`ProductScratch`]).
//!
//! Which stacks are packed is decided on the host ([`stack_format`]): every matrix of the stack must
//! be packed, in one format, readable by the kernels, and (act-order) the matrices sharing an input
//! must share their column permutation (q/k/v; each expert's w1 and w3); otherwise the stack is
//! stored in bf16 from the dequantized values.

use cudarc::driver::CudaStream;
use half::bf16;

use super::super::args::{LinearArgs, LinearScalars, MoeArgs, MoeScalars, QMoeArgs};
use super::super::error::{CudaError, KernelError};
use super::super::memory::{AnyViewMut, DeviceArena, DeviceBuffer, View, ViewMut};
use super::super::module::Kernels;
use super::super::ops::{
    self, mma_reads, DequantShape, MoeCutlassQ8Scratch, MoeCutlassScratch, PackedKernel, PackedView,
};
pub use super::super::select::GroupedKernel;
use super::super::select::{select, Choice, Device, Format, Op};
use super::host::HostTensor;
use crate::quant::{int4, PackedKind, QuantFormat, Q8};

/// How one stack of matrices is stored on the device (packed: codes, parameters, the permutation
/// when `perm`, and for 4-bit table codes the table's 16 f32 values).
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
    /// The element format when packed; `None` for bf16.
    pub fn kind(self) -> Option<PackedKind> {
        match self {
            StackFormat::Packed { kind, .. } => Some(kind),
            StackFormat::Bf16 => None,
        }
    }

    /// The storage of every projection stack of a model made with random weights in `format`
    /// (quantized on load: FP8 / INT8 per row, 4-bit in groups of [`int4::GROUP_SIZE`]).
    pub fn of_quant_format(format: QuantFormat) -> StackFormat {
        let kind = match format {
            QuantFormat::Bf16 => return StackFormat::Bf16,
            QuantFormat::Fp8 => PackedKind::Fp8,
            QuantFormat::Int8 => PackedKind::Int8,
            QuantFormat::Int4 => PackedKind::Int4 {
                group_size: int4::GROUP_SIZE,
            },
        };
        StackFormat::Packed { kind, perm: false }
    }
}

/// The values a stack of `kind` keeps on the device beside its codes: LUT4's table; `None` for the
/// other kinds.
pub fn table_values(kind: PackedKind) -> Option<[f32; 16]> {
    match kind {
        PackedKind::Lut4 { table, .. } => Some(table.values()),
        PackedKind::Fp8 | PackedKind::Int8 | PackedKind::Int4 { .. } => None,
    }
}

/// The format of a stack made of `groups`: each group is matrices that share one input (stored one
/// after the other, e.g. q, k, v; or `w1[e]`, `w3[e]`), which must share a permutation. Packed when
/// every matrix is packed in one kind the kernels read; bf16 otherwise.
pub fn stack_format<T: HostTensor>(groups: &[&[&T]]) -> StackFormat {
    let mut kind = None;
    let mut perm = false;
    for group in groups {
        let Some(first) = group.first().and_then(|w| w.packed()) else {
            return StackFormat::Bf16;
        };
        for w in group.iter() {
            let Some(p) = w.packed() else {
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
#[derive(Debug)]
pub struct PackedStack {
    /// Element format.
    pub kind: PackedKind,
    /// Matrices.
    pub count: usize,
    /// Rows of each.
    pub rows: usize,
    /// Columns of each.
    pub cols: usize,
    /// `[count, rows, row bytes]`.
    pub codes: DeviceBuffer<u8>,
    /// `[count, rows, row params]`.
    pub params: DeviceBuffer<f32>,
    /// `[count, cols]` input column of each stored column; `None` without a permutation, and for
    /// an up-projection stack (w3), which uses its gate stack's (w1).
    pub perm: Option<DeviceBuffer<u32>>,
    /// LUT4: `[16]` the table's values ([`table_values`], written by the upload); `None` for the
    /// other kinds.
    pub table: Option<DeviceBuffer<f32>>,
}

impl PackedStack {
    /// Allocates (zero-filled) a stack of `count` matrices `[rows, cols]`, with its own
    /// permutation when `perm`.
    pub fn allocate(
        arena: &mut DeviceArena,
        (kind, perm): (PackedKind, bool),
        (count, rows, cols): (usize, usize, usize),
        what: &str,
    ) -> Result<PackedStack, CudaError> {
        let matrices = count * rows;
        let codes = arena.zeroed(
            matrices * kind.row_code_bytes(cols),
            &format!("{what} codes"),
        )?;
        let params = arena.zeroed(
            matrices * kind.device_row_params(cols),
            &format!("{what} scales"),
        )?;
        let perm = match perm {
            false => None,
            true => Some(arena.zeroed(count * cols, &format!("{what} permutation"))?),
        };
        let table = match table_values(kind) {
            None => None,
            Some(t) => Some(arena.zeroed(t.len(), &format!("{what} table"))?),
        };
        Ok(PackedStack {
            kind,
            count,
            rows,
            cols,
            codes,
            params,
            perm,
            table,
        })
    }

    fn view(&self) -> PackedView<'_> {
        PackedView {
            kind: self.kind,
            codes: self.codes.view(),
            params: self.params.view(),
            perm: self.perm.as_ref().map(DeviceBuffer::view),
            table: self.table.as_ref().map(DeviceBuffer::view),
        }
    }
}

/// One stack of weight matrices on the device.
#[derive(Debug)]
pub enum DeviceMatrix {
    /// bf16 `[count, rows, cols]`.
    Bf16(DeviceBuffer<bf16>),
    /// Packed (boxed: its buffers make it several times the size of the bf16 variant).
    Packed(Box<PackedStack>),
}

impl DeviceMatrix {
    /// The packed stack, if packed.
    pub fn packed(&self) -> Option<&PackedStack> {
        match self {
            DeviceMatrix::Packed(p) => Some(p.as_ref()),
            DeviceMatrix::Bf16(_) => None,
        }
    }

    fn format(&self) -> Format {
        match self {
            DeviceMatrix::Bf16(_) => Format::Bf16,
            DeviceMatrix::Packed(p) if mma_reads(p.kind, p.cols, p.perm.is_some()) => {
                Format::PackedMma
            }
            DeviceMatrix::Packed(_) => Format::Packed,
        }
    }
}

/// The scratch of the weight products: bf16 buffers packed stacks are expanded into for chunks too
/// large for the packed kernels (`dense` for the largest packed projection, `w1`, `w3`, `w2` for
/// one layer's expert stacks), and the workspace of CUTLASS's dense GEMM where the engine runs the
/// projections of large chunks there.
#[derive(Debug, Default)]
pub struct ProductScratch {
    /// `[rows, cols]` of the largest packed projection.
    pub dense: Option<DeviceBuffer<bf16>>,
    /// `[experts, inter, hidden]`.
    pub w1: Option<DeviceBuffer<bf16>>,
    /// `[experts, inter, hidden]`.
    pub w3: Option<DeviceBuffer<bf16>>,
    /// `[experts, hidden, inter]`.
    pub w2: Option<DeviceBuffer<bf16>>,
    /// CUTLASS's dense-GEMM workspace: present only where its self-check (and that of the CUTLASS
    /// expert kernels) passed, and then the selection table runs large projections on it.
    pub linear: Option<ops::LinearCutlassScratch>,
}

/// The selection table's device for the projections: CUTLASS's kernels where the engine made the
/// dense GEMM's workspace, and the decode kernels the engine was asked for.
fn projection_device(on: &Products<'_>, cutlass: bool) -> Device {
    Device {
        mma_decode: on.mma_decode,
        grouped: if cutlass {
            GroupedKernel::Cutlass
        } else {
            GroupedKernel::Mma
        },
    }
}

/// `w` as bf16: its own buffer, or (packed) expanded into the start of `scratch` (input-column
/// order), which the bf16 kernels then read (they touch only the first `count * rows * cols`
/// elements). A packed stack without a permutation buffer of its own (w3) reads `shared_perm`
/// (w1's), as the packed kernels do.
fn dense<'a>(
    kernels: &Kernels,
    stream: &CudaStream,
    (w, shared_perm): (&'a DeviceMatrix, Option<&'a DeviceMatrix>),
    scratch: &'a mut Option<DeviceBuffer<bf16>>,
    tokens: u32,
) -> Result<View<'a, bf16>, CudaError> {
    let p = match w {
        DeviceMatrix::Bf16(w) => return Ok(w.view()),
        DeviceMatrix::Packed(p) => p,
    };
    let mut packed = p.view();
    if packed.perm.is_none() {
        packed.perm = shared_perm.and_then(|m| m.packed()?.view().perm);
    }
    let scratch = scratch.as_mut().ok_or_else(|| {
        CudaError::Kernel(KernelError::Unsupported {
            op: "forward",
            what: "tokens",
            value: tokens as usize,
            reason: "tokens past the packed kernels' range, and no dequantization scratch".into(),
        })
    })?;
    let elements = p.count * p.rows * p.cols;
    let capacity = scratch.len();
    let out = scratch
        .view_mut()
        .sub(0, elements)
        .ok_or(CudaError::Kernel(KernelError::BufferTooSmall {
            op: "dequantize",
            buffer: "scratch",
            expected: elements,
            actual: capacity,
        }))?;
    ops::dequantize(
        kernels,
        stream,
        &DequantShape {
            count: p.count as u32,
            rows: p.rows as u32,
            cols: p.cols as u32,
        },
        packed,
        out,
    )?;
    Ok(scratch.view())
}

/// Where the products launch: the kernels, the stream, and the optional decode kernels the engine
/// was asked for.
#[derive(Clone, Copy)]
pub struct Products<'a> {
    /// The loaded kernels.
    pub kernels: &'a Kernels,
    /// The stream every launch goes to.
    pub stream: &'a CudaStream,
    /// Decode batches over bf16 weights and the packed ones the tensor-core decode kernels read run
    /// on them ([`Device::mma_decode`]).
    pub mma_decode: bool,
}

/// `out = x @ w^T` over `s` for a bf16 or packed `w`, with the kernels the selection table picks.
pub fn project(
    on: Products<'_>,
    s: &LinearScalars,
    x: View<'_, bf16>,
    w: &DeviceMatrix,
    out: AnyViewMut<'_>,
    scratch: &mut ProductScratch,
) -> Result<(), CudaError> {
    let device = projection_device(&on, scratch.linear.is_some());
    let choice = select(Op::Projection, s.tokens as usize, w.format(), device);
    let packed_kernel = match choice {
        Choice::QLinear => Some(PackedKernel::Gemv),
        Choice::QLinearMma => Some(PackedKernel::Mma),
        _ => None,
    };
    let (kernels, stream) = (on.kernels, on.stream);
    if let (Some(kernel), DeviceMatrix::Packed(p)) = (packed_kernel, w) {
        return ops::qlinear(kernels, stream, s, (x, p.view()), out, kernel);
    }
    let w = dense(kernels, stream, (w, None), &mut scratch.dense, s.tokens)?;
    project_bf16(on, s, LinearArgs { x, w, out }, scratch.linear.as_mut())
}

/// `out = x @ w^T` over `s` for a bf16 `w` (a stack's, an expanded one, or the LM head), with the
/// kernel the selection table picks (CUTLASS's only with its workspace, `cutlass`).
pub fn project_bf16(
    on: Products<'_>,
    s: &LinearScalars,
    args: LinearArgs<'_>,
    cutlass: Option<&mut ops::LinearCutlassScratch>,
) -> Result<(), CudaError> {
    let device = projection_device(&on, cutlass.is_some());
    match (
        select(Op::Projection, s.tokens as usize, Format::Bf16, device),
        cutlass,
    ) {
        (Choice::LinearMmaDecode, _) => ops::linear_mma_decode(on.kernels, on.stream, s, args),
        (Choice::LinearCutlass, Some(scratch)) => ops::linear_cutlass(on.stream, s, args, scratch),
        _ => ops::linear(on.kernels, on.stream, s, args),
    }
}

/// The routing inputs and outputs of [`experts`] (those of [`MoeArgs`] besides the weights).
pub struct ExpertIo<'a> {
    /// `[tokens, hidden]` normalised hidden states.
    pub x: View<'a, bf16>,
    /// `[tokens, top_k]` routing weights.
    pub topk_weights: View<'a, f32>,
    /// `[experts + 1]` slot offsets per expert.
    pub expert_offsets: View<'a, i32>,
    /// `[tokens * top_k]` slots grouped by expert.
    pub sorted_slots: View<'a, i32>,
    /// `[tokens * top_k, inter]` scratch.
    pub act: ViewMut<'a, bf16>,
    /// `[tokens * top_k, hidden]` weighted expert outputs.
    pub out: ViewMut<'a, f32>,
}

/// Which kernels run the expert GEMMs of large chunks, with the scratch they work in: decided once
/// per engine (the Hopper kernels after their self-check on the device).
#[derive(Debug, Default)]
pub enum GroupedExperts {
    /// `moe_grouped_gemm` (mma.sync; every supported GPU).
    #[default]
    Mma,
    /// `moe_cutlass_gemm` (CUTLASS's Hopper grouped GEMM, bf16) and its scratch.
    Cutlass(Box<MoeCutlassScratch>),
    /// `moe_cutlass_q8_gemm` (CUTLASS's Hopper grouped GEMM over 8-bit stacks) and its scratch:
    /// for models whose experts are all FP8, or all INT8.
    CutlassQ8(Box<MoeCutlassQ8Scratch>),
}

impl GroupedExperts {
    /// The kind of kernels, as the selection table knows them.
    pub fn kernel(&self) -> GroupedKernel {
        match self {
            GroupedExperts::Mma => GroupedKernel::Mma,
            GroupedExperts::Cutlass(_) | GroupedExperts::CutlassQ8(_) => GroupedKernel::Cutlass,
        }
    }
}

/// The format the selection table knows a layer's expert stacks by: 8-bit codes when all three are
/// of the 8-bit format `q8` (the one the engine's 8-bit kernels serve) without permutation, codes the
/// tensor-core decode kernels read when all three are (w1 and w3 use w1's permutation), packed
/// when all three are packed in one kind (`qmoe` takes one group size and one table), bf16
/// otherwise (the packed ones are then expanded).
fn experts_format(stacks: [&DeviceMatrix; 3], q8: Option<Q8>) -> Format {
    match stacks.map(DeviceMatrix::packed) {
        [Some(p1), Some(p3), Some(p2)] if p1.kind == p3.kind && p3.kind == p2.kind => {
            let permuted = p1.perm.is_some() || p2.perm.is_some();
            if q8.is_some_and(|q| q.kind() == p1.kind) && !permuted {
                Format::Q8
            } else if mma_reads(p1.kind, p1.cols, permuted) && mma_reads(p2.kind, p2.cols, permuted)
            {
                Format::PackedMma
            } else {
                Format::Packed
            }
        }
        _ => Format::Bf16,
    }
}

/// The routed expert MLPs of one layer over bf16 or packed stacks, with the kernels the selection
/// table picks for `grouped`.
pub fn experts(
    on: Products<'_>,
    s: &MoeScalars,
    [w1, w3, w2]: [&DeviceMatrix; 3],
    io: ExpertIo<'_>,
    scratch: &mut ProductScratch,
    grouped: &mut GroupedExperts,
) -> Result<(), CudaError> {
    let (kernels, stream) = (on.kernels, on.stream);
    let device = Device {
        grouped: grouped.kernel(),
        mma_decode: on.mma_decode,
    };
    // 8-bit stacks run as 8-bit codes only where the engine made the 8-bit kernels' scratch for
    // their format (every layer's experts FP8, or INT8); elsewhere they are any packed format.
    let q8 = match &*grouped {
        GroupedExperts::CutlassQ8(scratch) => Some(scratch.format()),
        _ => None,
    };
    let format = experts_format([w1, w3, w2], q8);
    let choice = select(Op::Experts, s.tokens as usize, format, device);
    if let (
        Choice::QMoeGemv | Choice::QMoeMma | Choice::MoeCutlassQ8,
        Some(p1),
        Some(p3),
        Some(p2),
    ) = (choice, w1.packed(), w3.packed(), w2.packed())
    {
        let (v1, v3, v2) = (p1.view(), p3.view(), p2.view());
        let args = QMoeArgs {
            x: io.x,
            w1_codes: v1.codes,
            w1_params: v1.params,
            w3_codes: v3.codes,
            w3_params: v3.params,
            // w3 reads with w1's permutation (its own is never allocated).
            w13_perm: v1.perm,
            w2_codes: v2.codes,
            w2_params: v2.params,
            w2_perm: v2.perm,
            // One table for the three: qmoe refuses stacks of different kinds.
            table: v1.table,
            topk_weights: io.topk_weights,
            expert_offsets: io.expert_offsets,
            sorted_slots: io.sorted_slots,
            act: io.act,
            out: io.out,
        };
        let kinds = [v1.kind, v3.kind, v2.kind];
        return match grouped {
            GroupedExperts::CutlassQ8(cutlass) if choice == Choice::MoeCutlassQ8 => {
                ops::moe_cutlass_q8_gemm(stream, s, kinds, args, cutlass)
            }
            _ if choice == Choice::QMoeGemv => {
                ops::qmoe(kernels, stream, s, (kinds, args), PackedKernel::Gemv)
            }
            _ if choice == Choice::QMoeMma => {
                ops::qmoe(kernels, stream, s, (kinds, args), PackedKernel::Mma)
            }
            _ => Err(no_scratch("8-bit")),
        };
    }
    let args = MoeArgs {
        x: io.x,
        w1: dense(kernels, stream, (w1, None), &mut scratch.w1, s.tokens)?,
        // w3 reads with w1's permutation here too.
        w3: dense(kernels, stream, (w3, Some(w1)), &mut scratch.w3, s.tokens)?,
        w2: dense(kernels, stream, (w2, None), &mut scratch.w2, s.tokens)?,
        topk_weights: io.topk_weights,
        expert_offsets: io.expert_offsets,
        sorted_slots: io.sorted_slots,
        act: io.act,
        out: io.out,
    };
    match choice {
        Choice::MoeGemv => ops::moe_gemv(kernels, stream, s, args),
        Choice::MoeMma => ops::moe_mma(kernels, stream, s, args),
        Choice::MoeCutlass | Choice::DequantizeThenMoeCutlass => match grouped {
            GroupedExperts::Cutlass(cutlass) => ops::moe_cutlass_gemm(stream, s, args, cutlass),
            _ => Err(no_scratch("bf16")),
        },
        _ => ops::moe_grouped_gemm(kernels, stream, s, args),
    }
}

/// The CUTLASS kernels of `precision` were selected for a layer without their scratch (the engine
/// makes one scratch, for the 8-bit kernels only when every layer's experts are of one 8-bit
/// format).
fn no_scratch(precision: &str) -> CudaError {
    CudaError::UnsupportedModel(format!(
        "the CUTLASS {precision} expert kernels were selected but the engine made no scratch for them"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::TensorView;
    use crate::quant::{int4, PackedMatrix};
    use crate::weights::Weight;
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

    fn nf4(rows: usize, cols: usize, group_size: usize) -> Weight {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| (i % 11) as f32 * 0.1 - 0.5)
            .collect();
        let table = crate::packed::lut4::Lut4::Nf4;
        packed_weight(crate::packed::lut4::quantize(table, &w, (rows, cols), group_size).unwrap())
    }

    #[test]
    fn table_codes_are_packed_where_the_kernels_read_them() {
        let kind = PackedKind::Lut4 {
            table: crate::packed::lut4::Lut4::Nf4,
            group_size: 64,
        };
        let (a, b) = (nf4(4, 128, 64), nf4(8, 128, 64));
        assert_eq!(
            stack_format(&[&[&a, &b]]),
            StackFormat::Packed { kind, perm: false }
        );
        // Groups of 16 columns, or 48 columns: a 32-column chunk would span two groups.
        for (cols, group) in [(128, 16), (96, 48)] {
            assert_eq!(stack_format(&[&[&nf4(4, cols, group)]]), StackFormat::Bf16);
        }
        assert_eq!(
            stack_format(&[&[&a], &[&int4(4, 128, None)]]),
            StackFormat::Bf16
        );
        assert_eq!(
            table_values(kind),
            Some(crate::packed::lut4::Lut4::Nf4.values())
        );
        assert_eq!(table_values(PackedKind::Int4 { group_size: 64 }), None);
    }

    /// Bytes a sizing arena counts for a packed stack of `count` matrices `[rows, cols]`.
    fn stack_bytes(kind: PackedKind, perm: bool, shape: (usize, usize, usize)) -> usize {
        DeviceArena::sized(|arena| PackedStack::allocate(arena, (kind, perm), shape, "test"))
    }

    #[test]
    fn stack_bytes_follow_the_packed_layout() {
        let shape = (8, 14336, 4096);
        let fp8 = stack_bytes(PackedKind::Fp8, false, shape);
        assert_eq!(fp8, 8 * 14336 * (4096 + 4));
        assert_eq!(
            stack_bytes(PackedKind::Int4 { group_size: 128 }, true, shape),
            // 32 groups of 128 a row, one 4-byte word each; the permutation.
            8 * 14336 * (2048 + 4 * 32) + 8 * 4096 * 4
        );
        let nf4 = PackedKind::Lut4 {
            table: crate::packed::lut4::Lut4::Nf4,
            group_size: 64,
        };
        // The 16-value table takes one allocation of the minimum 256 bytes.
        assert_eq!(
            stack_bytes(nf4, false, shape),
            8 * 14336 * (2048 + 4 * 64) + 256
        );
        // Mixtral-8x7B's expert stacks of one layer, w1 + w3 + w2: FP8 about half of bf16.
        let bf16 = 3 * 8 * 14336 * 4096 * 2;
        assert!(3 * fp8 * 2 < bf16 + bf16 / 100);
    }
}
