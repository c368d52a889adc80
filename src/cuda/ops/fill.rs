//! `fill_random`: seeded pseudo-random bf16 values `out[i] = shift + scale * u`, `u` in [-1, 1), for
//! benchmarks that make weights of real shapes on the device (`[len]`, any length: filled in pieces
//! of at most 2^30 elements with consecutive hash indices).

use cudarc::driver::{CudaStream, DevicePtrMut};
use half::bf16;

use super::super::error::CudaError;
use super::super::module::Kernels;
use super::super::params::{FillParams, KernelFamily, FILL_THREADS};
use super::{launch, write, Check, Launch};

/// Elements per launch (keeps every index of a launch below 2^31).
const PIECE: usize = 1 << 30;
/// Most blocks of one launch (the grid-stride loop covers the rest).
const MAX_BLOCKS: usize = 1 << 16;

/// Values of [`fill_random`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FillShape {
    /// Elements to write from the start of `out`.
    pub len: usize,
    /// Seed.
    pub seed: u32,
    /// Half-width of the range.
    pub scale: f32,
    /// Centre of the range.
    pub shift: f32,
}

/// One launch per piece of at most 2^30 elements: (element offset, launch).
fn plan_fill(
    s: &FillShape,
    address: u64,
    len: usize,
) -> Result<Vec<(usize, Launch<FillParams>)>, CudaError> {
    let c = Check { op: "fill_random" };
    if !s.scale.is_finite() || !s.shift.is_finite() {
        return Err(CudaError::InvalidFloat {
            op: "fill_random",
            what: "scale / shift",
            value: if s.scale.is_finite() {
                s.shift
            } else {
                s.scale
            },
        });
    }
    if len < s.len {
        return Err(CudaError::BufferTooSmall {
            op: "fill_random",
            buffer: "out",
            expected: s.len,
            actual: len,
        });
    }
    // The hash index wraps at 2^32: beyond that, values would repeat.
    if s.len > u32::MAX as usize {
        return Err(c.unsupported("len", s.len, "must be below 2^32"));
    }
    let variant = c.variant(KernelFamily::FillRandom, "fill_random", &[])?;
    let mut launches = Vec::new();
    let mut offset = 0;
    while offset < s.len {
        let piece = (s.len - offset).min(PIECE);
        let blocks = piece.div_ceil(FILL_THREADS as usize).min(MAX_BLOCKS);
        launches.push((
            offset,
            Launch {
                variant,
                grid: (blocks as u32, 1, 1),
                block: FILL_THREADS,
                shared_bytes: 0,
                params: FillParams {
                    out: address + (offset * std::mem::size_of::<bf16>()) as u64,
                    len: piece as u32,
                    base: offset as u32,
                    seed: s.seed,
                    scale: s.scale,
                    shift: s.shift,
                },
            },
        ));
        offset += piece;
    }
    Ok(launches)
}

/// Fills the first `shape.len` elements of `out` with seeded values in `shift ± scale`.
pub fn fill_random(
    kernels: &Kernels,
    stream: &CudaStream,
    shape: &FillShape,
    out: &mut dyn DevicePtrMut<bf16>,
) -> Result<(), CudaError> {
    let (buf, _guard) = write(out, stream);
    for (_, plan) in plan_fill(shape, buf.address, buf.len)? {
        launch(kernels, stream, &plan)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(len: usize) -> FillShape {
        FillShape {
            len,
            seed: 7,
            scale: 0.02,
            shift: 0.0,
        }
    }

    #[test]
    fn pieces_cover_the_buffer_with_consecutive_indices() {
        let len = 2 * PIECE + 12_345;
        let plans = plan_fill(&shape(len), 0x1000, len).unwrap();
        assert_eq!(plans.len(), 3);
        let mut next = 0usize;
        for (offset, launch) in &plans {
            assert_eq!(*offset, next);
            assert_eq!(launch.params.base as usize, next);
            assert_eq!(launch.params.out, 0x1000 + 2 * next as u64);
            let covered = launch.grid.0 as usize * FILL_THREADS as usize;
            assert!(
                covered >= (launch.params.len as usize).min(MAX_BLOCKS * FILL_THREADS as usize)
            );
            next += launch.params.len as usize;
        }
        assert_eq!(next, len);
    }

    #[test]
    fn bad_values_and_short_buffers_are_refused() {
        assert!(matches!(
            plan_fill(&shape(100), 0, 99),
            Err(CudaError::BufferTooSmall { .. })
        ));
        let nan = FillShape {
            scale: f32::NAN,
            ..shape(10)
        };
        assert!(matches!(
            plan_fill(&nan, 0, 10),
            Err(CudaError::InvalidFloat { .. })
        ));
        assert!(plan_fill(&shape(0), 0, 0).unwrap().is_empty());
    }
}
