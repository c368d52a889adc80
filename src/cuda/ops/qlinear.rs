//! `qlinear` (csrc/qlinear.cu): the dense projection of a decode batch over one packed quantized
//! matrix `[out_features, in_features]` ([`PackedView`], the layout of [`crate::quant::packed`]):
//! `out[t, o] = sum_j x[t, perm[j]] * w[o, j]` with f32 accumulation, the same product and outputs
//! as `linear` (`x` `[tokens, in_features]` bf16, out bf16 or f32 as the view's type says). At
//! most [`LINEAR_GEMV_MAX_TOKENS`] tokens: prefill chunks `dequantize` the matrix and take
//! `linear`. Each warp streams QLINEAR_ROWS_PER_WARP rows once per tile of tokens (the tile of
//! `linear_gemv`).
//!
//! `qlinear_mma` (csrc/quant_mma.cuh) computes the same on the tensor cores for the matrices
//! [`mma_reads`](super::mma_reads) accepts (FP8, INT8, INT4 in groups of multiples of 128 columns;
//! no permutation): a block of QMMA_WARPS warps per 16 rows, the warps splitting the columns, one
//! pass over the rows for up to 16 tokens (one or two 8-column n-tiles).

use cudarc::driver::CudaStream;
use half::bf16;

use super::linear::gemv_tile;
use super::quant_layout::{packed_args, table_view, PackedKernel, PackedView};
use crate::cuda::args::{LinearScalars, QLinearArgs, QLinearScalars};
use crate::cuda::checks::Check;
use crate::cuda::error::CudaError;
use crate::cuda::launch::{launch_planned, unless_empty, Grid, Planned};
use crate::cuda::memory::{AnyViewMut, View};
use crate::cuda::module::Kernels;
use crate::cuda::params::{
    KernelFamily, QLinearParams, LINEAR_GEMV_MAX_TOKENS, QLINEAR_ROWS_PER_WARP, QLINEAR_WARPS,
    QMMA_ROWS, QMMA_WARPS,
};
use crate::quant::PackedKind;

fn plan(
    kernel: PackedKernel,
    s: &LinearScalars,
    kind: PackedKind,
    a: &QLinearArgs<'_>,
) -> Planned<QLinearParams, 1> {
    let mma = kernel == PackedKernel::Mma;
    let c = Check::new(if mma { "qlinear_mma" } else { "qlinear" });
    let l = kernel.layout(&c, kind, s.in_features, "in_features", a.perm.is_some())?;
    if s.tokens > LINEAR_GEMV_MAX_TOKENS {
        return Err(c.unsupported(
            "tokens",
            s.tokens as usize,
            format!(
                "must be at most {LINEAR_GEMV_MAX_TOKENS} (a decode batch); dequantize the weights \
                 and use linear for more"
            ),
        ));
    }
    c.at_least("out_features", s.out_features as usize, 1)?;
    c.count("out_features", s.out_features as usize)?;
    table_view(&c, kind, a.table)?;
    let params = a.params(
        c.op,
        &QLinearScalars {
            tokens: s.tokens,
            in_features: s.in_features,
            out_features: s.out_features,
            row_bytes: l.row_bytes,
            row_params: l.row_params,
            group_size: l.group_size,
        },
    )?;
    let out_f32 = u32::from(a.out.is_f32());
    let grid = if mma {
        let consts = [l.kind, mma_tiles(s.tokens), out_f32];
        let variant = c.variant(
            KernelFamily::QLinearMma,
            "(kind, n-tiles, out_f32)",
            &consts,
        )?;
        Grid::linear(variant, s.out_features.div_ceil(QMMA_ROWS), QMMA_WARPS * 32)
    } else {
        let consts = [l.kind, gemv_tile(s.tokens), out_f32];
        let variant = c.variant(KernelFamily::QLinear, "(kind, tile, out_f32)", &consts)?;
        let rows_per_block = QLINEAR_WARPS * QLINEAR_ROWS_PER_WARP;
        Grid::linear(
            variant,
            s.out_features.div_ceil(rows_per_block),
            QLINEAR_WARPS * 32,
        )
    };
    Ok(unless_empty(s.tokens, params, [grid]))
}

