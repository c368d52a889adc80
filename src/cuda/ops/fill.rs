//! `fill_random` (csrc/fill.cu): seeded pseudo-random bf16 values `out[i] = shift + scale * u`, `u` in
//! [-1, 1), for benchmarks that make weights of real shapes on the device. Fills a whole `[len]` view
//! of any length, in launches of at most 2^30 elements with consecutive hash indices.

use cudarc::driver::CudaStream;
use half::bf16;

use crate::cuda::args::{FillArgs, FillScalars};
use crate::cuda::checks::Check;
use crate::cuda::error::{CudaError, KernelError};
use crate::cuda::launch::{launch, Grid};
use crate::cuda::memory::ViewMut;
use crate::cuda::module::Kernels;
use crate::cuda::params::{FillParams, KernelFamily, FILL_THREADS};

/// Elements per launch (keeps every index of a launch below 2^31).
const PIECE: usize = 1 << 30;
/// Most blocks of one launch (the grid-stride loop covers the rest).
const MAX_BLOCKS: usize = 1 << 16;

/// Values of [`fill_random`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FillValues {
    /// Seed.
    pub seed: u32,
    /// Half-width of the range.
    pub scale: f32,
    /// Centre of the range.
    pub shift: f32,
}

/// One launch per piece of at most [`PIECE`] elements of `out`, in order.
fn plan(v: &FillValues, mut out: ViewMut<'_, bf16>) -> Result<Vec<(FillParams, Grid)>, CudaError> {
    let c = Check::new("fill_random");
    for (what, value) in [("scale", v.scale), ("shift", v.shift)] {
        if !value.is_finite() {
            return Err(CudaError::Kernel(KernelError::InvalidFloat {
                op: c.op,
                what,
                value,
            }));
        }
    }
    let len = out.len();
    // The hash index wraps at 2^32: beyond that, values would repeat.
    if len > u32::MAX as usize {
        return Err(c.unsupported("len", len, "must be below 2^32"));
    }
    let variant = c.variant(KernelFamily::FillRandom, "fill_random", &[])?;
    let mut launches = Vec::with_capacity(len.div_ceil(PIECE));
    let mut offset = 0;
    while offset < len {
        let piece = (len - offset).min(PIECE);
        let view = out.reborrow().sub(offset, piece).ok_or(CudaError::Kernel(
            KernelError::BufferTooSmall {
                op: c.op,
                buffer: "out",
                expected: offset + piece,
                actual: len,
            },
        ))?;
        let s = FillScalars {
            len: piece as u32,
            base: offset as u32,
            seed: v.seed,
            scale: v.scale,
            shift: v.shift,
        };
        let params = FillArgs { out: view }.params(c.op, &s)?;
        let blocks = piece.div_ceil(FILL_THREADS as usize).min(MAX_BLOCKS);
        launches.push((params, Grid::linear(variant, blocks as u32, FILL_THREADS)));
        offset += piece;
    }
    Ok(launches)
}

/// Fills every element of `out` with seeded values in `shift ± scale` (set-up only: the plan is a
/// small vector).
pub fn fill_random(
    kernels: &Kernels,
    stream: &CudaStream,
    v: &FillValues,
    out: ViewMut<'_, bf16>,
) -> Result<(), CudaError> {
    for (params, grid) in plan(v, out)? {
        launch(kernels, stream, &params, &[grid])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::ops::fake::{unsupported, view_mut, BASE};

    const VALUES: FillValues = FillValues {
        seed: 7,
        scale: 0.02,
        shift: 0.0,
    };

    #[test]
    fn pieces_cover_the_buffer_with_consecutive_indices() {
        let len = 2 * PIECE + 12_345;
        let plans = plan(&VALUES, view_mut(len)).unwrap();
        assert_eq!(plans.len(), 3);
        let mut next = 0usize;
        for (params, grid) in &plans {
            assert_eq!(grid.symbol(), "fill_random");
            assert_eq!(params.base as usize, next);
            assert_eq!(params.out, BASE + 2 * next as u64);
            assert_eq!((params.seed, params.scale), (7, 0.02));
            let covered = grid.grid.0 as usize * FILL_THREADS as usize;
            assert!(covered >= (params.len as usize).min(MAX_BLOCKS * FILL_THREADS as usize));
            next += params.len as usize;
        }
        assert_eq!(next, len);
        assert_eq!(plans[2].0.len, 12_345);
    }

    #[test]
    fn bad_values_and_huge_buffers_are_refused() {
        for bad in [f32::NAN, f32::INFINITY] {
            for v in [
                FillValues {
                    scale: bad,
                    ..VALUES
                },
                FillValues {
                    shift: bad,
                    ..VALUES
                },
            ] {
                assert!(matches!(
                    plan(&v, view_mut(10)),
                    Err(CudaError::Kernel(KernelError::InvalidFloat { .. }))
                ));
            }
        }
        unsupported(plan(&VALUES, view_mut(1 << 32)), "len");
        assert!(plan(&VALUES, view_mut(0)).unwrap().is_empty());
    }
}
