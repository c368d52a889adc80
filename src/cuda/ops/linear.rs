//! The dense projection `out[tokens, out] = x[tokens, in] @ w[out, in]^T` (attention QKV and O
//! projections, the LM head): bf16 `x` and `w`, f32 accumulation, bf16 or f32 output.
//!
//! The planner picks one of two kernels of `csrc/linear.cu` from the token count:
//! - up to [`LINEAR_GEMV_MAX_TOKENS`] (16) tokens, `linear_gemv_t{1,2,4,8}`: a bandwidth-bound GEMV
//!   that streams each weight row once per tile of TILE tokens, TILE the smallest compiled tile
//!   covering the batch (capped at 8: 9..=16 tokens read the weights twice, the second pass mostly
//!   from L2);
//! - above that, `linear_mma`: the tensor-core GEMM on 128 x 128 output tiles. Below 17 tokens it
//!   would compute 128-row tiles for a handful of rows and launch too few blocks (out / 128) to fill
//!   the GPU, while the GEMV's cost is one weight read per 8 tokens; at 17+ tokens a third weight
//!   pass would cost more than the tensor cores' idle rows. The crossover has not been measured.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use super::{launch, read, write, Buf, Check, Launch};
use crate::cuda::error::CudaError;
use crate::cuda::module::Kernels;
use crate::cuda::params::{
    KernelFamily, LinearParams, LINEAR_GEMV_MAX_TOKENS, LINEAR_GEMV_ROWS_PER_WARP,
    LINEAR_GEMV_WARPS, LINEAR_MMA_BM, LINEAR_MMA_BN, LINEAR_MMA_THREADS,
};

/// Shapes of [`linear`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearShape {
    /// Rows of `x` and of the output (0 launches nothing).
    pub tokens: usize,
    /// Input features: columns of `x` and `w` (a positive multiple of 8).
    pub in_features: usize,
    /// Output features: rows of `w`, columns of the output (at least 1).
    pub out_features: usize,
}

/// Where [`linear`] writes `[tokens, out_features]`.
pub enum LinearOut<'a> {
    /// bf16 rows (e.g. the QKV projection).
    Bf16(&'a mut dyn DevicePtrMut<bf16>),
    /// f32 rows (e.g. the O projection into the residual stream, the logits).
    F32(&'a mut dyn DevicePtrMut<f32>),
}

/// Buffers of [`linear`].
pub struct LinearBuffers<'a> {
    /// `[tokens, in_features]` input rows (16-byte aligned).
    pub x: &'a dyn DevicePtr<bf16>,
    /// `[out_features, in_features]` weight as stored in checkpoints (16-byte aligned).
    pub w: &'a dyn DevicePtr<bf16>,
    /// `[tokens, out_features]` output.
    pub out: LinearOut<'a>,
}

/// Tokens per weight pass of `linear_gemv`: the smallest compiled tile covering `tokens`, capped at 8.
fn gemv_tile(tokens: usize) -> u32 {
    match tokens {
        0..=1 => 1,
        2 => 2,
        3..=4 => 4,
        _ => 8,
    }
}

/// `a * b` elements, refused when the product overflows (the kernels index in 64 bits).
fn elements(c: &Check, what: &'static str, a: usize, b: usize) -> Result<usize, CudaError> {
    a.checked_mul(b)
        .ok_or_else(|| c.unsupported(what, usize::MAX, "overflows"))
}

fn plan_linear(
    s: &LinearShape,
    x: Buf,
    w: Buf,
    out: Buf,
    out_f32: bool,
) -> Result<Option<Launch<LinearParams>>, CudaError> {
    let c = Check { op: "linear" };
    c.multiple_of_8("in_features", s.in_features)?;
    c.at_least("out_features", s.out_features, 1)?;
    let tokens = c.count("tokens", s.tokens)?;
    let in_features = c.count("in_features", s.in_features)?;
    let out_features = c.count("out_features", s.out_features)?;
    c.aligned16("x", x)?;
    c.aligned16("w", w)?;
    c.len(
        "x",
        x,
        elements(&c, "tokens * in_features", s.tokens, s.in_features)?,
    )?;
    c.len(
        "w",
        w,
        elements(
            &c,
            "out_features * in_features",
            s.out_features,
            s.in_features,
        )?,
    )?;
    c.len(
        "out",
        out,
        elements(&c, "tokens * out_features", s.tokens, s.out_features)?,
    )?;
    let out_f32 = u32::from(out_f32);
    let gemv = s.tokens <= LINEAR_GEMV_MAX_TOKENS as usize;
    let (variant, grid, block) = if gemv {
        let rows_per_block = (LINEAR_GEMV_WARPS * LINEAR_GEMV_ROWS_PER_WARP) as usize;
        let variant = c.variant(
            KernelFamily::LinearGemv,
            "(tile, out_f32)",
            &[gemv_tile(s.tokens), out_f32],
        )?;
        let blocks = c.count("row blocks", s.out_features.div_ceil(rows_per_block))?;
        (variant, (blocks, 1, 1), LINEAR_GEMV_WARPS * 32)
    } else {
        let variant = c.variant(KernelFamily::LinearMma, "out_f32", &[out_f32])?;
        let col_blocks = c.count(
            "out_features blocks",
            s.out_features.div_ceil(LINEAR_MMA_BN as usize),
        )?;
        let row_blocks = c.grid_yz("token blocks", s.tokens.div_ceil(LINEAR_MMA_BM as usize))?;
        (variant, (col_blocks, row_blocks, 1), LINEAR_MMA_THREADS)
    };
    if s.tokens == 0 {
        return Ok(None);
    }
    Ok(Some(Launch {
        variant,
        grid,
        block,
        shared_bytes: 0,
        params: LinearParams {
            x: x.address,
            w: w.address,
            out: out.address,
            tokens,
            in_features,
            out_features,
        },
    }))
}