/// 8-column n-tiles the tensor-core decode kernels take for `columns` tokens or slots (1, 2 or 4;
/// the dense kernel has 1 and 2, enough for [`LINEAR_GEMV_MAX_TOKENS`]).
pub(super) fn mma_tiles(columns: u32) -> u32 {
    match columns {
        0..=8 => 1,
        9..=16 => 2,
        _ => 4,
    }
}

/// The launch arguments of `x` times the packed `w` into `out`, with `w`'s format.
fn launch_args<'a>(
    x: View<'a, bf16>,
    w: PackedView<'a>,
    out: AnyViewMut<'a>,
) -> (PackedKind, QLinearArgs<'a>) {
    packed_args!(QLinearArgs, w, x, out)
}

/// `out[t, o] = sum_i x[t, i] * w[o, i]` with `w` packed, f32 accumulation, for at most
/// [`LINEAR_GEMV_MAX_TOKENS`] tokens, on `kernel` (the tensor-core kernels only for the matrices
/// [`mma_reads`](super::mma_reads) accepts; the same outputs up to the order of the f32 sums);
/// zero tokens launch nothing.
pub fn qlinear(
    kernels: &Kernels,
    stream: &CudaStream,
    s: &LinearScalars,
    (x, w): (View<'_, bf16>, PackedView<'_>),
    out: AnyViewMut<'_>,
    kernel: PackedKernel,
) -> Result<(), CudaError> {
    let (kind, args) = launch_args(x, w, out);
    launch_planned(kernels, stream, plan(kernel, s, kind, &args)?)
}

