//! `sample` (csrc/sampling.cu): seeded top-k / top-p sampling on the device, per row of
//! `logits` (`[rows, vocab]` f32) the host [`Sampler`](crate::sampling::Sampler) without repetition
//! penalty, drawing with the same xoshiro256++ stream as the host [`Rng`] for the same seed. Every
//! per-row input (temperature, top-k, top-p, random state `[rows, RNG_STATE_WORDS]` u64) lives in
//! device memory, so a captured CUDA graph can replay the launch every token while the engine
//! updates those buffers.

use super::argmax::one_block_per_row;
use crate::cuda::args::{ArgmaxScalars, SampleArgs, SampleScalars};
use crate::cuda::checks::Check;
use crate::cuda::error::{CudaError, KernelError};
use crate::cuda::launch::{planned_launcher, Planned};
use crate::cuda::params::{
    KernelFamily, SampleParams, SAMPLE_BAD_PARAMS, SAMPLE_NON_FINITE, SAMPLE_RNG_WORDS,
    SAMPLE_THREADS,
};
use crate::sampling::Rng;

planned_launcher! {
    /// Draws one id per row: temperature, top-k (ties to the lower id), top-p, then a draw from the
    /// softmax of what is left with the row's random stream, as the host sampler defines them (no
    /// repetition penalty). For the same logits and seed the id equals the host's except when float
    /// rounding puts the uniform exactly at a boundary (the device sums in parallel). Zero rows launch
    /// nothing.
    sample(SampleScalars, SampleArgs) = plan; emulated sample_emulated
}

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

fn plan(s: &SampleScalars, a: &SampleArgs<'_>) -> Planned<SampleParams, 1> {
    let c = Check::new("sample");
    let params = a.params(c.op, s)?;
    // The kernel loads and stores the state as u64 words; a view cast from narrower elements could
    // start between two of them.
    if !params.rng_state.is_multiple_of(8) {
        return Err(CudaError::Kernel(KernelError::Misaligned {
            op: c.op,
            buffer: "rng_state",
            address: params.rng_state,
        }));
    }
    let rows = ArgmaxScalars {
        rows: s.rows,
        vocab: s.vocab,
    };
    one_block_per_row(&c, &rows, params, (KernelFamily::Sample, SAMPLE_THREADS))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::cuda::memory::ViewMut;
    use crate::cuda::ops::fake::{misaligned, too_small, unsupported, view, view_mut, BASE};

    /// Buffer lengths of exactly what `s` needs, in field order.
    fn exact(s: &SampleScalars) -> [usize; 6] {
        let rows = s.rows as usize;
        [
            rows * s.vocab as usize,
            rows,
            rows,
            rows,
            rows * RNG_STATE_WORDS,
            rows,
        ]
    }

    fn args(len: [usize; 6]) -> SampleArgs<'static> {
        SampleArgs {
            logits: view(len[0]),
            temperature: view(len[1]),
            top_k: view(len[2]),
            top_p: view(len[3]),
            rng_state: view_mut(len[4]),
            out_ids: view_mut(len[5]),
        }
    }

    #[test]
    fn one_block_per_row_on_the_sample_kernel() {
        let s = SampleScalars {
            rows: 5,
            vocab: 32000,
            fast: 1,
        };
        let (params, [grid]) = plan(&s, &args(exact(&s))).unwrap().unwrap();
        assert_eq!(grid.symbol(), "sample");
        assert_eq!(grid.grid, (5, 1, 1));
        assert_eq!(grid.block, SAMPLE_THREADS);
        assert_eq!(grid.shared_bytes, 0);
        assert_eq!((params.rows, params.vocab, params.fast), (5, 32000, 1));
    }

    #[test]
    fn zero_rows_launch_nothing_and_empty_rows_are_refused() {
        let s = SampleScalars {
            rows: 0,
            vocab: 7,
            fast: 1,
        };
        assert!(plan(&s, &args(exact(&s))).unwrap().is_none());
        let s = SampleScalars {
            rows: 2,
            vocab: 0,
            fast: 1,
        };
        unsupported(plan(&s, &args(exact(&s))), "vocab");
    }

    #[test]
    fn too_many_elements_are_refused() {
        let s = SampleScalars {
            rows: 1 << 16,
            vocab: 1 << 16,
            fast: 0,
        };
        unsupported(plan(&s, &args(exact(&s))), "rows * vocab");
    }

    #[test]
    fn misaligned_rng_state_is_refused() {
        let s = SampleScalars {
            rows: 2,
            vocab: 9,
            fast: 0,
        };
        let mut a = args(exact(&s));
        // SAFETY: never launched on; the planner reads only the address and length.
        a.rng_state = unsafe { ViewMut::from_raw(BASE + 4, 2 * RNG_STATE_WORDS) };
        misaligned(plan(&s, &a), "rng_state");
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
        let s = SampleScalars {
            rows: 1,
            vocab: 1 << 31,
            fast: 1,
        };
        unsupported(plan(&s, &args(exact(&s))), "vocab");
    }

    proptest! {
        /// Exactly the touched sizes pass; each buffer one element short is refused by name.
        #[test]
        fn needs_exactly_the_touched_sizes(rows in 1u32..64, vocab in 1u32..300_000) {
            let s = SampleScalars { rows, vocab, fast: 1 };
            let (_, [grid]) = plan(&s, &args(exact(&s))).unwrap().unwrap();
            prop_assert_eq!(grid.grid, (rows, 1, 1));
            let names = ["logits", "temperature", "top_k", "top_p", "rng_state", "out_ids"];
            for (i, name) in names.into_iter().enumerate() {
                let mut len = exact(&s);
                len[i] -= 1;
                too_small(plan(&s, &args(len)), name);
            }
        }
    }
}
