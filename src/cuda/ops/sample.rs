//! Seeded top-k / top-p sampling on the device ([`sample`], kernel `sample` in `csrc/sampling.cu`):
//! per row, the host [`Sampler`](crate::sampling::Sampler) without repetition penalty, drawing with
//! the same xoshiro256++ stream as the host [`Rng`] for the same seed. Every per-row input
//! (temperature, top-k, top-p, random state) lives in device memory, so a captured CUDA graph can
//! replay the launch every token while the engine updates those buffers.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use super::{launch, read, write, Buf, Check, Launch};
use crate::cuda::error::CudaError;
use crate::cuda::module::Kernels;
use crate::cuda::params::{
    KernelFamily, SampleParams, SAMPLE_BAD_PARAMS, SAMPLE_NON_FINITE, SAMPLE_RNG_WORDS,
    SAMPLE_THREADS,
};
use crate::sampling::Rng;

/// u64 words of one row's random state in `rng_state`.
pub const RNG_STATE_WORDS: usize = SAMPLE_RNG_WORDS as usize;

/// The id [`sample`] writes for a row holding a NaN or infinite logit (the host sampler's
/// `NonFiniteLogits`); the row's random state is not advanced.
pub const SAMPLE_ID_NON_FINITE: u32 = SAMPLE_NON_FINITE;

/// The id [`sample`] writes for a row whose temperature is not finite and > 0 or whose top_p is not
/// in (0, 1] (validate with `SamplingParams::validate` before uploading); the random state is not
/// advanced.
pub const SAMPLE_ID_BAD_PARAMS: u32 = SAMPLE_BAD_PARAMS;

/// The device random state of a row seeded with `seed` (upload it into that row of `rng_state`):
/// the state of `Rng::new(seed)`, [`RNG_STATE_WORDS`] words.
pub fn rng_state_for_seed(seed: u64) -> Vec<u64> {
    Rng::new(seed).state().to_vec()
}

/// Shapes of [`sample`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleShape {
    /// Rows (sequences).
    pub rows: usize,
    /// Row length (at least 1).
    pub vocab: usize,
}

/// Buffers of [`sample`].
pub struct SampleBuffers<'a> {
    /// `[rows, vocab]` logits.
    pub logits: &'a dyn DevicePtr<f32>,
    /// `[rows]` temperature, finite and > 0 (greedy rows use [`argmax`](super::argmax)).
    pub temperature: &'a dyn DevicePtr<f32>,
    /// `[rows]` top-k, 0 = off.
    pub top_k: &'a dyn DevicePtr<u32>,
    /// `[rows]` top-p in (0, 1], 1 = off.
    pub top_p: &'a dyn DevicePtr<f32>,
    /// `[rows, RNG_STATE_WORDS]` random state per row ([`rng_state_for_seed`]); advanced by one
    /// step for every row that draws.
    pub rng_state: &'a mut dyn DevicePtrMut<u64>,
    /// `[rows]` drawn ids, or [`SAMPLE_ID_NON_FINITE`] / [`SAMPLE_ID_BAD_PARAMS`].
    pub out_ids: &'a mut dyn DevicePtrMut<u32>,
}

struct SampleBufs {
    logits: Buf,
    temperature: Buf,
    top_k: Buf,
    top_p: Buf,
    rng_state: Buf,
    out_ids: Buf,
}

fn plan_sample(s: &SampleShape, b: &SampleBufs) -> Result<Option<Launch<SampleParams>>, CudaError> {
    let c = Check { op: "sample" };
    let rows = c.count("rows", s.rows)?;
    let vocab = c.count("vocab", s.vocab)?;
    c.at_least("vocab", s.vocab, 1)?;
    c.len(
        "logits",
        b.logits,
        c.product("rows * vocab", &[s.rows, s.vocab])?,
    )?;
    c.len("temperature", b.temperature, s.rows)?;
    c.len("top_k", b.top_k, s.rows)?;
    c.len("top_p", b.top_p, s.rows)?;
    c.len(
        "rng_state",
        b.rng_state,
        c.product("rows * RNG_STATE_WORDS", &[s.rows, RNG_STATE_WORDS])?,
    )?;
    c.len("out_ids", b.out_ids, s.rows)?;
    if !b.rng_state.address.is_multiple_of(8) {
        return Err(CudaError::Misaligned {
            op: c.op,
            buffer: "rng_state",
            address: b.rng_state.address,
        });
    }
    let variant = c.variant(KernelFamily::Sample, "sample", &[])?;
    if s.rows == 0 {
        return Ok(None);
    }
    Ok(Some(Launch {
        variant,
        grid: (rows, 1, 1),
        block: SAMPLE_THREADS,
        shared_bytes: 0,
        params: SampleParams {
            logits: b.logits.address,
            temperature: b.temperature.address,
            top_k: b.top_k.address,
            top_p: b.top_p.address,
            rng_state: b.rng_state.address,
            out_ids: b.out_ids.address,
            rows,
            vocab,
        },
    }))
}

