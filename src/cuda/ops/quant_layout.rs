//! What the quantized kernels (`qlinear`, `qmoe_*`, `dequantize`; csrc/quant.cuh) take of a stack
//! of packed matrices in the layout of [`crate::quant::packed`]: the [`PackedView`] of its buffers,
//! the row layout of its format for a column count (the rules of
//! [`crate::quant::PackedMatrix::gpu_layout_ok`]: whole 16-byte chunks of codes per row and, for
//! 4-bit, groups of a multiple of 32 columns) and, for 4-bit table codes (LUT4), the device copy of
//! the table ([`table_view`]). Matrix `m` of a stack of `[rows, cols]` matrices starts at
//! `m * rows * row_bytes` codes, `m * rows * row_params` params and `m * cols` perm entries.

use crate::cuda::checks::Check;
use crate::cuda::error::CudaError;
use crate::cuda::memory::View;
use crate::cuda::params::{
    QMMA_INT4_STEP_COLS, QUANT_KIND_FP8, QUANT_KIND_INT4, QUANT_KIND_INT8, QUANT_KIND_LUT4,
};
use crate::quant::PackedKind;

/// The device buffers of a stack of packed matrices (one for a projection, one per expert).
#[derive(Debug, Clone, Copy)]
pub struct PackedView<'a> {
    /// Element format, the same for every matrix of the stack.
    pub kind: PackedKind,
    /// `[count, rows, row bytes]` codes (row bytes `cols`, or `cols / 2` for 4-bit).
    pub codes: View<'a, u8>,
    /// `[count, rows]` scales (8-bit), `[count, rows, groups]` (f16 scale, zero) words (INT4,
    /// [`crate::packed::PackedMatrix::device_params`]; f32 bits) or
    /// `[count, rows, groups]` scales (LUT4).
    pub params: View<'a, f32>,
    /// `None`, or `[count, cols]`: the input column of each stored column of each matrix.
    pub perm: Option<View<'a, u32>>,
    /// LUT4: the 16 values of the codes (`kind`'s table, [`crate::packed::lut4::Lut4::values`]);
    /// `None` for the other kinds.
    pub table: Option<View<'a, f32>>,
}

/// `(w.kind, Args { codes, params, perm, table, others.. })`: the arguments of a kernel reading the
/// packed view `w`, its other buffers given by their field names (in scope as locals).
macro_rules! packed_args {
    ($args:ident, $w:expr, $($other:ident),+) => {{
        let PackedView { kind, codes, params, perm, table } = $w;
        (kind, $args { codes, params, perm, table, $($other),+ })
    }};
}
pub(super) use packed_args;

/// `table` when the kind needs one (LUT4: present) and `None` otherwise; a table where none is
/// read, or none where one is, is refused. Its length is checked by the kernel arguments.
pub(super) fn table_view<'a>(
    c: &Check,
    kind: PackedKind,
    table: Option<View<'a, f32>>,
) -> Result<Option<View<'a, f32>>, CudaError> {
    match (kind, table) {
        (PackedKind::Lut4 { .. }, Some(t)) => Ok(Some(t)),
        (PackedKind::Lut4 { table, .. }, None) => Err(c.unsupported(
            "table",
            0,
            format!(
                "4-bit {} codes need their table on the device",
                table.name()
            ),
        )),
        (_, None) => Ok(None),
        (kind, Some(t)) => Err(c.unsupported(
            "table",
            t.len(),
            format!("{kind:?} codes index no table (only 4-bit table codes do)"),
        )),
    }
}

/// What the kernels take of a stack's format for a column count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RowLayout {
    /// The KIND template value.
    pub kind: u32,
    /// Stored columns per group (4-bit: INT4 and LUT4), 0 for 8-bit.
    pub group_size: u32,
    /// Code bytes per row.
    pub row_bytes: u32,
    /// 32-bit parameter words per row ([`PackedKind::device_row_params`]).
    pub row_params: u32,
}

