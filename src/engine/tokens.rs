//! The token step's pieces shared by every backend: [`RowSampler`] (how one logits row's token is
//! chosen), the row count a step produces, and [`sample_on_host`], the host implementation of
//! [`Engine::step_tokens`]: one [`Engine::step`], then each row drawn by its [`Sampler`], exactly as
//! [`Sampler::sample`] defines it.

use super::{Engine, EngineError, LogitsFor, SeqStep};
use crate::sampling::Sampler;

/// How the token of one logits row of [`Engine::step_tokens`] is chosen: a sampler (greedy =
/// argmax) and the sequence's tokens up to and including the row's position, read only by the
/// repetition penalty (may be empty when the penalty is off).
#[derive(Debug)]
pub struct RowSampler<'a> {
    /// The sampler; its random stream advances by the draw.
    pub sampler: &'a mut Sampler,
    /// The sequence so far: prompt and generated tokens, the token at the row's position last.
    pub history: &'a [u32],
}

impl<'a> RowSampler<'a> {
    /// A row drawn by `sampler` after `history`.
    pub fn new(sampler: &'a mut Sampler, history: &'a [u32]) -> Self {
        RowSampler { sampler, history }
    }

    /// True when the row's token can be chosen from the logits alone, without the history: no
    /// repetition penalty.
    pub fn ignores_history(&self) -> bool {
        self.sampler.params().repetition_penalty == 1.0
    }
}

/// Logits rows `batch` produces: one per `Last` entry, one per token of an `All` entry.
pub fn logits_rows(batch: &[SeqStep<'_>]) -> usize {
    batch
        .iter()
        .map(|s| match s.logits {
            LogitsFor::None => 0,
            LogitsFor::Last => 1,
            LogitsFor::All => s.tokens.len(),
        })
        .sum()
}

/// Refuses a sampler count other than the rows `batch` produces, before anything changes.
pub fn check_sampler_count(batch: &[SeqStep<'_>], samplers: usize) -> Result<(), EngineError> {
    let rows = logits_rows(batch);
    if samplers == rows {
        Ok(())
    } else {
        Err(EngineError::SamplerCount { samplers, rows })
    }
}

/// [`Engine::step_tokens`] on the host: checks the sampler count, runs [`Engine::step`], then
/// draws row `i` with `samplers[i]` ([`Sampler::sample`] over the row and the history). A row
/// the sampler refuses (a non-finite logit) is [`EngineError::Sampling`]; the step itself was
/// applied. The default of every engine, and the CUDA engine's path for samplers the device
/// cannot apply.
pub fn sample_on_host<E: Engine + ?Sized>(
    engine: &mut E,
    batch: &[SeqStep<'_>],
    samplers: &mut [RowSampler<'_>],
) -> Result<Vec<u32>, EngineError> {
    check_sampler_count(batch, samplers.len())?;
    let out = engine.step(batch)?;
    if out.len() != samplers.len() || out.logits.len() != out.len() * out.vocab {
        return Err(EngineError::backend(format!(
            "a step producing {} logits rows returned {} rows and {} logits of vocab {}",
            samplers.len(),
            out.len(),
            out.logits.len(),
            out.vocab
        )));
    }
    samplers
        .iter_mut()
        .enumerate()
        .map(|(row, s)| {
            s.sampler
                .sample(out.row(row), s.history)
                .map_err(|source| EngineError::Sampling { row, source })
        })
        .collect()
}