/// [`qlinear`] on the kernel emulator (feature `testing`).
///
/// # Safety
/// Every view in the arguments is of host memory
/// ([`View::of_host`](crate::cuda::memory::View::of_host)).
#[cfg(feature = "testing")]
pub unsafe fn qlinear_emulated(
    s: &LinearScalars,
    (x, w): (View<'_, bf16>, PackedView<'_>),
    out: AnyViewMut<'_>,
    kernel: PackedKernel,
    schedule: crate::cuda::emulator::Schedule,
) -> Result<(), crate::cuda::emulator::EmulatorError> {
    let (kind, args) = launch_args(x, w, out);
    let planned = plan(kernel, s, kind, &args)?;
    // SAFETY: planned just now over `args`, views of host memory (the caller's contract)
    // borrowed until this returns.
    unsafe { crate::cuda::emulator::run_planned(planned, schedule) }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::cuda::ops::fake::{
        any_kind, any_view_mut, kind_label, linear_scalars, table_for, too_small, unsupported,
        view, KINDS,
    };
    use crate::cuda::params::KERNEL_VARIANTS;
    use crate::packed::lut4::Lut4;

    /// A column count every kind accepts.
    const COLS: u32 = 96;

    /// Buffer lengths `[x, codes, params, perm, out]` exactly as needed (perm 0: none).
    fn exact(s: &LinearScalars, kind: PackedKind, perm: bool) -> [usize; 5] {
        let [t, i, o] = [s.tokens, s.in_features, s.out_features].map(|v| v as usize);
        [
            t * i,
            o * kind.row_code_bytes(i),
            o * kind.device_row_params(i),
            if perm { i } else { 0 },
            t * o,
        ]
    }

    fn args(kind: PackedKind, lens: [usize; 5], perm: bool, out_f32: bool) -> QLinearArgs<'static> {
        QLinearArgs {
            x: view(lens[0]),
            codes: view(lens[1]),
            params: view(lens[2]),
            perm: perm.then(|| view(lens[3])),
            table: table_for(kind),
            out: any_view_mut(lens[4], out_f32),
        }
    }

    fn plan_exact(
        s: &LinearScalars,
        kind: PackedKind,
        perm: bool,
        out_f32: bool,
    ) -> Planned<QLinearParams, 1> {
        plan_exact_on(PackedKernel::Gemv, s, kind, (perm, out_f32))
    }

    fn plan_exact_on(
        kernel: PackedKernel,
        s: &LinearScalars,
        kind: PackedKind,
        (perm, out_f32): (bool, bool),
    ) -> Planned<QLinearParams, 1> {
        plan(
            kernel,
            s,
            kind,
            &args(kind, exact(s, kind, perm), perm, out_f32),
        )
    }

    #[test]
    fn picks_the_kind_tile_and_output_type() {
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
                    let (_, [g]) =
                        plan_exact(&linear_scalars(tokens, COLS, 40), kind, false, out_f32)
                            .unwrap()
                            .unwrap();
                    assert_eq!(
                        g.symbol(),
                        format!("qlinear_{}_t{tile}_{suffix}", kind_label(kind))
                    );
                    assert_eq!(g.grid, (3, 1, 1), "40 rows in blocks of 16");
                    assert_eq!(g.block, QLINEAR_WARPS * 32);
                    assert_eq!(g.shared_bytes, 0);
                }
            }
        }
    }

    #[test]
    fn params_carry_the_row_layout() {
        for kind in KINDS {
            for perm in [false, true] {
                let (p, _) = plan_exact(&linear_scalars(3, COLS, 7), kind, perm, false)
                    .unwrap()
                    .unwrap();
                assert_eq!((p.tokens, p.in_features, p.out_features), (3, 96, 7));
                assert_eq!(
                    (p.row_bytes as usize, p.row_params as usize),
                    (kind.row_code_bytes(96), kind.device_row_params(96))
                );
                let group = match kind {
                    PackedKind::Int4 { group_size } | PackedKind::Lut4 { group_size, .. } => {
                        group_size as u32
                    }
                    _ => 0,
                };
                assert_eq!(p.group_size, group);
                assert_eq!(p.perm != 0, perm, "a null perm without one");
                let lut4 = matches!(kind, PackedKind::Lut4 { .. });
                assert_eq!(p.table != 0, lut4, "a table exactly for table codes");
            }
        }
    }

    #[test]
    fn mixtral_shapes_fill_the_gpu() {
        // Decode at batch 1: QKV 6144 x 4096, O 4096 x 4096.
        for kind in KINDS {
            for (out, blocks) in [(6144, 384), (4096, 256)] {
                let (_, [g]) = plan_exact(&linear_scalars(1, 4096, out), kind, false, false)
                    .unwrap()
                    .unwrap();
                assert_eq!(g.grid, (blocks, 1, 1));
            }
        }
    }

    const INT4_128: PackedKind = PackedKind::Int4 { group_size: 128 };

    #[test]
    fn the_tensor_core_kernel_takes_one_pass_of_one_or_two_n_tiles() {
        let int4_256 = PackedKind::Int4 { group_size: 256 };
        for kind in [PackedKind::Fp8, PackedKind::Int8, INT4_128, int4_256] {
            for (tokens, columns) in [(1, 8), (8, 8), (9, 16), (16, 16)] {
                for (out_f32, suffix) in [(false, "bf16"), (true, "f32")] {
                    let s = linear_scalars(tokens, 4096, 6144);
                    let (p, [g]) = plan_exact_on(PackedKernel::Mma, &s, kind, (false, out_f32))
                        .unwrap()
                        .unwrap();
                    let name = format!("qlinear_mma_{}_n{columns}_{suffix}", kind_label(kind));
                    assert_eq!(g.symbol(), name);
                    assert_eq!(g.grid, (384, 1, 1), "6144 rows in blocks of 16");
                    assert_eq!(g.block, QMMA_WARPS * 32);
                    assert_eq!(
                        (p.row_bytes as usize, p.row_params as usize),
                        (kind.row_code_bytes(4096), kind.device_row_params(4096))
                    );
                }
            }
        }
    }

    #[test]
    fn the_tensor_core_kernel_refuses_what_it_cannot_read() {
        let s = linear_scalars(1, 4096, 64);
        for kind in [PackedKind::Fp8, PackedKind::Int8, INT4_128] {
            unsupported(
                plan_exact_on(PackedKernel::Mma, &s, kind, (true, false)),
                "perm",
            );
        }
        let int4_32 = PackedKind::Int4 { group_size: 32 };
        unsupported(
            plan_exact_on(PackedKernel::Mma, &s, int4_32, (false, false)),
            "group_size",
        );
        unsupported(
            plan_exact_on(PackedKernel::Mma, &s, KINDS[4], (false, false)),
            "kind",
        );
        unsupported(
            plan_exact_on(
                PackedKernel::Mma,
                &linear_scalars(1, 4008, 64),
                PackedKind::Fp8,
                (false, false),
            ),
            "in_features",
        );
        unsupported(
            plan_exact_on(
                PackedKernel::Mma,
                &linear_scalars(17, 4096, 64),
                INT4_128,
                (false, false),
            ),
            "tokens",
        );
        let none = plan_exact_on(
            PackedKernel::Mma,
            &linear_scalars(0, 4096, 64),
            INT4_128,
            (false, false),
        );
        assert!(none.unwrap().is_none());
        // Columns that are not a whole number of steps: the last step multiplies zeros.
        assert!(plan_exact_on(
            PackedKernel::Mma,
            &linear_scalars(3, 4160, 64),
            INT4_128,
            (false, false)
        )
        .is_ok());
        assert!(plan_exact_on(
            PackedKernel::Mma,
            &linear_scalars(3, 80, 64),
            PackedKind::Int8,
            (false, false)
        )
        .is_ok());
    }

    #[test]
    fn every_buffer_one_element_short_is_refused_by_name() {
        for kind in KINDS {
            for tokens in [1, 7, 16] {
                let s = linear_scalars(tokens, COLS, 19);
                let full = exact(&s, kind, true);
                for (i, name) in ["x", "codes", "params", "perm", "out"]
                    .into_iter()
                    .enumerate()
                {
                    let mut lens = full;
                    lens[i] -= 1;
                    too_small(
                        plan(PackedKernel::Gemv, &s, kind, &args(kind, lens, true, false)),
                        name,
                    );
                }
                assert!(plan(PackedKernel::Gemv, &s, kind, &args(kind, full, true, true)).is_ok());
            }
        }
    }

    #[test]
    fn refuses_bad_layouts_and_batches() {
        let s = linear_scalars(1, 48, 4);
        unsupported(
            plan_exact(&s, PackedKind::Int4 { group_size: 32 }, false, false),
            "in_features",
        );
        unsupported(
            plan_exact(
                &linear_scalars(1, COLS, 4),
                PackedKind::Int4 { group_size: 48 },
                false,
                false,
            ),
            "group_size",
        );
        for tokens in [17, 64, 4096] {
            unsupported(
                plan_exact(
                    &linear_scalars(tokens, COLS, 4),
                    PackedKind::Fp8,
                    false,
                    false,
                ),
                "tokens",
            );
        }
        unsupported(
            plan_exact(&linear_scalars(1, COLS, 0), PackedKind::Int8, false, false),
            "out_features",
        );
    }

    #[test]
    fn a_table_exactly_for_table_codes_and_never_short() {
        let s = linear_scalars(2, COLS, 5);
        let nf4 = KINDS[4];
        let mut a = args(nf4, exact(&s, nf4, false), false, false);
        a.table = None;
        unsupported(plan(PackedKernel::Gemv, &s, nf4, &a), "table");
        a.table = Some(view(15));
        too_small(plan(PackedKernel::Gemv, &s, nf4, &a), "table");
        let mut a = args(
            PackedKind::Fp8,
            exact(&s, PackedKind::Fp8, false),
            false,
            false,
        );
        a.table = Some(view(16));
        unsupported(plan(PackedKernel::Gemv, &s, PackedKind::Fp8, &a), "table");
    }

    #[test]
    fn zero_tokens_launch_nothing_but_are_still_checked() {
        for kind in KINDS {
            let s = linear_scalars(0, COLS, 10);
            assert!(plan_exact(&s, kind, true, false).unwrap().is_none());
            let mut lens = exact(&s, kind, false);
            lens[1] -= 1;
            too_small(
                plan(
                    PackedKernel::Gemv,
                    &s,
                    kind,
                    &args(kind, lens, false, false),
                ),
                "codes",
            );
        }
    }

    proptest! {
        #[test]
        fn the_grid_covers_every_row_once(
            kind in any_kind(Lut4::Nf4),
            tokens in 1u32..=16,
            in32 in 1u32..40,
            out_features in 1u32..3000,
            out_f32 in any::<bool>(),
            perm in any::<bool>(),
        ) {
            let s = linear_scalars(tokens, in32 * 32, out_features);
            let (_, [g]) = plan_exact(&s, kind, perm, out_f32).unwrap().unwrap();
            let rows = QLINEAR_WARPS * QLINEAR_ROWS_PER_WARP;
            prop_assert!(g.grid.0 * rows >= out_features);
            prop_assert!((g.grid.0 - 1) * rows < out_features, "no empty block");
            let consts = KERNEL_VARIANTS[g.variant].consts;
            prop_assert!(consts[1] >= tokens.min(8));
            prop_assert!(consts[1] < 2 * tokens);
            prop_assert_eq!(consts[2], u32::from(out_f32));
        }
    }
}
