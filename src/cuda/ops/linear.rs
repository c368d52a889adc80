//! `linear_gemv` / `linear_mma` (csrc/linear.cu): the dense projection
//! `out[tokens, out] = x[tokens, in] @ w[out, in]^T` (attention QKV and O projections, the LM head):
//! bf16 `x` and `w`, f32 accumulation, bf16 or f32 output (the view's type picks the variant).
//!
//! The planner picks the kernel from the token count:
//! - up to [`LINEAR_GEMV_MAX_TOKENS`](crate::cuda::select::LINEAR_GEMV_MAX_TOKENS) (16) tokens, `linear_gemv_t{1,2,4,8}`: a bandwidth-bound GEMV
//!   that streams each weight row once per tile of TILE tokens, TILE the smallest compiled tile
//!   covering the batch (capped at 8: 9..=16 tokens read the weights twice, the second pass mostly
//!   from L2);
//! - above that, `linear_mma`: the tensor-core GEMM on 128 x 128 output tiles. Below 17 tokens it
//!   would compute 128-row tiles for a handful of rows and launch too few blocks (out / 128) to fill
//!   the GPU, while the GEMV's cost is one weight read per 8 tokens; at 17+ tokens a third weight
//!   pass would cost more than the tensor cores' idle rows. The crossover has not been measured.
//!
//! `linear_mma_decode` (csrc/quant_mma.cuh) takes a decode batch of up to 16 tokens on the tensor
//! cores, every weight row read once for the batch; the engine runs it where the selection table
//! says (asked for by `CudaEngineOptions::mma_decode`).

use super::qlinear::mma_tiles;
use crate::cuda::args::{LinearArgs, LinearScalars};
use crate::cuda::checks::Check;
use crate::cuda::launch::{planned_launcher, unless_empty, Grid, Planned};
use crate::cuda::params::{
    KernelFamily, LinearParams, LINEAR_GEMV_MAX_TOKENS, LINEAR_GEMV_ROWS_PER_WARP,
    LINEAR_GEMV_WARPS, LINEAR_MMA_BM, LINEAR_MMA_BN, LINEAR_MMA_THREADS, QMMA_ROWS, QMMA_WARPS,
};
use crate::cuda::select::{select, Choice, Device as SelectDevice, Format, Op};

planned_launcher! {
    /// `out[t, o] = sum_i x[t, i] * w[o, i]` with f32 accumulation: a GEMV for up to
    /// [`LINEAR_GEMV_MAX_TOKENS`](crate::cuda::select::LINEAR_GEMV_MAX_TOKENS) tokens, the tensor-core GEMM above; zero tokens launch nothing.
    linear(LinearScalars, LinearArgs) = plan; emulated linear_emulated
}

planned_launcher! {
    /// [`linear`] for a decode batch of at most
    /// [`LINEAR_GEMV_MAX_TOKENS`](crate::cuda::select::LINEAR_GEMV_MAX_TOKENS) tokens on the
    /// tensor cores (csrc/quant_mma.cuh, the bf16 weights as stored): every weight row read once for
    /// the whole batch; the same outputs up to the order of the f32 sums.
    linear_mma_decode(LinearScalars, LinearArgs) = plan_mma_decode; emulated linear_mma_decode_emulated
}

/// Tokens (or slots) per weight pass of the GEMVs (`linear_gemv`, `qlinear`, `moe_*`, `qmoe_*`): the
/// smallest compiled tile covering `tokens`, capped at 8.
pub(super) fn gemv_tile(tokens: u32) -> u32 {
    match tokens {
        0..=1 => 1,
        2 => 2,
        3..=4 => 4,
        _ => 8,
    }
}

fn plan(s: &LinearScalars, a: &LinearArgs<'_>) -> Planned<LinearParams, 1> {
    let c = Check::new("linear");
    c.multiple_of_8("in_features", s.in_features as usize)?;
    c.at_least("out_features", s.out_features as usize, 1)?;
    for (what, value) in [
        ("tokens", s.tokens),
        ("in_features", s.in_features),
        ("out_features", s.out_features),
    ] {
        c.count(what, value as usize)?;
    }
    let params = a.params(c.op, s)?;
    let out_f32 = u32::from(a.out.is_f32());
    let choice = select(
        Op::Projection,
        s.tokens as usize,
        Format::Bf16,
        SelectDevice::default(),
    );
    let grid = if choice == Choice::LinearGemv {
        let rows_per_block = LINEAR_GEMV_WARPS * LINEAR_GEMV_ROWS_PER_WARP;
        let variant = c.variant(
            KernelFamily::LinearGemv,
            "(tile, out_f32)",
            &[gemv_tile(s.tokens), out_f32],
        )?;
        Grid::linear(
            variant,
            s.out_features.div_ceil(rows_per_block),
            LINEAR_GEMV_WARPS * 32,
        )
    } else {
        let variant = c.variant(KernelFamily::LinearMma, "out_f32", &[out_f32])?;
        let row_blocks = c.grid_yz("token blocks", s.tokens.div_ceil(LINEAR_MMA_BM) as usize)?;
        Grid {
            variant,
            grid: (s.out_features.div_ceil(LINEAR_MMA_BN), row_blocks, 1),
            block: LINEAR_MMA_THREADS,
            shared_bytes: 0,
        }
    };
    Ok(unless_empty(s.tokens, params, [grid]))
}