/// The row layout of `kind` for `cols` columns (named `cols_name` in errors), refused unless the
/// kernels can read it.
pub(super) fn row_layout(
    c: &Check,
    kind: PackedKind,
    cols: u32,
    cols_name: &'static str,
) -> Result<RowLayout, CudaError> {
    let (code, chunk) = match kind {
        PackedKind::Fp8 => (QUANT_KIND_FP8, 16),
        PackedKind::Int8 => (QUANT_KIND_INT8, 16),
        PackedKind::Int4 { .. } => (QUANT_KIND_INT4, 32),
        PackedKind::Lut4 { .. } => (QUANT_KIND_LUT4, 32),
    };
    let cols = c.count(cols_name, cols as usize)? as usize;
    if cols == 0 || !cols.is_multiple_of(chunk) {
        return Err(c.unsupported(
            cols_name,
            cols,
            format!("must be a positive multiple of {chunk} for {kind:?} (whole 16-byte chunks of codes)"),
        ));
    }
    let group_size = match kind {
        PackedKind::Fp8 | PackedKind::Int8 => 0,
        PackedKind::Int4 { group_size } | PackedKind::Lut4 { group_size, .. } => {
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
        // Both at most `cols`, which is below 2^31.
        row_bytes: kind.row_code_bytes(cols) as u32,
        row_params: kind.device_row_params(cols) as u32,
    })
}

/// Which kernels multiply a decode batch with packed weights (`qlinear`, `qmoe`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackedKernel {
    /// The GEMVs (`qlinear_{kind}_t*`, `qmoe_{up,down}_{kind}_t*`): every packed format, weights
    /// decoded and multiplied on the CUDA cores.
    Gemv,
    /// The tensor-core decode kernels (`qlinear_mma_*`, `qmoe_mma_{up,down}_*`;
    /// csrc/quant_mma.cuh): the formats [`mma_reads`] accepts, weights decoded on the CUDA cores and
    /// multiplied on the tensor cores.
    Mma,
}

/// Whether the tensor-core decode kernels (`qlinear_mma`, `qmoe_mma_*`; csrc/quant_mma.cuh) read
/// matrices of `kind` with `cols` columns: FP8 or INT8 codes, or 4-bit integer codes (INT4) whose
/// group size is a multiple of [`QMMA_INT4_STEP_COLS`] (one step of the kernels lies in one group);
/// in the row layout the GEMVs read and without a column permutation.
pub fn mma_reads(kind: PackedKind, cols: usize, permuted: bool) -> bool {
    let readable = match kind {
        PackedKind::Fp8 | PackedKind::Int8 => cols.is_multiple_of(16),
        PackedKind::Int4 { group_size } => {
            cols.is_multiple_of(32)
                && group_size.is_multiple_of(QMMA_INT4_STEP_COLS as usize)
                && group_size > 0
        }
        PackedKind::Lut4 { .. } => false,
    };
    readable && cols > 0 && !permuted
}

