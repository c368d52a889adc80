//! `dequantize` (csrc/dequant.cu): a stack of `count` packed matrices `[rows, cols]`
//! ([`PackedView`], the layout of [`crate::quant::packed`]) expanded to bf16 `[count, rows, cols]`
//! in input-column order (`out[m, r, perm[m, j]]` = the value of stored column j, each rounded once
//! to bf16), for the tensor-core kernels of prefill chunks. One block per row of one matrix.

use cudarc::driver::CudaStream;
use half::bf16;

use super::quant_layout::{packed_args, row_layout, table_view, PackedView};
use crate::cuda::args::{DequantArgs, DequantScalars};
use crate::cuda::checks::Check;
use crate::cuda::error::CudaError;
use crate::cuda::launch::{launch_planned, Grid, Planned};
use crate::cuda::memory::ViewMut;
use crate::cuda::module::Kernels;
use crate::cuda::params::{DequantParams, KernelFamily, DEQUANT_THREADS};
use crate::quant::PackedKind;

/// Shapes of [`dequantize`]; the row layout follows from the stack's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DequantShape {
    /// Matrices in the stack.
    pub count: u32,
    /// Rows of each.
    pub rows: u32,
    /// Columns of each.
    pub cols: u32,
}

fn plan(s: &DequantShape, kind: PackedKind, a: &DequantArgs<'_>) -> Planned<DequantParams, 1> {
    let c = Check::new("dequantize");
    let l = row_layout(&c, kind, s.cols, "cols")?;
    table_view(&c, kind, a.table)?;
    let count = c.grid_yz("count", s.count as usize)?;
    c.count("rows", s.rows as usize)?;
    let params = a.params(
        c.op,
        &DequantScalars {
            count: s.count,
            rows: s.rows,
            cols: s.cols,
            row_bytes: l.row_bytes,
            row_params: l.row_params,
            group_size: l.group_size,
        },
    )?;
    let variant = c.variant(KernelFamily::Dequantize, "kind", &[l.kind])?;
    if s.count == 0 || s.rows == 0 {
        return Ok(None);
    }
    Ok(Some((
        params,
        [Grid {
            variant,
            grid: (s.rows, count, 1),
            block: DEQUANT_THREADS,
            shared_bytes: 0,
        }],
    )))
}

/// The launch arguments of expanding the packed `w` into `out`, with `w`'s format.
fn launch_args<'a>(w: PackedView<'a>, out: ViewMut<'a, bf16>) -> (PackedKind, DequantArgs<'a>) {
    packed_args!(DequantArgs, w, out)
}

/// Expands the packed stack `w` into bf16 `out` `[count, rows, cols]` in input-column order; an
/// empty stack launches nothing.
pub fn dequantize(
    kernels: &Kernels,
    stream: &CudaStream,
    s: &DequantShape,
    w: PackedView<'_>,
    out: ViewMut<'_, bf16>,
) -> Result<(), CudaError> {
    let (kind, args) = launch_args(w, out);
    launch_planned(kernels, stream, plan(s, kind, &args)?)
}

/// [`dequantize`] on the kernel emulator (feature `testing`).
///
/// # Safety
/// Every view in the arguments is of host memory
/// ([`View::of_host`](crate::cuda::memory::View::of_host)).
#[cfg(feature = "testing")]
pub unsafe fn dequantize_emulated(
    s: &DequantShape,
    w: PackedView<'_>,
    out: ViewMut<'_, bf16>,
    schedule: crate::cuda::emulator::Schedule,
) -> Result<(), crate::cuda::emulator::EmulatorError> {
    let (kind, args) = launch_args(w, out);
    let planned = plan(s, kind, &args)?;
    // SAFETY: planned just now over `args`, views of host memory (the caller's contract)
    // borrowed until this returns.
    unsafe { crate::cuda::emulator::run_planned(planned, schedule) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::memory::View;
    use crate::cuda::ops::fake::{
        kind_label, table_for, too_small, unsupported, view, view_mut, BASE, KINDS,
    };

    /// Buffer lengths `[codes, params, perm, out]` exactly as needed.
    fn exact(s: &DequantShape, kind: PackedKind) -> [usize; 4] {
        let [n, r, c] = [s.count, s.rows, s.cols].map(|v| v as usize);
        [
            n * r * kind.row_code_bytes(c),
            n * r * kind.device_row_params(c),
            n * c,
            n * r * c,
        ]
    }

    fn shape(count: u32, rows: u32, cols: u32) -> DequantShape {
        DequantShape { count, rows, cols }
    }

    fn args(kind: PackedKind, l: [usize; 4], perm: bool) -> DequantArgs<'static> {
        DequantArgs {
            codes: view(l[0]),
            params: view(l[1]),
            perm: perm.then(|| view(l[2])),
            table: table_for(kind),
            out: view_mut(l[3]),
        }
    }

    #[test]
    fn grid_symbol_and_params() {
        let s = shape(3, 5, 96);
        for kind in KINDS {
            for perm in [false, true] {
                let (p, [g]) = plan(&s, kind, &args(kind, exact(&s, kind), perm))
                    .unwrap()
                    .unwrap();
                assert_eq!(g.symbol(), format!("dequantize_{}", kind_label(kind)));
                assert_eq!((g.grid, g.block), ((5, 3, 1), DEQUANT_THREADS));
                assert_eq!((p.count, p.rows, p.cols), (3, 5, 96));
                assert_eq!(
                    (p.row_bytes as usize, p.row_params as usize),
                    (kind.row_code_bytes(96), kind.device_row_params(96))
                );
                assert_eq!(p.perm != 0, perm);
                assert_eq!(p.table != 0, kind_label(kind) == "lut4");
            }
        }
        let nf4 = KINDS[4];
        let mut a = args(nf4, exact(&s, nf4), false);
        a.table = None;
        unsupported(plan(&s, nf4, &a), "table");
        a.table = Some(view(15));
        too_small(plan(&s, nf4, &a), "table");
    }

    #[test]
    fn every_buffer_one_element_short_is_refused_by_name_and_empty_stacks_launch_nothing() {
        let s = shape(2, 3, 96);
        for kind in KINDS {
            let full = exact(&s, kind);
            for (i, name) in ["codes", "params", "perm", "out"].into_iter().enumerate() {
                let mut lens = full;
                lens[i] -= 1;
                too_small(plan(&s, kind, &args(kind, lens, true)), name);
            }
            // The permutation is read element by element here: any element-aligned view works.
            let mut a = args(kind, full, false);
            // SAFETY: planner tests never launch; the address is only checked.
            a.perm = Some(unsafe { View::from_raw(BASE + 4, full[2]) });
            assert!(plan(&s, kind, &a).is_ok());
            for empty in [
                DequantShape { count: 0, ..s },
                DequantShape { rows: 0, ..s },
            ] {
                assert!(plan(&empty, kind, &args(kind, exact(&empty, kind), true))
                    .unwrap()
                    .is_none());
            }
        }
    }

    #[test]
    fn refuses_unreadable_columns_and_too_many_matrices() {
        let s = shape(1, 1, 24);
        unsupported(
            plan(
                &s,
                PackedKind::Fp8,
                &args(PackedKind::Fp8, [32, 1, 32, 32], false),
            ),
            "cols",
        );
        let s = shape(70_000, 1, 32);
        let lens = exact(&s, PackedKind::Fp8);
        unsupported(
            plan(&s, PackedKind::Fp8, &args(PackedKind::Fp8, lens, false)),
            "count",
        );
    }
}