fn plan_mma_decode(s: &LinearScalars, a: &LinearArgs<'_>) -> Planned<LinearParams, 1> {
    let c = Check::new("linear_mma_decode");
    c.multiple_of_8("in_features", s.in_features as usize)?;
    c.at_least("out_features", s.out_features as usize, 1)?;
    if s.tokens > LINEAR_GEMV_MAX_TOKENS {
        return Err(c.unsupported(
            "tokens",
            s.tokens as usize,
            format!("must be at most {LINEAR_GEMV_MAX_TOKENS} (a decode batch)"),
        ));
    }
    c.count("out_features", s.out_features as usize)?;
    let params = a.params(c.op, s)?;
    let consts = [mma_tiles(s.tokens), u32::from(a.out.is_f32())];
    let variant = c.variant(KernelFamily::LinearMmaDecode, "(n-tiles, out_f32)", &consts)?;
    let grid = Grid::linear(variant, s.out_features.div_ceil(QMMA_ROWS), QMMA_WARPS * 32);
    Ok(unless_empty(s.tokens, params, [grid]))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::cuda::ops::fake::{
        any_view_mut, linear_args, linear_scalars as scalars, too_small, unsupported, view,
    };
    use crate::cuda::params::KERNEL_VARIANTS;
    use crate::cuda::select::LINEAR_GEMV_MAX_TOKENS;

    fn args(x: usize, w: usize, out: usize, out_f32: bool) -> LinearArgs<'static> {
        LinearArgs {
            x: view(x),
            w: view(w),
            out: any_view_mut(out, out_f32),
        }
    }

    /// Plans `s` with buffers of exactly the needed lengths.
    fn plan_exact(s: &LinearScalars, out_f32: bool) -> Planned<LinearParams, 1> {
        plan(s, &linear_args(s, out_f32))
    }

    #[test]
    fn the_decode_kernel_on_tensor_cores_takes_up_to_16_tokens_in_one_pass() {
        for (tokens, columns) in [(1, 8), (8, 8), (9, 16), (16, 16)] {
            for (out_f32, suffix) in [(false, "bf16"), (true, "f32")] {
                let s = scalars(tokens, 4096, 6144);
                let (t, i, o) = (tokens as usize, 4096, 6144);
                let a = args(t * i, o * i, t * o, out_f32);
                let (_, [grid]) = plan_mma_decode(&s, &a).unwrap().unwrap();
                let name = format!("linear_mma_decode_n{columns}_{suffix}");
                assert_eq!(grid.symbol(), name);
                assert_eq!(
                    (grid.grid, grid.block),
                    ((6144 / 16, 1, 1), QMMA_WARPS * 32)
                );
            }
        }
        let a = args(17 * 64, 40 * 64, 17 * 40, false);
        unsupported(plan_mma_decode(&scalars(17, 64, 40), &a), "tokens");
        let a = args(60, 40 * 60, 40, false);
        unsupported(plan_mma_decode(&scalars(1, 60, 40), &a), "in_features");
        too_small(
            plan_mma_decode(&scalars(2, 64, 40), &args(127, 40 * 64, 80, false)),
            "x",
        );
    }

    #[test]
    fn picks_the_gemv_tile_or_the_mma_kernel_by_token_count() {
        let cases = [
            (1, "linear_gemv_t1"),
            (2, "linear_gemv_t2"),
            (3, "linear_gemv_t4"),
            (4, "linear_gemv_t4"),
            (5, "linear_gemv_t8"),
            (8, "linear_gemv_t8"),
            (9, "linear_gemv_t8"),
            (16, "linear_gemv_t8"),
            (17, "linear_mma"),
            (130, "linear_mma"),
            (4096, "linear_mma"),
        ];
        for (tokens, prefix) in cases {
            for (out_f32, suffix) in [(false, "_bf16"), (true, "_f32")] {
                let (_, [grid]) = plan_exact(&scalars(tokens, 64, 40), out_f32)
                    .unwrap()
                    .unwrap();
                assert_eq!(
                    grid.symbol(),
                    format!("{prefix}{suffix}"),
                    "tokens {tokens}"
                );
                let block = if prefix == "linear_mma" {
                    LINEAR_MMA_THREADS
                } else {
                    LINEAR_GEMV_WARPS * 32
                };
                assert_eq!(grid.block, block);
                assert_eq!(grid.shared_bytes, 0);
            }
        }
        assert_eq!(LINEAR_GEMV_MAX_TOKENS, 16, "the documented crossover");
    }

    #[test]
    fn mixtral_shapes_fill_the_gpu() {
        // Decode at batch 1: QKV 6144 x 4096, O 4096 x 4096, LM head 32000 x 4096.
        for (out, blocks) in [(6144, 384), (4096, 256), (32000, 2000)] {
            let (_, [grid]) = plan_exact(&scalars(1, 4096, out), false).unwrap().unwrap();
            assert_eq!(grid.grid, (blocks, 1, 1));
            assert!(grid.grid.0 >= 132, "at least one block per H100 SM");
        }
        let (_, [grid]) = plan_exact(&scalars(512, 4096, 6144), false)
            .unwrap()
            .unwrap();
        assert_eq!(grid.grid, (48, 4, 1));
    }

    #[test]
    fn params_carry_the_shape() {
        let (p, _) = plan_exact(&scalars(3, 24, 7), false).unwrap().unwrap();
        assert_eq!((p.tokens, p.in_features, p.out_features), (3, 24, 7));
    }

    #[test]
    fn every_buffer_one_element_short_is_refused_by_name() {
        for tokens in [1, 5, 16, 17, 200] {
            let s = scalars(tokens, 72, 19);
            let t = tokens as usize;
            let (x, w, out) = (t * 72, 19 * 72, t * 19);
            for out_f32 in [false, true] {
                too_small(plan(&s, &args(x - 1, w, out, out_f32)), "x");
                too_small(plan(&s, &args(x, w - 1, out, out_f32)), "w");
                too_small(plan(&s, &args(x, w, out - 1, out_f32)), "out");
                assert!(plan(&s, &args(x, w, out, out_f32)).is_ok());
            }
        }
    }

    #[test]
    fn bad_shapes_are_typed_errors() {
        for in_features in [0, 4, 12, 100, 4095] {
            unsupported(
                plan_exact(&scalars(2, in_features, 5), false),
                "in_features",
            );
        }
        unsupported(plan_exact(&scalars(2, 8, 0), false), "out_features");
        unsupported(
            plan(
                &scalars(1 << 31, 8, 1),
                &args(usize::MAX, 8, usize::MAX, true),
            ),
            "tokens",
        );
        // More token blocks than a grid's y dimension holds.
        unsupported(
            plan(
                &scalars(65_536 * 128, 8, 1),
                &args(usize::MAX, 8, usize::MAX, true),
            ),
            "token blocks",
        );
    }

    #[test]
    fn zero_tokens_launch_nothing_but_are_still_checked() {
        for out_f32 in [false, true] {
            assert!(plan_exact(&scalars(0, 64, 10), out_f32).unwrap().is_none());
        }
        assert!(plan_exact(&scalars(0, 60, 10), false).is_err());
        too_small(plan(&scalars(0, 64, 10), &args(0, 639, 0, false)), "w");
    }

    proptest! {
        #[test]
        fn the_grid_covers_every_output_exactly_once_per_block(
            tokens in 1u32..600,
            in8 in 1u32..600,
            out_features in 1u32..5000,
            out_f32 in any::<bool>(),
        ) {
            let (_, [g]) = plan_exact(&scalars(tokens, in8 * 8, out_features), out_f32)
                .unwrap()
                .unwrap();
            let (gx, gy, gz) = g.grid;
            prop_assert_eq!(gz, 1);
            if tokens as usize <= LINEAR_GEMV_MAX_TOKENS {
                // One block per LINEAR_GEMV_WARPS * ROWS_PER_WARP output rows; the kernel loops
                // over the token tiles.
                let rows = LINEAR_GEMV_WARPS * LINEAR_GEMV_ROWS_PER_WARP;
                prop_assert_eq!(gy, 1);
                prop_assert!(gx * rows >= out_features);
                prop_assert!((gx - 1) * rows < out_features, "no empty block");
                let tile = KERNEL_VARIANTS[g.variant].consts[0];
                prop_assert!(tile >= tokens.min(8), "tile {} for {} tokens", tile, tokens);
                prop_assert!(tile < 2 * tokens, "tile {} wastes half for {} tokens", tile, tokens);
            } else {
                prop_assert!(gx * LINEAR_MMA_BN >= out_features);
                prop_assert!((gx - 1) * LINEAR_MMA_BN < out_features, "no empty column block");
                prop_assert!(gy * LINEAR_MMA_BM >= tokens);
                prop_assert!((gy - 1) * LINEAR_MMA_BM < tokens, "no empty row block");
            }
            prop_assert_eq!(KERNEL_VARIANTS[g.variant].consts.last().copied(), Some(u32::from(out_f32)));
        }
    }
}