/// Draws one id per row: temperature, top-k (ties to the lower id), top-p, then a draw from the
/// softmax of what is left with the row's random stream, as the host sampler defines them (no
/// repetition penalty). For the same logits and seed the id equals the host's except when float
/// rounding puts the uniform exactly at a boundary (the device sums in parallel).
pub fn sample(
    kernels: &Kernels,
    stream: &CudaStream,
    shape: &SampleShape,
    b: SampleBuffers<'_>,
) -> Result<(), CudaError> {
    let (logits, _logits) = read(b.logits, stream);
    let (temperature, _temperature) = read(b.temperature, stream);
    let (top_k, _top_k) = read(b.top_k, stream);
    let (top_p, _top_p) = read(b.top_p, stream);
    let (rng_state, _rng_state) = write(b.rng_state, stream);
    let (out_ids, _out_ids) = write(b.out_ids, stream);
    let bufs = SampleBufs {
        logits,
        temperature,
        top_k,
        top_p,
        rng_state,
        out_ids,
    };
    match plan_sample(shape, &bufs)? {
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

    /// Buffers of exactly the sizes `s` needs.
    fn exact(s: &SampleShape) -> SampleBufs {
        SampleBufs {
            logits: buf(s.rows * s.vocab),
            temperature: buf(s.rows),
            top_k: buf(s.rows),
            top_p: buf(s.rows),
            rng_state: buf(s.rows * RNG_STATE_WORDS),
            out_ids: buf(s.rows),
        }
    }

    fn refused_as(result: Result<Option<Launch<SampleParams>>, CudaError>, name: &str) {
        match result {
            Err(CudaError::BufferTooSmall { buffer, .. }) => assert_eq!(buffer, name),
            Err(CudaError::Unsupported { what, .. }) => assert_eq!(what, name),
            Err(CudaError::Misaligned { buffer, .. }) => assert_eq!(buffer, name),
            other => panic!("expected a refusal naming {name}, got {other:?}"),
        }
    }

    #[test]
    fn one_block_per_row_on_the_sample_kernel() {
        let s = SampleShape {
            rows: 5,
            vocab: 32000,
        };
        let plan = plan_sample(&s, &exact(&s)).unwrap().unwrap();
        assert_eq!(KERNEL_VARIANTS[plan.variant].symbol, "sample");
        assert_eq!(plan.grid, (5, 1, 1));
        assert_eq!(plan.block, SAMPLE_THREADS);
        assert_eq!(plan.shared_bytes, 0);
        assert_eq!((plan.params.rows, plan.params.vocab), (5, 32000));
    }

    #[test]
    fn zero_rows_launch_nothing_and_empty_rows_are_refused() {
        let s = SampleShape { rows: 0, vocab: 7 };
        assert!(plan_sample(&s, &exact(&s)).unwrap().is_none());
        let s = SampleShape { rows: 2, vocab: 0 };
        refused_as(plan_sample(&s, &exact(&s)), "vocab");
    }

    #[test]
    fn too_many_elements_are_refused() {
        let s = SampleShape {
            rows: 1 << 16,
            vocab: 1 << 16,
        };
        refused_as(plan_sample(&s, &exact(&s)), "rows * vocab");
    }

    #[test]
    fn misaligned_rng_state_is_refused() {
        let s = SampleShape { rows: 2, vocab: 9 };
        let mut b = exact(&s);
        b.rng_state.address += 4;
        refused_as(plan_sample(&s, &b), "rng_state");
    }

    #[test]
    fn device_state_is_the_host_generators() {
        let state = rng_state_for_seed(1234);
        assert_eq!(state.len(), RNG_STATE_WORDS);
        assert_eq!(state, crate::sampling::Rng::new(1234).state().to_vec());
        assert_ne!(state, rng_state_for_seed(1235));
    }

    #[test]
    fn sentinels_are_not_token_ids() {
        assert_eq!(SAMPLE_ID_NON_FINITE, u32::MAX);
        assert_ne!(SAMPLE_ID_BAD_PARAMS, SAMPLE_ID_NON_FINITE);
        // Every vocab the planner accepts is below 2^31, far from both sentinels.
        let s = SampleShape {
            rows: 1,
            vocab: 1 << 31,
        };
        refused_as(plan_sample(&s, &exact(&s)), "vocab");
    }

    proptest! {
        /// Exactly the touched sizes pass; each buffer one element short is refused by name.
        #[test]
        fn needs_exactly_the_touched_sizes(rows in 1usize..64, vocab in 1usize..300_000) {
            let s = SampleShape { rows, vocab };
            let plan = plan_sample(&s, &exact(&s)).unwrap().unwrap();
            prop_assert_eq!(plan.grid, (rows as u32, 1, 1));
            let shorten = |f: fn(&mut SampleBufs)| {
                let mut b = exact(&s);
                f(&mut b);
                plan_sample(&s, &b)
            };
            refused_as(shorten(|b| b.logits.len -= 1), "logits");
            refused_as(shorten(|b| b.temperature.len -= 1), "temperature");
            refused_as(shorten(|b| b.top_k.len -= 1), "top_k");
            refused_as(shorten(|b| b.top_p.len -= 1), "top_p");
            refused_as(shorten(|b| b.rng_state.len -= 1), "rng_state");
            refused_as(shorten(|b| b.out_ids.len -= 1), "out_ids");
        }
    }
}
