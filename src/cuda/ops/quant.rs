//! Launchers of the kernels that read quantized weights in the packed layout of
//! [`crate::quant::packed`] (FP8 / INT8 codes with a scale per row, 4-bit codes with a
//! `(scale, zero)` pair per row and group, an optional act-order permutation of the input columns):
//! - [`qlinear`]: the dense projection of a decode batch (at most `LINEAR_GEMV_MAX_TOKENS` tokens),
//!   the same product and outputs as [`super::linear`] (`csrc/qlinear.cu`);
//! - [`qmoe_gemv`]: the routed expert MLPs of a decode batch, the same buffers, grids, tiles and
//!   results as [`super::moe_gemv`] (`csrc/qmoe.cu`);
//! - [`dequantize`]: a stack of packed matrices expanded to bf16 `[count, rows, cols]` in input-column
//!   order, for the tensor-core kernels of prefill chunks (`csrc/dequant.cu`).
//!
//! The planners check what the kernels need of a packed stack of `count` matrices `[rows, cols]`
//! (the rules of [`crate::quant::PackedMatrix::gpu_layout_ok`]): `cols` a positive multiple of 16
//! (8-bit) or 32 (4-bit), 4-bit groups a positive multiple of 32 columns, `codes` 16-byte aligned
//! and holding `count * rows * row_bytes` bytes, `params` `count * rows * row_params` floats and
//! `perm` (when present) `count * cols` entries, 16-byte aligned where the GEMVs read it with vector
//! loads. Every failure is a typed [`CudaError`] naming the buffer or value.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};
use half::bf16;

use super::{launch, moe_tile, read, write, Buf, Check, Launch, LinearOut, LinearShape, MoeShape};
use crate::cuda::error::CudaError;
use crate::cuda::module::Kernels;
use crate::cuda::params::{
    DequantParams, KernelFamily, QLinearParams, QMoeParams, DEQUANT_THREADS,
    LINEAR_GEMV_MAX_TOKENS, MOE_DOWN_ROWS_PER_WARP, MOE_WARPS, QLINEAR_ROWS_PER_WARP,
    QLINEAR_WARPS, QUANT_KIND_FP8, QUANT_KIND_INT4, QUANT_KIND_INT8,
};
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

// ---------------------------------------------------------------------------------------------
// Packed stacks as the checks see them

/// A packed stack's buffers: addresses and lengths.
#[derive(Debug, Clone, Copy, PartialEq)]
struct QBufs {
    kind: PackedKind,
    codes: Buf,
    params: Buf,
    perm: Option<Buf>,
}

/// The guards keeping a stack's buffers in use on the stream until the launch is issued.
struct StackGuards<'a> {
    _codes: SyncOnDrop<'a>,
    _params: SyncOnDrop<'a>,
    _perm: Option<SyncOnDrop<'a>>,
}

fn read_stack<'a>(w: &QuantWeights<'a>, stream: &'a CudaStream) -> (QBufs, StackGuards<'a>) {
    let (codes, codes_guard) = read(w.codes, stream);
    let (params, params_guard) = read(w.params, stream);
    let (perm, perm_guard) = match w.perm {
        Some(p) => {
            let (buf, guard) = read(p, stream);
            (Some(buf), Some(guard))
        }
        None => (None, None),
    };
    let bufs = QBufs {
        kind: w.kind,
        codes,
        params,
        perm,
    };
    let guards = StackGuards {
        _codes: codes_guard,
        _params: params_guard,
        _perm: perm_guard,
    };
    (bufs, guards)
}

/// The buffer names of one stack in errors.
struct Names {
    codes: &'static str,
    params: &'static str,
    perm: &'static str,
}

/// What the kernels take of a stack's format for a column count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RowLayout {
    /// The KIND template value.
    kind: u32,
    /// Stored columns per group (4-bit), 0 for 8-bit.
    group_size: u32,
    /// Code bytes per row.
    row_bytes: usize,
    /// f32 parameters per row.
    row_params: usize,
}

/// The row layout of `kind` for `cols` columns, refused unless the kernels can read it: whole
/// 16-byte chunks per row and, for 4-bit, groups of a multiple of 32 columns.
fn row_layout(
    c: &Check,
    kind: PackedKind,
    cols: usize,
    cols_name: &'static str,
) -> Result<RowLayout, CudaError> {
    let (code, chunk) = match kind {
        PackedKind::Fp8 => (QUANT_KIND_FP8, 16),
        PackedKind::Int8 => (QUANT_KIND_INT8, 16),
        PackedKind::Int4 { .. } => (QUANT_KIND_INT4, 32),
    };
    if cols == 0 || !cols.is_multiple_of(chunk) {
        return Err(c.unsupported(
            cols_name,
            cols,
            format!("must be a positive multiple of {chunk} for {kind:?} (whole 16-byte chunks of codes)"),
        ));
    }
    c.count(cols_name, cols)?;
    let group_size = match kind {
        PackedKind::Fp8 | PackedKind::Int8 => 0,
        PackedKind::Int4 { group_size } => {
            if group_size == 0 || !group_size.is_multiple_of(32) {
                return Err(c.unsupported(
                    "group_size",
                    group_size,
                    "must be a positive multiple of 32 (one 32-column chunk of codes in one group)",
                ));
            }
            c.count("group_size", group_size)?
        }
    };
    Ok(RowLayout {
        kind: code,
        group_size,
        row_bytes: kind.row_code_bytes(cols),
        row_params: kind.row_params(cols),
    })
}