impl PackedKernel {
    /// The row layout these kernels read for `kind` over `cols` columns (named `cols_name` in
    /// errors), `permuted` where the matrix has a column permutation: [`row_layout`], which the
    /// tensor-core kernels refuse by name unless [`mma_reads`].
    pub(super) fn layout(
        self,
        c: &Check,
        kind: PackedKind,
        cols: u32,
        cols_name: &'static str,
        permuted: bool,
    ) -> Result<RowLayout, CudaError> {
        let layout = row_layout(c, kind, cols, cols_name)?;
        if self == PackedKernel::Gemv || mma_reads(kind, cols as usize, permuted) {
            return Ok(layout);
        }
        let (what, value) = match kind {
            PackedKind::Lut4 { .. } => ("kind", layout.kind as usize),
            _ if permuted => ("perm", 1),
            PackedKind::Int4 { group_size } => ("group_size", group_size),
            // Unreachable: row_layout refused the columns already.
            _ => (cols_name, cols as usize),
        };
        Err(c.unsupported(
            what,
            value,
            format!(
                "the tensor-core decode kernels read {kind:?} only as FP8, INT8 or INT4 codes (INT4 in \
                 groups of a multiple of {QMMA_INT4_STEP_COLS} columns) without a column permutation"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::ops::fake::{unsupported, view};
    use crate::packed::lut4::Lut4;

    const C: Check = Check::new("test");

    const NF4_64: PackedKind = PackedKind::Lut4 {
        table: Lut4::Nf4,
        group_size: 64,
    };

    #[test]
    fn row_sizes_are_the_packed_layout_definition() {
        for kind in [
            PackedKind::Fp8,
            PackedKind::Int8,
            PackedKind::Int4 { group_size: 32 },
            PackedKind::Int4 { group_size: 64 },
            NF4_64,
            PackedKind::Lut4 {
                table: Lut4::Fp4,
                group_size: 32,
            },
        ] {
            let l = row_layout(&C, kind, 96, "cols").unwrap();
            assert_eq!(l.row_bytes as usize, kind.row_code_bytes(96));
            assert_eq!(l.row_params as usize, kind.device_row_params(96));
        }
        // A shorter last group: 96 columns in groups of 64 are 2 groups, one (f16 scale, zero)
        // word each per row.
        let l = row_layout(&C, PackedKind::Int4 { group_size: 64 }, 96, "cols").unwrap();
        assert_eq!(
            (l.kind, l.group_size, l.row_bytes, l.row_params),
            (2, 64, 48, 2)
        );
        // LUT4: one scale per group, the same groups: 96 columns in groups of 64, 2 params per row.
        let l = row_layout(&C, NF4_64, 96, "cols").unwrap();
        assert_eq!(
            (l.kind, l.group_size, l.row_bytes, l.row_params),
            (3, 64, 48, 2)
        );
        let l = row_layout(&C, PackedKind::Int8, 4096, "cols").unwrap();
        assert_eq!(
            (l.kind, l.group_size, l.row_bytes, l.row_params),
            (1, 0, 4096, 1)
        );
    }

    #[test]
    fn unreadable_layouts_are_refused_by_name() {
        for (kind, bad_cols) in [
            (PackedKind::Fp8, [0, 8, 24, 100]),
            (PackedKind::Int8, [0, 8, 40, 4095]),
            (PackedKind::Int4 { group_size: 32 }, [0, 16, 48, 80]),
            (NF4_64, [0, 16, 48, 80]),
        ] {
            for cols in bad_cols {
                unsupported(row_layout(&C, kind, cols, "in_features"), "in_features");
            }
        }
        for group_size in [0, 1, 16, 48, 100] {
            unsupported(
                row_layout(&C, PackedKind::Int4 { group_size }, 96, "cols"),
                "group_size",
            );
            let table = Lut4::Fp4;
            unsupported(
                row_layout(&C, PackedKind::Lut4 { table, group_size }, 96, "cols"),
                "group_size",
            );
        }
        unsupported(row_layout(&C, PackedKind::Fp8, 1 << 31, "cols"), "cols");
    }

    #[test]
    fn the_tensor_core_kernels_read_8_bit_codes_and_int4_in_whole_steps() {
        let int4 = |group_size| PackedKind::Int4 { group_size };
        for (kind, cols) in [
            (PackedKind::Fp8, 4096),
            (PackedKind::Int8, 14336),
            (PackedKind::Fp8, 96),
            (int4(128), 4096),
            (int4(256), 14336),
            (int4(128), 96),
        ] {
            assert!(mma_reads(kind, cols, false), "{kind:?} {cols}");
            assert!(PackedKernel::Mma
                .layout(&C, kind, cols as u32, "cols", false)
                .is_ok());
            assert!(!mma_reads(kind, cols, true));
            unsupported(
                PackedKernel::Mma.layout(&C, kind, cols as u32, "cols", true),
                "perm",
            );
            // The GEMVs read a permuted matrix.
            assert!(PackedKernel::Gemv
                .layout(&C, kind, cols as u32, "cols", true)
                .is_ok());
        }
        for group_size in [32, 64, 192] {
            assert!(!mma_reads(int4(group_size), 4096, false));
            unsupported(
                PackedKernel::Mma.layout(&C, int4(group_size), 4096, "cols", false),
                "group_size",
            );
        }
        for (kind, cols) in [(PackedKind::Int8, 4008u32), (int4(128), 4080)] {
            assert!(!mma_reads(kind, cols as usize, false));
            unsupported(
                PackedKernel::Mma.layout(&C, kind, cols, "cols", false),
                "cols",
            );
        }
        assert!(!mma_reads(NF4_64, 4096, false));
        unsupported(
            PackedKernel::Mma.layout(&C, NF4_64, 4096, "cols", false),
            "kind",
        );
    }

    #[test]
    fn a_table_goes_with_table_codes_only() {
        let t = view::<f32>(16);
        assert_eq!(table_view(&C, NF4_64, Some(t)).unwrap().unwrap().len(), 16);
        unsupported(table_view(&C, NF4_64, None), "table");
        for kind in [
            PackedKind::Fp8,
            PackedKind::Int8,
            PackedKind::Int4 { group_size: 32 },
        ] {
            assert!(table_view(&C, kind, None).unwrap().is_none());
            unsupported(table_view(&C, kind, Some(t)), "table");
        }
    }
}
