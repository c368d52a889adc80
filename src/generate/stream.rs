//! One generated sequence's state: its sampler, detokenizer, stop-string matcher, history and
//! output. Turns each sampled id into a [`TokenEvent`] and decides whether the sequence is done.
//! `T` holds the tokenizer: `&Tokenizer` (one call of [`super::generate_batch`]) or
//! `Arc<Tokenizer>` (a server's request, [`crate::serve`]).

use super::stop::{Release, StopMatcher};
use super::{FinishReason, GenerateError, GenerateOptions, GenerationOutput, TokenEvent};
use crate::engine::RowSampler;
use crate::sampling::Sampler;
use crate::tokenizer::{Detokenizer, Tokenizer};
use std::ops::Deref;
use std::time::Duration;

/// The state of one sequence being generated: sampler, detokenizer, stop strings, EOS ids, token
/// limit, history and output so far.
pub struct Stream<T: Deref<Target = Tokenizer>> {
    sampler: Sampler,
    detokenizer: Detokenizer<T>,
    stops: StopMatcher,
    /// Prompt and generated ids: the repetition penalty's history and the engine's sequence.
    history: Vec<u32>,
    eos: Vec<u32>,
    max_new_tokens: usize,
    /// The result so far.
    pub output: GenerationOutput,
}

impl<T: Deref<Target = Tokenizer>> std::fmt::Debug for Stream<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("sampler", &self.sampler)
            .field("history", &self.history.len())
            .field("output", &self.output)
            .finish_non_exhaustive()
    }
}

impl<T: Deref<Target = Tokenizer>> Stream<T> {
    /// The state before the first token of a continuation of `prompt` (sampling parameters are
    /// validated; the prompt's ids must be known to the tokenizer).
    pub fn new(
        tokenizer: T,
        prompt: &[u32],
        options: &GenerateOptions,
    ) -> Result<Self, GenerateError> {
        Ok(Stream {
            sampler: Sampler::new(options.sampling)?,
            detokenizer: Detokenizer::after(tokenizer, prompt)?,
            stops: StopMatcher::new(&options.stop_strings),
            history: prompt.to_vec(),
            eos: options.eos_token_ids.clone(),
            max_new_tokens: options.max_new_tokens,
            output: GenerationOutput {
                prompt_ids: prompt.to_vec(),
                generated_ids: Vec::new(),
                text: String::new(),
                finish_reason: FinishReason::Length,
                prefill: Duration::ZERO,
                decode: Duration::ZERO,
                decode_steps: 0,
            },
        })
    }

    /// How the engine chooses the next id: this sequence's sampler after its history.
    pub fn row_sampler(&mut self) -> RowSampler<'_> {
        RowSampler::new(&mut self.sampler, &self.history)
    }

    /// The sequence so far and how the engine chooses the next id, borrowed together for one
    /// decode step (its input is the history's last token).
    pub fn decode_parts(&mut self) -> (&[u32], RowSampler<'_>) {
        (
            &self.history,
            RowSampler::new(&mut self.sampler, &self.history),
        )
    }

    /// The sequence so far: prompt and generated ids.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// The sampler and the history together (to draw the next id on the host).
    pub fn sampler_parts(&mut self) -> (&mut Sampler, &[u32]) {
        (&mut self.sampler, &self.history)
    }

    /// Takes `id` as the next generated token: the event for the callback, and the reason if the
    /// sequence ends with it.
    pub fn accept(&mut self, id: u32) -> Result<(TokenEvent, Option<FinishReason>), GenerateError> {
        let index = self.output.generated_ids.len();
        self.output.generated_ids.push(id);
        self.history.push(id);
        let is_eos = self.eos.contains(&id);
        let last = is_eos || self.output.generated_ids.len() >= self.max_new_tokens;
        let mut piece = if is_eos {
            String::new()
        } else {
            self.detokenizer.push(id)?
        };
        if last {
            piece.push_str(&self.detokenizer.finish()?);
        }
        let (text, finished) = match self.stops.push(&piece, last) {
            Release::Stop(text) => (text, Some(FinishReason::Stop)),
            Release::Text(text) if is_eos => (text, Some(FinishReason::Eos)),
            Release::Text(text) if last => (text, Some(FinishReason::Length)),
            Release::Text(text) => (text, None),
        };
        self.output.text.push_str(&text);
        if let Some(reason) = finished {
            self.output.finish_reason = reason;
        }
        Ok((TokenEvent { id, text, index }, finished))
    }
}
