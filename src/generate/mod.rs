//! Generation on top of an [`Engine`]: one sequence per call, the prompt prefilled in one step, then
//! one decode step per token; sampling ([`crate::sampling`]), stop conditions (EOS ids, stop strings,
//! max new tokens, cancellation by the callback) and streaming of final text to a callback. Also
//! perplexity scoring ([`perplexity`]).
//!
//! Streamed text is the continuation of the prompt's text: the pieces are what
//! `decode(prompt ++ generated)` has beyond `decode(prompt)` (so the first token keeps its leading
//! space). Text that could still become a stop string is held back; a stop string is never emitted.

mod perplexity;
mod stop;

pub use perplexity::{perplexity, perplexity_chunked, Perplexity, PERPLEXITY_CHUNK};

use crate::engine::{Engine, EngineError, LogitsFor, SeqId, SeqStep, StepOutput};
use crate::sampling::{Sampler, SamplingError, SamplingParams};
use crate::tokenizer::{Tokenizer, TokenizerError};
use std::ops::ControlFlow;
use std::time::{Duration, Instant};
use stop::{Release, StopMatcher};

/// What to generate and when to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Most tokens to generate (an EOS id counts). `0` returns at once without running the engine.
    pub max_new_tokens: usize,
    /// How each token is chosen.
    pub sampling: SamplingParams,
    /// Generating any of these ids ends the output (the id is kept in `generated_ids`).
    pub eos_token_ids: Vec<u32>,
    /// Text that ends the output when it appears in the generated text (excluded from it). Each
    /// must be non-empty.
    pub stop_strings: Vec<String>,
}

impl GenerateOptions {
    /// Greedy decoding of up to `max_new_tokens` tokens, no EOS ids, no stop strings.
    pub fn greedy(max_new_tokens: usize) -> Self {
        GenerateOptions {
            max_new_tokens,
            sampling: SamplingParams::greedy(),
            eos_token_ids: Vec::new(),
            stop_strings: Vec::new(),
        }
    }

    /// Adds EOS ids (duplicates are ignored).
    pub fn with_eos(mut self, ids: &[u32]) -> Self {
        for &id in ids {
            if !self.eos_token_ids.contains(&id) {
                self.eos_token_ids.push(id);
            }
        }
        self
    }

    /// Adds a stop string.
    pub fn with_stop(mut self, stop: impl Into<String>) -> Self {
        self.stop_strings.push(stop.into());
        self
    }

    /// Replaces the sampling parameters.
    pub fn with_sampling(mut self, sampling: SamplingParams) -> Self {
        self.sampling = sampling;
        self
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` were generated.
    Length,
    /// An EOS id was generated.
    Eos,
    /// A stop string appeared.
    Stop,
    /// The callback returned `Break`.
    Cancelled,
}

impl FinishReason {
    /// Lower-case name: `length`, `eos`, `stop` or `cancelled`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for FinishReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One generated token, as passed to the callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEvent {
    /// The token id.
    pub id: u32,
    /// Text that became final with this token (possibly empty; held-back text comes later).
    pub text: String,
    /// Index of the token among the generated ones (0-based).
    pub index: usize,
}

/// The result of [`generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationOutput {
    /// The prompt.
    pub prompt_ids: Vec<u32>,
    /// Every generated id, including a final EOS id if one was generated.
    pub generated_ids: Vec<u32>,
    /// The generated text: exactly the concatenation of the events' texts (no EOS, no stop
    /// string, nothing after a cancellation).
    pub text: String,
    /// Why generation ended.
    pub finish_reason: FinishReason,
    /// Time of the prefill step and the first token's sampling.
    pub prefill: Duration,
    /// Time of all decode steps and their sampling.
    pub decode: Duration,
    /// Decode steps run (tokens generated after the first).
    pub decode_steps: usize,
}

/// Why generation or scoring failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The prompt has no tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The prompt and the tokens to generate do not fit the engine's context.
    #[error(
        "prompt of {prompt_tokens} tokens plus {new_tokens} new tokens exceeds the context of {max_context} tokens"
    )]
    ContextOverflow {
        /// Tokens in the prompt (or the text to score).
        prompt_tokens: usize,
        /// Tokens asked for.
        new_tokens: usize,
        /// The engine's context length.
        max_context: usize,
    },
    /// A stop string is empty.
    #[error("stop string {index} is empty")]
    EmptyStopString {
        /// Its index in `stop_strings`.
        index: usize,
    },
    /// Scoring needs at least two tokens (one to condition on, one to score).
    #[error("perplexity needs at least 2 tokens, got {len}")]
    TooFewTokens {
        /// Tokens given.
        len: usize,
    },
    /// The engine produced a non-finite logit while scoring.
    #[error("non-finite logit for token {index} at position {position}")]
    NonFiniteLogits {
        /// Position whose logits row it is.
        position: usize,
        /// The token id.
        index: usize,
    },
    /// The engine's output does not have the rows or row length asked for.
    #[error("engine output: {0}")]
    EngineOutput(String),
    /// The engine refused a step or a sequence operation.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Bad sampling parameters, or a logits row that cannot be sampled.
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    /// Detokenization failed (e.g. the model produced an id the tokenizer does not know).
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// A sequence of an engine that is freed when dropped (also on error or panic).
pub(crate) struct SequenceGuard<'e> {
    /// The engine.
    pub(crate) engine: &'e mut dyn Engine,
    /// The sequence.
    pub(crate) seq: SeqId,
}