/// `out[t, o] = sum_i x[t, i] * w[o, i]` with f32 accumulation: a GEMV for up to
/// [`LINEAR_GEMV_MAX_TOKENS`] tokens, the tensor-core GEMM above. Checks every buffer's length, the
/// 16-byte alignment of `x` and `w` and `in_features % 8 == 0`; allocates nothing, does not
/// synchronise (graph-capturable); zero tokens launch nothing.
pub fn linear(
    kernels: &Kernels,
    stream: &CudaStream,
    shape: &LinearShape,
    b: LinearBuffers<'_>,
) -> Result<(), CudaError> {
    let (x, _x) = read(b.x, stream);
    let (w, _w) = read(b.w, stream);
    let (out_f32, (out, _out)) = match b.out {
        LinearOut::Bf16(out) => (false, write(out, stream)),
        LinearOut::F32(out) => (true, write(out, stream)),
    };
    match plan_linear(shape, x, w, out, out_f32)? {
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

    fn buf(len: usize) -> Buf {
        Buf { address: BASE, len }
    }

    fn shape(tokens: usize, in_features: usize, out_features: usize) -> LinearShape {
        LinearShape {
            tokens,
            in_features,
            out_features,
        }
    }

    /// Plans `s` with buffers of exactly the needed lengths.
    fn plan(s: &LinearShape, out_f32: bool) -> Result<Option<Launch<LinearParams>>, CudaError> {
        plan_linear(
            s,
            buf(s.tokens * s.in_features),
            buf(s.out_features * s.in_features),
            buf(s.tokens * s.out_features),
            out_f32,
        )
    }

    fn symbol(p: &Launch<LinearParams>) -> &'static str {
        KERNEL_VARIANTS[p.variant].symbol
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
                let p = plan(&shape(tokens, 64, 40), out_f32).unwrap().unwrap();
                assert_eq!(symbol(&p), format!("{prefix}{suffix}"), "tokens {tokens}");
                let block = if prefix == "linear_mma" {
                    LINEAR_MMA_THREADS
                } else {
                    LINEAR_GEMV_WARPS * 32
                };
                assert_eq!(p.block, block);
                assert_eq!(p.shared_bytes, 0);
            }
        }
        assert_eq!(LINEAR_GEMV_MAX_TOKENS, 16, "the documented crossover");
    }

    #[test]
    fn mixtral_shapes_fill_the_gpu() {
        // Decode at batch 1: QKV 6144 x 4096, O 4096 x 4096, LM head 32000 x 4096.
        for (out, blocks) in [(6144, 384), (4096, 256), (32000, 2000)] {
            let p = plan(&shape(1, 4096, out), false).unwrap().unwrap();
            assert_eq!(p.grid, (blocks, 1, 1));
            assert!(p.grid.0 >= 132, "at least one block per H100 SM");
        }
        let p = plan(&shape(512, 4096, 6144), false).unwrap().unwrap();
        assert_eq!(p.grid, (48, 4, 1));
    }

    #[test]
    fn params_carry_the_shape_and_the_addresses() {
        let s = shape(3, 24, 7);
        let p = plan_linear(
            &s,
            Buf {
                address: BASE,
                len: 72,
            },
            Buf {
                address: BASE + 0x1000,
                len: 168,
            },
            Buf {
                address: BASE + 0x2002,
                len: 21,
            },
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (p.params.x, p.params.w, p.params.out),
            (BASE, BASE + 0x1000, BASE + 0x2002)
        );
        assert_eq!(
            (p.params.tokens, p.params.in_features, p.params.out_features),
            (3, 24, 7)
        );
    }

    #[test]
    fn every_buffer_one_element_short_is_refused_by_name() {
        for tokens in [1, 5, 16, 17, 200] {
            let s = shape(tokens, 72, 19);
            let (x, w, out) = (tokens * 72, 19 * 72, tokens * 19);
            for out_f32 in [false, true] {
                let needed = [x, w, out];
                for (i, name) in ["x", "w", "out"].into_iter().enumerate() {
                    let mut lens = needed;
                    lens[i] -= 1;
                    match plan_linear(&s, buf(lens[0]), buf(lens[1]), buf(lens[2]), out_f32) {
                        Err(CudaError::BufferTooSmall {
                            buffer, expected, ..
                        }) => assert_eq!((buffer, expected), (name, needed[i])),
                        other => panic!("tokens {tokens}, {name}: got {other:?}"),
                    }
                }
                assert!(plan_linear(&s, buf(x), buf(w), buf(out), out_f32).is_ok());
            }
        }
    }

    #[test]
    fn misaligned_x_or_w_is_refused() {
        let s = shape(4, 16, 3);
        for offset in [2, 8] {
            let shifted = Buf {
                address: BASE + offset,
                len: 64,
            };
            match plan_linear(&s, shifted, buf(48), buf(12), true) {
                Err(CudaError::Misaligned { buffer, .. }) => assert_eq!(buffer, "x"),
                other => panic!("{other:?}"),
            }
            let shifted = Buf {
                address: BASE + offset,
                len: 48,
            };
            match plan_linear(&s, buf(64), shifted, buf(12), true) {
                Err(CudaError::Misaligned { buffer, .. }) => assert_eq!(buffer, "w"),
                other => panic!("{other:?}"),
            }
        }
        // The output is written element by element: any element-aligned address works.
        let out = Buf {
            address: BASE + 4,
            len: 12,
        };
        assert!(plan_linear(&s, buf(64), buf(48), out, true).is_ok());
    }

    #[test]
    fn bad_shapes_are_typed_errors() {
        for in_features in [0, 4, 12, 100, 4095] {
            match plan(&shape(2, in_features, 5), false) {
                Err(CudaError::Unsupported { what, value, .. }) => {
                    assert_eq!((what, value), ("in_features", in_features));
                }
                other => panic!("in_features {in_features}: {other:?}"),
            }
        }
        match plan(&shape(2, 8, 0), false) {
            Err(CudaError::Unsupported { what, .. }) => assert_eq!(what, "out_features"),
            other => panic!("{other:?}"),
        }
        match plan_linear(
            &shape(1 << 31, 8, 1),
            buf(usize::MAX),
            buf(8),
            buf(usize::MAX),
            true,
        ) {
            Err(CudaError::Unsupported { what, .. }) => assert_eq!(what, "tokens"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn zero_tokens_launch_nothing_but_are_still_checked() {
        for out_f32 in [false, true] {
            assert!(plan(&shape(0, 64, 10), out_f32).unwrap().is_none());
            assert!(
                plan_linear(&shape(0, 64, 10), buf(0), buf(640), buf(0), out_f32)
                    .unwrap()
                    .is_none()
            );
        }
        assert!(plan(&shape(0, 60, 10), false).is_err());
        too_small_w(plan_linear(
            &shape(0, 64, 10),
            buf(0),
            buf(639),
            buf(0),
            false,
        ));
    }

    fn too_small_w(r: Result<Option<Launch<LinearParams>>, CudaError>) {
        match r {
            Err(CudaError::BufferTooSmall { buffer, .. }) => assert_eq!(buffer, "w"),
            other => panic!("{other:?}"),
        }
    }

    proptest! {
        #[test]
        fn the_grid_covers_every_output_exactly_once_per_block(
            tokens in 1usize..600,
            in8 in 1usize..600,
            out_features in 1usize..5000,
            out_f32 in any::<bool>(),
        ) {
            let s = shape(tokens, in8 * 8, out_features);
            let p = plan(&s, out_f32).unwrap().unwrap();
            let (gx, gy, gz) = p.grid;
            prop_assert_eq!(gz, 1);
            if tokens <= LINEAR_GEMV_MAX_TOKENS as usize {
                // One block per LINEAR_GEMV_WARPS * ROWS_PER_WARP output rows; the kernel loops
                // over the token tiles.
                let rows = (LINEAR_GEMV_WARPS * LINEAR_GEMV_ROWS_PER_WARP) as usize;
                prop_assert_eq!(gy, 1);
                prop_assert!(gx as usize * rows >= out_features);
                prop_assert!((gx as usize - 1) * rows < out_features, "no empty block");
                let tile = KERNEL_VARIANTS[p.variant].consts[0] as usize;
                prop_assert!(tile >= tokens.min(8), "tile {} for {} tokens", tile, tokens);
                prop_assert!(tile < 2 * tokens, "tile {} wastes half for {} tokens", tile, tokens);
            } else {
                let (bm, bn) = (LINEAR_MMA_BM as usize, LINEAR_MMA_BN as usize);
                prop_assert!(gx as usize * bn >= out_features);
                prop_assert!((gx as usize - 1) * bn < out_features, "no empty column block");
                prop_assert!(gy as usize * bm >= tokens);
                prop_assert!((gy as usize - 1) * bm < tokens, "no empty row block");
            }
            prop_assert_eq!(KERNEL_VARIANTS[p.variant].consts.last().copied(), Some(u32::from(out_f32)));
        }
    }
}
