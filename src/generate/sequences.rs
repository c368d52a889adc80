//! Engine sequences owned by one call: created together, freed one by one as they finish, and all
//! freed when dropped (on an early return with an error, or a panic in a callback).

use crate::engine::{Engine, EngineError, RowSampler, SeqId, SeqStep, StepOutput};

/// Sequences of `engine` that this value frees.
pub(crate) struct Sequences<'e> {
    engine: &'e mut dyn Engine,
    /// `None` once freed.
    live: Vec<Option<SeqId>>,
}

impl<'e> Sequences<'e> {
    /// Starts `count` new sequences; on failure, those already started are freed.
    pub(crate) fn new(engine: &'e mut dyn Engine, count: usize) -> Result<Self, EngineError> {
        let mut this = Sequences {
            engine,
            live: Vec::with_capacity(count),
        };
        for _ in 0..count {
            let seq = this.engine.new_sequence()?;
            this.live.push(Some(seq));
        }
        Ok(this)
    }

    /// The id of sequence `i`, unless it was freed.
    pub(crate) fn id(&self, i: usize) -> Option<SeqId> {
        self.live.get(i).copied().flatten()
    }

    /// Runs one engine step, reading the logits back.
    pub(crate) fn step(&mut self, batch: &[SeqStep<'_>]) -> Result<StepOutput, EngineError> {
        self.engine.step(batch)
    }

    /// Runs one engine step that returns only the chosen tokens (see [`Engine::step_tokens`]).
    pub(crate) fn step_tokens(
        &mut self,
        batch: &[SeqStep<'_>],
        samplers: &mut [RowSampler<'_>],
    ) -> Result<Vec<u32>, EngineError> {
        self.engine.step_tokens(batch, samplers)
    }

    /// Frees sequence `i` now (nothing when already freed).
    pub(crate) fn free(&mut self, i: usize) -> Result<(), EngineError> {
        match self.live.get_mut(i).and_then(Option::take) {
            Some(seq) => self.engine.free_sequence(seq),
            None => Ok(()),
        }
    }

    /// Frees every sequence still live, reporting the first refusal (after trying them all).
    pub(crate) fn free_all(mut self) -> Result<(), EngineError> {
        let mut first = Ok(());
        for i in 0..self.live.len() {
            let freed = self.free(i);
            if first.is_ok() {
                first = freed;
            }
        }
        first
    }
}

impl Drop for Sequences<'_> {
    fn drop(&mut self) {
        for seq in self.live.iter_mut().filter_map(Option::take) {
            // Reached only on an early return or a panic; the original error is what gets reported.
            let _ = self.engine.free_sequence(seq);
        }
    }
}