impl<'e> SequenceGuard<'e> {
    /// Starts a new sequence in `engine`.
    pub(crate) fn new(engine: &'e mut dyn Engine) -> Result<Self, EngineError> {
        let seq = engine.new_sequence()?;
        Ok(SequenceGuard { engine, seq })
    }

    /// Runs one step of this sequence: `tokens` at `start_pos`.
    pub(crate) fn step(
        &mut self,
        tokens: &[u32],
        start_pos: usize,
        logits: LogitsFor,
    ) -> Result<StepOutput, EngineError> {
        self.engine.step(&[SeqStep {
            seq: self.seq,
            tokens,
            start_pos,
            logits,
        }])
    }

    /// Frees the sequence, reporting the engine's answer.
    pub(crate) fn free(self) -> Result<(), EngineError> {
        let mut this = std::mem::ManuallyDrop::new(self);
        let seq = this.seq;
        this.engine.free_sequence(seq)
    }
}

impl Drop for SequenceGuard<'_> {
    fn drop(&mut self) {
        // Only reached on an early return or a panic; the original error is what gets reported.
        let _ = self.engine.free_sequence(self.seq);
    }
}

/// The single logits row of a `LogitsFor::Last` step, checked for shape.
fn last_row(out: &StepOutput, position: usize) -> Result<&[f32], GenerateError> {
    if out.rows != [(0, position)] {
        return Err(GenerateError::EngineOutput(format!(
            "expected one row for position {position}, got rows {:?}",
            out.rows
        )));
    }
    out.logits
        .get(..out.vocab)
        .filter(|row| !row.is_empty() && out.logits.len() == out.vocab)
        .ok_or_else(|| {
            GenerateError::EngineOutput(format!(
                "{} logits for one row of vocab {}",
                out.logits.len(),
                out.vocab
            ))
        })
}

/// Generates a continuation of `prompt` in a new sequence of `engine` (always freed before
/// returning), calling `on_token` once per generated token with the text that became final. Returns
/// at EOS, at `max_new_tokens`, at a stop string, or when `on_token` returns `Break` (the token it
/// was given is kept; its reason is [`FinishReason::Cancelled`] unless that token ended generation
/// anyway).
pub fn generate(
    engine: &mut dyn Engine,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    options: &GenerateOptions,
    mut on_token: impl FnMut(&TokenEvent) -> ControlFlow<()>,
) -> Result<GenerationOutput, GenerateError> {
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    if let Some(index) = options.stop_strings.iter().position(String::is_empty) {
        return Err(GenerateError::EmptyStopString { index });
    }
    let mut sampler = Sampler::new(options.sampling)?;
    let max_context = engine.max_context();
    let fits = prompt
        .len()
        .checked_add(options.max_new_tokens)
        .is_some_and(|needed| needed <= max_context);
    if !fits {
        return Err(GenerateError::ContextOverflow {
            prompt_tokens: prompt.len(),
            new_tokens: options.max_new_tokens,
            max_context,
        });
    }
    let mut output = GenerationOutput {
        prompt_ids: prompt.to_vec(),
        generated_ids: Vec::new(),
        text: String::new(),
        finish_reason: FinishReason::Length,
        prefill: Duration::ZERO,
        decode: Duration::ZERO,
        decode_steps: 0,
    };
    if options.max_new_tokens == 0 {
        return Ok(output);
    }
    let mut detokenizer = tokenizer.detokenizer_after(prompt)?;
    let mut stops = StopMatcher::new(&options.stop_strings);
    // The whole sequence so far: the repetition penalty's history.
    let mut history = prompt.to_vec();
    let mut sequence = SequenceGuard::new(engine)?;

    let started = Instant::now();
    let out = sequence.step(prompt, 0, LogitsFor::Last)?;
    let mut next = sampler.sample(last_row(&out, prompt.len() - 1)?, &history)?;
    output.prefill = started.elapsed();

    loop {
        let index = output.generated_ids.len();
        output.generated_ids.push(next);
        history.push(next);
        let is_eos = options.eos_token_ids.contains(&next);
        let last = is_eos || output.generated_ids.len() >= options.max_new_tokens;
        let mut piece = if is_eos {
            String::new()
        } else {
            detokenizer.push(next)?
        };
        if last {
            piece.push_str(&detokenizer.finish()?);
        }
        let (text, finished) = match stops.push(&piece, last) {
            Release::Stop(text) => (text, Some(FinishReason::Stop)),
            Release::Text(text) if is_eos => (text, Some(FinishReason::Eos)),
            Release::Text(text) if last => (text, Some(FinishReason::Length)),
            Release::Text(text) => (text, None),
        };
        output.text.push_str(&text);
        let event = TokenEvent {
            id: next,
            text,
            index,
        };
        let flow = on_token(&event);
        if let Some(reason) = finished {
            output.finish_reason = reason;
            break;
        }
        if flow.is_break() {
            output.finish_reason = FinishReason::Cancelled;
            break;
        }

        let started = Instant::now();
        let position = history.len() - 1;
        let out = sequence.step(&[next], position, LogitsFor::Last)?;
        next = sampler.sample(last_row(&out, position)?, &history)?;
        output.decode += started.elapsed();
        output.decode_steps += 1;
    }
    sequence.free()?;
    Ok(output)
}