/// `factors` multiplied, refused when the product overflows (the kernels index in 64 bits).
fn elements(c: &Check, what: &'static str, factors: &[usize]) -> Result<usize, CudaError> {
    factors.iter().try_fold(1usize, |total, &f| {
        total
            .checked_mul(f)
            .ok_or_else(|| c.unsupported(what, usize::MAX, "overflows"))
    })
}

/// Checks a stack of `d.count` matrices `[d.rows, d.cols]` with row layout `l`: 16-byte aligned
/// codes (and perm when `vector_perm`), and every buffer's length.
fn check_stack(
    c: &Check,
    names: &Names,
    w: &QBufs,
    l: &RowLayout,
    d: &DequantShape,
    vector_perm: bool,
) -> Result<(), CudaError> {
    c.aligned16(names.codes, w.codes)?;
    let matrices = elements(c, "count * rows", &[d.count, d.rows])?;
    c.len(
        names.codes,
        w.codes,
        elements(c, "code bytes", &[matrices, l.row_bytes])?,
    )?;
    c.len(
        names.params,
        w.params,
        elements(c, "params elements", &[matrices, l.row_params])?,
    )?;
    if let Some(perm) = w.perm {
        if vector_perm {
            c.aligned16(names.perm, perm)?;
        }
        c.len(
            names.perm,
            perm,
            elements(c, "perm elements", &[d.count, d.cols])?,
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// qlinear

/// Tokens per weight pass of `qlinear`: the smallest compiled tile covering `tokens`, capped at 8.
fn token_tile(tokens: usize) -> u32 {
    match tokens {
        0..=1 => 1,
        2 => 2,
        3..=4 => 4,
        _ => 8,
    }
}

const W_NAMES: Names = Names {
    codes: "w_codes",
    params: "w_params",
    perm: "w_perm",
};

fn plan_qlinear(
    s: &LinearShape,
    x: Buf,
    w: &QBufs,
    out: Buf,
    out_f32: bool,
) -> Result<Option<Launch<QLinearParams>>, CudaError> {
    let c = Check { op: "qlinear" };
    if s.tokens > LINEAR_GEMV_MAX_TOKENS as usize {
        return Err(c.unsupported(
            "tokens",
            s.tokens,
            format!(
                "must be at most {LINEAR_GEMV_MAX_TOKENS} (a decode batch); dequantize the weights \
                 and use linear for more"
            ),
        ));
    }
    c.at_least("out_features", s.out_features, 1)?;
    let l = row_layout(&c, w.kind, s.in_features, "in_features")?;
    let tokens = c.count("tokens", s.tokens)?;
    let in_features = c.count("in_features", s.in_features)?;
    let out_features = c.count("out_features", s.out_features)?;
    c.aligned16("x", x)?;
    c.len(
        "x",
        x,
        elements(&c, "tokens * in_features", &[s.tokens, s.in_features])?,
    )?;
    let dims = DequantShape {
        count: 1,
        rows: s.out_features,
        cols: s.in_features,
    };
    check_stack(&c, &W_NAMES, w, &l, &dims, true)?;
    c.len(
        "out",
        out,
        elements(&c, "tokens * out_features", &[s.tokens, s.out_features])?,
    )?;
    let variant = c.variant(
        KernelFamily::QLinear,
        "(kind, tile, out_f32)",
        &[l.kind, token_tile(s.tokens), u32::from(out_f32)],
    )?;
    let rows_per_block = (QLINEAR_WARPS * QLINEAR_ROWS_PER_WARP) as usize;
    let blocks = c.count("row blocks", s.out_features.div_ceil(rows_per_block))?;
    if s.tokens == 0 {
        return Ok(None);
    }
    Ok(Some(Launch {
        variant,
        grid: (blocks, 1, 1),
        block: QLINEAR_WARPS * 32,
        shared_bytes: 0,
        params: QLinearParams {
            x: x.address,
            codes: w.codes.address,
            params: w.params.address,
            perm: w.perm.map_or(0, |p| p.address),
            out: out.address,
            tokens,
            in_features,
            out_features,
            row_bytes: c.count("row_bytes", l.row_bytes)?,
            row_params: c.count("row_params", l.row_params)?,
            group_size: l.group_size,
        },
    }))
}

/// `out[t, o] = sum_i x[t, i] * w[o, i]` with `w` packed, f32 accumulation; at most
/// `LINEAR_GEMV_MAX_TOKENS` tokens (prefill chunks [`dequantize`] and use [`super::linear`]).
/// Checks every buffer against the shapes, the 16-byte alignment of `x`, the codes and the
/// permutation, and the packed layout rules; zero tokens launch nothing.
pub fn qlinear(
    kernels: &Kernels,
    stream: &CudaStream,
    shape: &LinearShape,
    b: QLinearBuffers<'_>,
) -> Result<(), CudaError> {
    let (x, _x) = read(b.x, stream);
    let (w, _w) = read_stack(&b.w, stream);
    let (out_f32, (out, _out)) = match b.out {
        LinearOut::Bf16(out) => (false, write(out, stream)),
        LinearOut::F32(out) => (true, write(out, stream)),
    };
    match plan_qlinear(shape, x, &w, out, out_f32)? {
        Some(plan) => launch(kernels, stream, &plan),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// qmoe_gemv

/// The buffers of [`qmoe_gemv`] as the checks see them.
struct QMoeBufs {
    x: Buf,
    w1: QBufs,
    w3: QBufs,
    w2: QBufs,
    topk_weights: Buf,
    expert_offsets: Buf,
    sorted_slots: Buf,
    act: Buf,
    out: Buf,
}

const W1_NAMES: Names = Names {
    codes: "w1_codes",
    params: "w1_params",
    perm: "w1_perm",
};
const W3_NAMES: Names = Names {
    codes: "w3_codes",
    params: "w3_params",
    perm: "w3_perm",
};
const W2_NAMES: Names = Names {
    codes: "w2_codes",
    params: "w2_params",
    perm: "w2_perm",
};

fn plan_qmoe(s: &MoeShape, b: &QMoeBufs) -> Result<Option<[Launch<QMoeParams>; 2]>, CudaError> {
    let c = Check { op: "qmoe_gemv" };
    for (what, w) in [("w3 kind", &b.w3), ("w2 kind", &b.w2)] {
        if w.kind != b.w1.kind {
            return Err(c.unsupported(
                what,
                0,
                format!(
                    "{:?} differs from w1's {:?}: all three stacks must have the same format",
                    w.kind, b.w1.kind
                ),
            ));
        }
    }
    let w13_perm =
        match (b.w1.perm, b.w3.perm) {
            (None, None) => None,
            (Some(p1), Some(p3)) if p1.address == p3.address => Some(p1),
            _ => return Err(c.unsupported(
                "w3_perm",
                0,
                "w1 and w3 must share one permutation buffer (the same address) or both have none",
            )),
        };
    c.at_least("experts", s.experts, 1)?;
    if s.top_k == 0 || s.top_k > s.experts {
        return Err(c.unsupported("top_k", s.top_k, "must be in 1..=experts"));
    }
    let experts = c.grid_yz("experts", s.experts)?;
    let l13 = row_layout(&c, b.w1.kind, s.hidden, "hidden")?;
    let l2 = row_layout(&c, b.w2.kind, s.inter, "inter")?;
    let tokens = c.count("tokens", s.tokens)?;
    let slots = c.product("tokens * top_k", &[s.tokens, s.top_k])?;
    c.aligned16("x", b.x)?;
    c.aligned16("act", b.act)?;
    c.len(
        "x",
        b.x,
        elements(&c, "tokens * hidden", &[s.tokens, s.hidden])?,
    )?;
    let w13 = DequantShape {
        count: s.experts,
        rows: s.inter,
        cols: s.hidden,
    };
    let w2 = DequantShape {
        count: s.experts,
        rows: s.hidden,
        cols: s.inter,
    };
    check_stack(&c, &W1_NAMES, &b.w1, &l13, &w13, true)?;
    check_stack(&c, &W3_NAMES, &b.w3, &l13, &w13, true)?;
    check_stack(&c, &W2_NAMES, &b.w2, &l2, &w2, true)?;
    c.len("topk_weights", b.topk_weights, slots)?;
    c.len("expert_offsets", b.expert_offsets, s.experts + 1)?;
    c.len("sorted_slots", b.sorted_slots, slots)?;
    c.len(
        "act",
        b.act,
        elements(&c, "act elements", &[slots, s.inter])?,
    )?;
    c.len(
        "out",
        b.out,
        elements(&c, "out elements", &[slots, s.hidden])?,
    )?;
    let tile = moe_tile(s.tokens);
    let up = c.variant(KernelFamily::QMoeUp, "(kind, tile)", &[l13.kind, tile])?;
    let down = c.variant(KernelFamily::QMoeDown, "(kind, tile)", &[l2.kind, tile])?;
    let up_blocks = c.count("inter blocks", s.inter.div_ceil(MOE_WARPS as usize))?;
    let down_rows_per_block = (MOE_WARPS * MOE_DOWN_ROWS_PER_WARP) as usize;
    let down_blocks = c.count("hidden blocks", s.hidden.div_ceil(down_rows_per_block))?;
    if s.tokens == 0 {
        return Ok(None);
    }
    let params = QMoeParams {
        x: b.x.address,
        w1_codes: b.w1.codes.address,
        w1_params: b.w1.params.address,
        w3_codes: b.w3.codes.address,
        w3_params: b.w3.params.address,
        w13_perm: w13_perm.map_or(0, |p| p.address),
        w2_codes: b.w2.codes.address,
        w2_params: b.w2.params.address,
        w2_perm: b.w2.perm.map_or(0, |p| p.address),
        topk_weights: b.topk_weights.address,
        expert_offsets: b.expert_offsets.address,
        sorted_slots: b.sorted_slots.address,
        act: b.act.address,
        out: b.out.address,
        tokens,
        hidden: c.count("hidden", s.hidden)?,
        inter: c.count("inter", s.inter)?,
        experts,
        top_k: c.count("top_k", s.top_k)?,
        group_size: l13.group_size,
        w13_row_bytes: c.count("w13 row bytes", l13.row_bytes)?,
        w13_row_params: c.count("w13 row params", l13.row_params)?,
        w2_row_bytes: c.count("w2 row bytes", l2.row_bytes)?,
        w2_row_params: c.count("w2 row params", l2.row_params)?,
    };
    let block = MOE_WARPS * 32;
    Ok(Some([
        Launch {
            variant: up,
            grid: (up_blocks, experts, 1),
            block,
            shared_bytes: 0,
            params,
        },
        Launch {
            variant: down,
            grid: (down_blocks, experts, 1),
            block,
            shared_bytes: 0,
            params,
        },
    ]))
}

/// The routed expert MLPs of a decode batch over packed expert stacks: `act = silu(w1 x) * (w3 x)`,
/// `out = weight * (w2 act)` per slot. The three stacks must have the same [`PackedKind`], and `w1`
/// and `w3` the same permutation buffer (or none).
pub fn qmoe_gemv(
    kernels: &Kernels,
    stream: &CudaStream,
    shape: &MoeShape,
    b: QMoeBuffers<'_>,
) -> Result<(), CudaError> {
    let (x, _x) = read(b.x, stream);
    let (w1, _w1) = read_stack(&b.w1, stream);
    let (w3, _w3) = read_stack(&b.w3, stream);
    let (w2, _w2) = read_stack(&b.w2, stream);
    let (topk_weights, _topk_weights) = read(b.topk_weights, stream);
    let (expert_offsets, _expert_offsets) = read(b.expert_offsets, stream);
    let (sorted_slots, _sorted_slots) = read(b.sorted_slots, stream);
    let (act, _act) = write(b.act, stream);
    let (out, _out) = write(b.out, stream);
    let bufs = QMoeBufs {
        x,
        w1,
        w3,
        w2,
        topk_weights,
        expert_offsets,
        sorted_slots,
        act,
        out,
    };
    if let Some(plans) = plan_qmoe(shape, &bufs)? {
        for plan in &plans {
            launch(kernels, stream, plan)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// dequantize

const STACK_NAMES: Names = Names {
    codes: "codes",
    params: "params",
    perm: "perm",
};

fn plan_dequantize(
    s: &DequantShape,
    w: &QBufs,
    out: Buf,
) -> Result<Option<Launch<DequantParams>>, CudaError> {
    let c = Check { op: "dequantize" };
    let l = row_layout(&c, w.kind, s.cols, "cols")?;
    let count = c.grid_yz("count", s.count)?;
    let rows = c.count("rows", s.rows)?;
    check_stack(&c, &STACK_NAMES, w, &l, s, false)?;
    c.aligned16("out", out)?;
    c.len(
        "out",
        out,
        elements(&c, "count * rows * cols", &[s.count, s.rows, s.cols])?,
    )?;
    let variant = c.variant(KernelFamily::Dequantize, "kind", &[l.kind])?;
    if s.count == 0 || s.rows == 0 {
        return Ok(None);
    }
    Ok(Some(Launch {
        variant,
        grid: (rows, count, 1),
        block: DEQUANT_THREADS,
        shared_bytes: 0,
        params: DequantParams {
            codes: w.codes.address,
            params: w.params.address,
            perm: w.perm.map_or(0, |p| p.address),
            out: out.address,
            count,
            rows,
            cols: c.count("cols", s.cols)?,
            row_bytes: c.count("row_bytes", l.row_bytes)?,
            row_params: c.count("row_params", l.row_params)?,
            group_size: l.group_size,
        },
    }))
}

/// Expands the packed stack `w` to bf16 `out` `[count, rows, cols]` in input-column order
/// (`out[m][r][perm[j]] = value of stored column j`), each value rounded once to bf16. `out` must
/// be 16-byte aligned; an empty stack launches nothing.
pub fn dequantize(
    kernels: &Kernels,
    stream: &CudaStream,
    shape: &DequantShape,
    w: QuantWeights<'_>,
    out: &mut dyn DevicePtrMut<bf16>,
) -> Result<(), CudaError> {
    let (w, _w) = read_stack(&w, stream);
    let (out, _out) = write(out, stream);
    match plan_dequantize(shape, &w, out)? {
        Some(plan) => launch(kernels, stream, &plan),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::cuda::params::KERNEL_VARIANTS;

    const BASE: u64 = 0x7f00_0000_0000;

    fn at(offset: u64, len: usize) -> Buf {
        Buf {
            address: BASE + offset,
            len,
        }
    }

    fn buf(len: usize) -> Buf {
        at(0, len)
    }

    fn symbol(variant: usize) -> &'static str {
        KERNEL_VARIANTS[variant].symbol
    }

    /// The formats under test: both 8-bit kinds, 4-bit with one group per chunk and Mixtral's groups.
    const KINDS: [PackedKind; 4] = [
        PackedKind::Fp8,
        PackedKind::Int8,
        PackedKind::Int4 { group_size: 32 },
        PackedKind::Int4 { group_size: 128 },
    ];

    fn kind_label(kind: PackedKind) -> &'static str {
        match kind {
            PackedKind::Fp8 => "fp8",
            PackedKind::Int8 => "int8",
            PackedKind::Int4 { .. } => "int4",
        }
    }

    /// A column count every kind accepts.
    const COLS: usize = 96;

    /// The layout definition's row sizes (`PackedMatrix`, the one source of truth).
    fn row_sizes(kind: PackedKind, cols: usize) -> (usize, usize) {
        (kind.row_code_bytes(cols), kind.row_params(cols))
    }

    /// A stack of `count` `[rows, cols]` matrices with exactly the needed lengths; `tag` separates
    /// the addresses of different stacks (all 16-byte aligned).
    fn stack(
        kind: PackedKind,
        count: usize,
        rows: usize,
        cols: usize,
        perm: bool,
        tag: u64,
    ) -> QBufs {
        let (row_bytes, row_params) = row_sizes(kind, cols);
        QBufs {
            kind,
            codes: at(tag << 32, count * rows * row_bytes),
            params: at((tag << 32) + (1 << 28), count * rows * row_params),
            perm: perm.then(|| at((tag << 32) + (2 << 28), count * cols)),
        }
    }

    fn too_small<T: std::fmt::Debug>(r: Result<T, CudaError>, name: &str, expected: usize) {
        match r {
            Err(CudaError::BufferTooSmall {
                buffer,
                expected: e,
                ..
            }) => assert_eq!((buffer, e), (name, expected)),
            other => panic!("expected BufferTooSmall({name}), got {other:?}"),
        }
    }

    fn unsupported<T: std::fmt::Debug>(r: Result<T, CudaError>, name: &str) {
        match r {
            Err(CudaError::Unsupported { what, .. }) => assert_eq!(what, name),
            other => panic!("expected Unsupported({name}), got {other:?}"),
        }
    }

    fn misaligned<T: std::fmt::Debug>(r: Result<T, CudaError>, name: &str) {
        match r {
            Err(CudaError::Misaligned { buffer, .. }) => assert_eq!(buffer, name),
            other => panic!("expected Misaligned({name}), got {other:?}"),
        }
    }

    fn linear_shape(tokens: usize, in_features: usize, out_features: usize) -> LinearShape {
        LinearShape {
            tokens,
            in_features,
            out_features,
        }
    }

    fn plan_linear_exact(
        s: &LinearShape,
        kind: PackedKind,
        perm: bool,
        out_f32: bool,
    ) -> Result<Option<Launch<QLinearParams>>, CudaError> {
        let w = stack(kind, 1, s.out_features, s.in_features, perm, 1);
        plan_qlinear(
            s,
            buf(s.tokens * s.in_features),
            &w,
            buf(s.tokens * s.out_features),
            out_f32,
        )
    }

    #[test]
    fn qlinear_picks_the_kind_tile_and_output_type() {
        let tiles = [
            (1, 1),
            (2, 2),
            (3, 4),
            (4, 4),
            (5, 8),
            (8, 8),
            (9, 8),
            (16, 8),
        ];
        for kind in KINDS {
            for (tokens, tile) in tiles {
                for (out_f32, suffix) in [(false, "bf16"), (true, "f32")] {
                    let s = linear_shape(tokens, COLS, 40);
                    let p = plan_linear_exact(&s, kind, false, out_f32)
                        .unwrap()
                        .unwrap();
                    assert_eq!(
                        symbol(p.variant),
                        format!("qlinear_{}_t{tile}_{suffix}", kind_label(kind))
                    );
                    assert_eq!(p.grid, (3, 1, 1), "40 rows in blocks of 16");
                    assert_eq!(p.block, QLINEAR_WARPS * 32);
                    assert_eq!(p.shared_bytes, 0);
                }
            }
        }
    }

    #[test]
    fn qlinear_params_carry_the_layout_and_the_addresses() {
        for kind in KINDS {
            for perm in [false, true] {
                let s = linear_shape(3, COLS, 7);
                let w = stack(kind, 1, 7, COLS, perm, 2);
                let p = plan_qlinear(&s, at(0x100, 3 * COLS), &w, at(0x2002, 21), false)
                    .unwrap()
                    .unwrap()
                    .params;
                let (row_bytes, row_params) = row_sizes(kind, COLS);
                assert_eq!((p.x, p.out), (BASE + 0x100, BASE + 0x2002));
                assert_eq!((p.codes, p.params), (w.codes.address, w.params.address));
                assert_eq!(p.perm, w.perm.map_or(0, |b| b.address));
                assert_eq!((p.tokens, p.in_features, p.out_features), (3, 96, 7));
                assert_eq!(
                    (p.row_bytes as usize, p.row_params as usize),
                    (row_bytes, row_params)
                );
                let group = match kind {
                    PackedKind::Int4 { group_size } => group_size as u32,
                    _ => 0,
                };
                assert_eq!(p.group_size, group);
            }
        }
        // A shorter last group: 96 columns in groups of 64 are 2 groups, 4 params per row.
        let w = stack(PackedKind::Int4 { group_size: 64 }, 1, 5, COLS, false, 3);
        let p = plan_qlinear(&linear_shape(1, COLS, 5), buf(COLS), &w, buf(5), true)
            .unwrap()
            .unwrap();
        assert_eq!((p.params.row_bytes, p.params.row_params), (48, 4));
        assert_eq!(w.params.len, 20);
    }

    #[test]
    fn qlinear_mixtral_shapes_fill_the_gpu() {
        // Decode at batch 1: QKV 6144 x 4096, O 4096 x 4096.
        for kind in KINDS {
            for (out, blocks) in [(6144, 384), (4096, 256)] {
                let p = plan_linear_exact(&linear_shape(1, 4096, out), kind, false, false)
                    .unwrap()
                    .unwrap();
                assert_eq!(p.grid, (blocks, 1, 1));
            }
        }
    }

    #[test]
    fn qlinear_refuses_every_buffer_one_element_short_by_name() {
        for kind in KINDS {
            for perm in [false, true] {
                for tokens in [1, 7, 16] {
                    let s = linear_shape(tokens, COLS, 19);
                    let full = stack(kind, 1, 19, COLS, perm, 1);
                    let (x, out) = (tokens * COLS, tokens * 19);
                    let mut w = full;
                    w.codes.len -= 1;
                    too_small(
                        plan_qlinear(&s, buf(x), &w, buf(out), false),
                        "w_codes",
                        full.codes.len,
                    );
                    let mut w = full;
                    w.params.len -= 1;
                    too_small(
                        plan_qlinear(&s, buf(x), &w, buf(out), false),
                        "w_params",
                        full.params.len,
                    );
                    if let Some(p) = full.perm {
                        let mut w = full;
                        w.perm = Some(Buf {
                            len: p.len - 1,
                            ..p
                        });
                        too_small(
                            plan_qlinear(&s, buf(x), &w, buf(out), false),
                            "w_perm",
                            COLS,
                        );
                    }
                    too_small(plan_qlinear(&s, buf(x - 1), &full, buf(out), true), "x", x);
                    too_small(
                        plan_qlinear(&s, buf(x), &full, buf(out - 1), true),
                        "out",
                        out,
                    );
                    assert!(plan_qlinear(&s, buf(x), &full, buf(out), true).is_ok());
                }
            }
        }
    }

    #[test]
    fn qlinear_refuses_misaligned_vector_buffers() {
        let s = linear_shape(2, COLS, 3);
        for kind in KINDS {
            let full = stack(kind, 1, 3, COLS, true, 1);
            for offset in [2, 4, 8] {
                let x = at(offset, 2 * COLS);
                misaligned(plan_qlinear(&s, x, &full, buf(6), true), "x");
                let mut w = full;
                w.codes.address += offset;
                misaligned(plan_qlinear(&s, buf(2 * COLS), &w, buf(6), true), "w_codes");
                let mut w = full;
                if let Some(p) = w.perm.as_mut() {
                    p.address += offset;
                }
                misaligned(plan_qlinear(&s, buf(2 * COLS), &w, buf(6), true), "w_perm");
            }
            // params and out are read and written element by element.
            let mut w = full;
            w.params.address += 4;
            assert!(plan_qlinear(&s, buf(2 * COLS), &w, at(4, 6), true).is_ok());
        }
    }

    #[test]
    fn qlinear_refuses_bad_layouts_and_batches() {
        for (kind, bad_cols) in [
            (PackedKind::Fp8, [0, 8, 24, 100]),
            (PackedKind::Int8, [0, 8, 40, 4095]),
            (PackedKind::Int4 { group_size: 32 }, [0, 16, 48, 80]),
        ] {
            for cols in bad_cols {
                let w = stack(kind, 1, 4, 32, false, 1);
                let r = plan_qlinear(&linear_shape(1, cols, 4), buf(4096), &w, buf(4), false);
                unsupported(r, "in_features");
            }
        }
        for group_size in [0, 1, 16, 48, 100] {
            let w = QBufs {
                kind: PackedKind::Int4 { group_size },
                ..stack(PackedKind::Int4 { group_size: 32 }, 1, 4, COLS, false, 1)
            };
            let r = plan_qlinear(&linear_shape(1, COLS, 4), buf(COLS), &w, buf(4), false);
            unsupported(r, "group_size");
        }
        for tokens in [17, 64, 4096] {
            unsupported(
                plan_linear_exact(
                    &linear_shape(tokens, COLS, 4),
                    PackedKind::Fp8,
                    false,
                    false,
                ),
                "tokens",
            );
        }
        unsupported(
            plan_linear_exact(&linear_shape(1, COLS, 0), PackedKind::Int8, false, false),
            "out_features",
        );
    }

    #[test]
    fn qlinear_zero_tokens_launch_nothing_but_are_still_checked() {
        for kind in KINDS {
            let s = linear_shape(0, COLS, 10);
            assert!(plan_linear_exact(&s, kind, true, false).unwrap().is_none());
            let mut w = stack(kind, 1, 10, COLS, false, 1);
            w.codes.len -= 1;
            too_small(
                plan_qlinear(&s, buf(0), &w, buf(0), false),
                "w_codes",
                w.codes.len + 1,
            );
        }
    }

    // -- qmoe_gemv --

    fn moe_shape(
        tokens: usize,
        hidden: usize,
        inter: usize,
        experts: usize,
        top_k: usize,
    ) -> MoeShape {
        MoeShape {
            tokens,
            hidden,
            inter,
            experts,
            top_k,
        }
    }

    /// Buffers of exactly the needed lengths; w1 and w3 share one perm buffer when `perm`.
    fn moe_bufs(s: &MoeShape, kind: PackedKind, perm: bool) -> QMoeBufs {
        let slots = s.tokens * s.top_k;
        let w1 = stack(kind, s.experts, s.inter, s.hidden, perm, 1);
        let mut w3 = stack(kind, s.experts, s.inter, s.hidden, false, 2);
        w3.perm = w1.perm;
        QMoeBufs {
            x: buf(s.tokens * s.hidden),
            w1,
            w3,
            w2: stack(kind, s.experts, s.hidden, s.inter, perm, 3),
            topk_weights: buf(slots),
            expert_offsets: buf(s.experts + 1),
            sorted_slots: buf(slots),
            act: buf(slots * s.inter),
            out: buf(slots * s.hidden),
        }
    }

    #[test]
    fn qmoe_grids_and_symbols_for_mixtral_shapes() {
        for kind in KINDS {
            for (tokens, tile) in [(1, 1), (2, 2), (3, 4), (8, 8), (40, 8)] {
                let s = moe_shape(tokens, 4096, 14336, 8, 2);
                let [up, down] = plan_qmoe(&s, &moe_bufs(&s, kind, true)).unwrap().unwrap();
                let k = kind_label(kind);
                assert_eq!(symbol(up.variant), format!("qmoe_up_{k}_t{tile}"));
                assert_eq!(symbol(down.variant), format!("qmoe_down_{k}_t{tile}"));
                assert_eq!(up.grid, (14336 / 8, 8, 1));
                assert_eq!(down.grid, (4096 / 16, 8, 1));
                assert_eq!((up.block, down.block), (256, 256));
                let p = up.params;
                let (b13, p13) = row_sizes(kind, 4096);
                let (b2, p2) = row_sizes(kind, 14336);
                assert_eq!(
                    (
                        p.w13_row_bytes,
                        p.w13_row_params,
                        p.w2_row_bytes,
                        p.w2_row_params
                    ),
                    (b13 as u32, p13 as u32, b2 as u32, p2 as u32)
                );
                let b = moe_bufs(&s, kind, true);
                assert_eq!(p.w13_perm, b.w1.perm.unwrap().address);
                assert_eq!(p.w2_perm, b.w2.perm.unwrap().address);
                assert_eq!(down.params, p, "both kernels take the same parameters");
            }
        }
        let s = moe_shape(1, 4096, 14336, 8, 2);
        let [up, _] = plan_qmoe(&s, &moe_bufs(&s, PackedKind::Fp8, false))
            .unwrap()
            .unwrap();
        assert_eq!((up.params.w13_perm, up.params.w2_perm), (0, 0));
    }

    #[test]
    fn qmoe_w1_and_w3_must_share_their_permutation() {
        let s = moe_shape(2, COLS, 64, 4, 2);
        let kind = PackedKind::Int4 { group_size: 32 };
        let good = moe_bufs(&s, kind, true);
        assert!(plan_qmoe(&s, &good).is_ok());
        let other = Buf {
            address: good.w1.perm.unwrap().address + 0x1000,
            ..good.w1.perm.unwrap()
        };
        for (p1, p3) in [
            (good.w1.perm, Some(other)),
            (good.w1.perm, None),
            (None, good.w1.perm),
        ] {
            let mut b = moe_bufs(&s, kind, true);
            b.w1.perm = p1;
            b.w3.perm = p3;
            unsupported(plan_qmoe(&s, &b), "w3_perm");
        }
        // w2 has its own permutation (or none) either way.
        let mut b = moe_bufs(&s, kind, true);
        b.w2.perm = None;
        assert!(plan_qmoe(&s, &b).is_ok());
    }

    #[test]
    fn qmoe_stacks_must_have_one_format() {
        let s = moe_shape(2, COLS, 64, 4, 1);
        for (i, what) in [(1, "w3 kind"), (2, "w2 kind")] {
            for other in [PackedKind::Int8, PackedKind::Int4 { group_size: 64 }] {
                let mut b = moe_bufs(&s, PackedKind::Int4 { group_size: 32 }, false);
                if i == 1 {
                    b.w3.kind = other;
                } else {
                    b.w2.kind = other;
                }
                unsupported(plan_qmoe(&s, &b), what);
            }
        }
    }

    #[test]
    fn qmoe_refuses_bad_shapes_and_misaligned_buffers() {
        let kind = PackedKind::Int4 { group_size: 32 };
        let s = moe_shape(2, COLS, 64, 4, 2);
        for (bad, what) in [
            (moe_shape(2, 48, 64, 4, 2), "hidden"),
            (moe_shape(2, COLS, 40, 4, 2), "inter"),
            (moe_shape(2, COLS, 64, 0, 1), "experts"),
            (moe_shape(2, COLS, 64, 4, 5), "top_k"),
            (moe_shape(2, COLS, 64, 4, 0), "top_k"),
        ] {
            unsupported(plan_qmoe(&bad, &moe_bufs(&s, kind, false)), what);
        }
        for (name, shift) in [
            ("x", 0),
            ("act", 1),
            ("w1_codes", 2),
            ("w3_codes", 3),
            ("w2_codes", 4),
            ("w2_perm", 5),
        ] {
            let mut b = moe_bufs(&s, kind, true);
            let target = match shift {
                0 => &mut b.x,
                1 => &mut b.act,
                2 => &mut b.w1.codes,
                3 => &mut b.w3.codes,
                4 => &mut b.w2.codes,
                _ => b.w2.perm.as_mut().unwrap(),
            };
            target.address += 8;
            misaligned(plan_qmoe(&s, &b), name);
        }
        // Zero tokens: checked, nothing launched.
        let empty = moe_shape(0, COLS, 64, 4, 2);
        assert!(plan_qmoe(&empty, &moe_bufs(&empty, kind, true))
            .unwrap()
            .is_none());
    }

    // -- dequantize --

    fn dequant_shape(count: usize, rows: usize, cols: usize) -> DequantShape {
        DequantShape { count, rows, cols }
    }

    #[test]
    fn dequantize_grid_symbol_and_params() {
        for kind in KINDS {
            for perm in [false, true] {
                let s = dequant_shape(3, 5, COLS);
                let w = stack(kind, 3, 5, COLS, perm, 1);
                let p = plan_dequantize(&s, &w, at(0x40, 3 * 5 * COLS))
                    .unwrap()
                    .unwrap();
                assert_eq!(
                    symbol(p.variant),
                    format!("dequantize_{}", kind_label(kind))
                );
                assert_eq!(p.grid, (5, 3, 1));
                assert_eq!(p.block, DEQUANT_THREADS);
                let (row_bytes, row_params) = row_sizes(kind, COLS);
                let q = p.params;
                assert_eq!((q.count, q.rows, q.cols), (3, 5, 96));
                assert_eq!(
                    (q.row_bytes as usize, q.row_params as usize),
                    (row_bytes, row_params)
                );
                assert_eq!(q.perm, w.perm.map_or(0, |b| b.address));
                assert_eq!(q.out, BASE + 0x40);
            }
        }
    }

    #[test]
    fn dequantize_checks_buffers_alignment_and_empty_stacks() {
        let s = dequant_shape(2, 3, COLS);
        for kind in KINDS {
            let full = stack(kind, 2, 3, COLS, true, 1);
            let out = 2 * 3 * COLS;
            let mut w = full;
            w.codes.len -= 1;
            too_small(plan_dequantize(&s, &w, buf(out)), "codes", full.codes.len);
            let mut w = full;
            w.params.len -= 1;
            too_small(plan_dequantize(&s, &w, buf(out)), "params", full.params.len);
            let mut w = full;
            w.perm.as_mut().unwrap().len -= 1;
            too_small(plan_dequantize(&s, &w, buf(out)), "perm", 2 * COLS);
            too_small(plan_dequantize(&s, &full, buf(out - 1)), "out", out);
            misaligned(plan_dequantize(&s, &full, at(2, out)), "out");
            let mut w = full;
            w.codes.address += 4;
            misaligned(plan_dequantize(&s, &w, buf(out)), "codes");
            // The permutation is read element by element here.
            let mut w = full;
            w.perm.as_mut().unwrap().address += 4;
            assert!(plan_dequantize(&s, &w, buf(out)).is_ok());
            for empty in [dequant_shape(0, 3, COLS), dequant_shape(2, 0, COLS)] {
                assert!(plan_dequantize(
                    &empty,
                    &stack(kind, empty.count, empty.rows, COLS, true, 1),
                    buf(0)
                )
                .unwrap()
                .is_none());
            }
        }
        unsupported(
            plan_dequantize(
                &dequant_shape(1, 1, 24),
                &stack(PackedKind::Fp8, 1, 1, 32, false, 1),
                buf(32),
            ),
            "cols",
        );
        unsupported(
            plan_dequantize(
                &dequant_shape(70_000, 1, 32),
                &stack(PackedKind::Fp8, 70_000, 1, 32, false, 1),
                buf(70_000 * 32),
            ),
            "count",
        );
    }

    fn kinds() -> impl Strategy<Value = PackedKind> {
        prop_oneof![
            Just(PackedKind::Fp8),
            Just(PackedKind::Int8),
            (1usize..=6).prop_map(|g| PackedKind::Int4 { group_size: 32 * g }),
        ]
    }

    proptest! {
        #[test]
        fn qmoe_needs_exactly_the_stack_sizes(
            kind in kinds(),
            tokens in 0usize..20,
            hidden32 in 1usize..8,
            inter32 in 1usize..8,
            experts in 1usize..9,
            k in 1usize..3,
            perm in any::<bool>(),
        ) {
            let s = moe_shape(tokens, hidden32 * 32, inter32 * 32, experts, k.min(experts));
            let full = moe_bufs(&s, kind, perm);
            prop_assert!(plan_qmoe(&s, &full).is_ok());
            let mut cases: Vec<(&str, QMoeBufs)> = Vec::new();
            let shorten = |b: &mut Buf| b.len -= 1;
            macro_rules! short {
                ($name:expr, $($field:ident).+) => {{
                    let mut b = moe_bufs(&s, kind, perm);
                    if b.$($field).+.len > 0 {
                        shorten(&mut b.$($field).+);
                        cases.push(($name, b));
                    }
                }};
            }
            short!("x", x);
            short!("w1_codes", w1.codes);
            short!("w1_params", w1.params);
            short!("w3_codes", w3.codes);
            short!("w3_params", w3.params);
            short!("w2_codes", w2.codes);
            short!("w2_params", w2.params);
            short!("topk_weights", topk_weights);
            short!("expert_offsets", expert_offsets);
            short!("sorted_slots", sorted_slots);
            short!("act", act);
            short!("out", out);
            if perm {
                let mut b = moe_bufs(&s, kind, perm);
                b.w1.perm.as_mut().unwrap().len -= 1;
                b.w3.perm = b.w1.perm;
                cases.push(("w1_perm", b));
                let mut b = moe_bufs(&s, kind, perm);
                b.w2.perm.as_mut().unwrap().len -= 1;
                cases.push(("w2_perm", b));
            }
            for (name, b) in cases {
                match plan_qmoe(&s, &b) {
                    Err(CudaError::BufferTooSmall { buffer, .. }) => prop_assert_eq!(buffer, name),
                    other => prop_assert!(false, "{}: {:?}", name, other),
                }
            }
        }

        #[test]
        fn qlinear_grid_covers_every_row_once(
            kind in kinds(),
            tokens in 1usize..=16,
            in32 in 1usize..40,
            out_features in 1usize..3000,
            out_f32 in any::<bool>(),
            perm in any::<bool>(),
        ) {
            let s = linear_shape(tokens, in32 * 32, out_features);
            let p = plan_linear_exact(&s, kind, perm, out_f32).unwrap().unwrap();
            let rows = (QLINEAR_WARPS * QLINEAR_ROWS_PER_WARP) as usize;
            prop_assert!(p.grid.0 as usize * rows >= out_features);
            prop_assert!((p.grid.0 as usize - 1) * rows < out_features, "no empty block");
            let consts = KERNEL_VARIANTS[p.variant].consts;
            prop_assert!(consts[1] as usize >= tokens.min(8));
            prop_assert!((consts[1] as usize) < 2 * tokens);
            prop_assert_eq!(consts[2], u32::from(out_f32));
        }
    }
}
