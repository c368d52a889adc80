//! Generation on top of an [`Engine`]: a new sequence per prompt, prompts prefilled in one step,
//! then one decode step per token (batching every running sequence, [`generate_batch`]; one prompt,
//! [`generate`]); sampling ([`crate::sampling`]), stop conditions (EOS ids, stop strings, max new
//! tokens, cancellation by the callback) and streaming of final text to a callback. Also perplexity
//! scoring ([`perplexity`]). Logits rows are `[vocab]` f32.
//!
//! Generation runs token steps ([`Engine::step_tokens`]): the engine returns only each sequence's
//! chosen token (drawn on the device where the backend can), never the logits; perplexity is the
//! one reader of logits.
//!
//! Streamed text is the continuation of the prompt's text: the pieces are what
//! `decode(prompt ++ generated)` has beyond `decode(prompt)` (so the first token keeps its leading
//! space). Text that could still become a stop string is held back; a stop string is never emitted.

mod perplexity;
mod sequences;
mod stop;
mod stream;

pub use crate::engine::{Engine, EngineError, LogitsFor, RowSampler, SeqId, SeqStep};
use crate::sampling::{SamplingError, SamplingParams};
use crate::tokenizer::{Tokenizer, TokenizerError};
pub use perplexity::{perplexity, perplexity_chunked, Perplexity, PERPLEXITY_CHUNK};
use sequences::Sequences;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};
pub use stop::{Release, StopMatcher};
pub use stream::Stream;

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
    /// Bad sampling parameters, or a logits row that cannot be sampled (the host sampler's error
    /// from [`EngineError::Sampling`]; a device's non-finite row stays
    /// [`EngineError::NonFiniteLogits`]).
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    /// Detokenization failed (e.g. the model produced an id the tokenizer does not know).
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// Runs a `LogitsFor::Last` token step of `sequences` and checks its output: one id per batch
/// entry. A row the host sampler refused is reported as the sampler's error.
fn token_step(
    sequences: &mut Sequences<'_>,
    batch: &[SeqStep<'_>],
    samplers: &mut [RowSampler<'_>],
) -> Result<Vec<u32>, GenerateError> {
    let ids = sequences
        .step_tokens(batch, samplers)
        .map_err(|e| match e {
            EngineError::Sampling { source, .. } => GenerateError::Sampling(source),
            other => GenerateError::Engine(other),
        })?;
    if ids.len() != batch.len() {
        return Err(GenerateError::EngineOutput(format!(
            "asked for one token for each of {} sequences, got {}",
            batch.len(),
            ids.len()
        )));
    }
    Ok(ids)
}

/// Checks the request before any engine work.
fn check_request(
    engine: &dyn Engine,
    prompts: &[&[u32]],
    options: &GenerateOptions,
) -> Result<(), GenerateError> {
    if let Some(index) = options.stop_strings.iter().position(String::is_empty) {
        return Err(GenerateError::EmptyStopString { index });
    }
    options.sampling.validate()?;
    let max_context = engine.max_context();
    for prompt in prompts {
        if prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
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
    }
    Ok(())
}

/// Generates a continuation of `prompt` in a new sequence of `engine` (always freed before
/// returning, also on error), calling `on_token` once per generated token with the text that
/// became final. Returns at EOS, at `max_new_tokens`, at a stop string, or when `on_token` returns
/// `Break` (the token it was given is kept; the reason is [`FinishReason::Cancelled`] unless that
/// token ended generation anyway). The prompt is prefilled in one step, then each token takes one
/// decode step.
pub fn generate(
    engine: &mut dyn Engine,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    options: &GenerateOptions,
    mut on_token: impl FnMut(&TokenEvent) -> ControlFlow<()>,
) -> Result<GenerationOutput, GenerateError> {
    let mut outputs = generate_batch(engine, tokenizer, &[prompt], options, |_, event| {
        on_token(event)
    })?;
    outputs
        .pop()
        .ok_or_else(|| GenerateError::EngineOutput("no output for the one prompt".into()))
}

/// Generates continuations of several prompts together: one prefill step with every prompt, then
/// decode steps batching every sequence still running. Each sequence has its own sampler seeded
/// with `options.sampling.seed`, so output `i` is what [`generate`] gives for `prompts[i]` alone.
/// `on_token(i, event)` receives sequence `i`'s tokens; its `Break` cancels that sequence only.
/// A sequence's engine state is freed as soon as it finishes. Any error ends the whole batch
/// (every sequence freed). `prefill` is the time of the shared prefill step; `decode` the time of
/// the decode steps while the sequence ran.
pub fn generate_batch(
    engine: &mut dyn Engine,
    tokenizer: &Tokenizer,
    prompts: &[&[u32]],
    options: &GenerateOptions,
    mut on_token: impl FnMut(usize, &TokenEvent) -> ControlFlow<()>,
) -> Result<Vec<GenerationOutput>, GenerateError> {
    check_request(engine, prompts, options)?;
    let mut streams = prompts
        .iter()
        .map(|prompt| Stream::new(tokenizer, prompt, options))
        .collect::<Result<Vec<_>, _>>()?;
    if options.max_new_tokens == 0 || prompts.is_empty() {
        return Ok(streams.into_iter().map(|s| s.output).collect());
    }
    let mut sequences = Sequences::new(engine, prompts.len())?;

    let started = Instant::now();
    let mut batch = Vec::with_capacity(prompts.len());
    for (i, prompt) in prompts.iter().enumerate() {
        batch.push(SeqStep {
            seq: live(&sequences, i)?,
            tokens: prompt,
            start_pos: 0,
            logits: LogitsFor::Last,
        });
    }
    let mut samplers: Vec<RowSampler<'_>> = streams.iter_mut().map(Stream::row_sampler).collect();
    // `next[i]`: sequence `i`'s token to accept (set for the running ones after each step).
    let mut next = token_step(&mut sequences, &batch, &mut samplers)?;
    let prefill = started.elapsed();
    for stream in &mut streams {
        stream.output.prefill = prefill;
    }

    let mut active: Vec<usize> = (0..prompts.len()).collect();
    loop {
        let mut running = Vec::with_capacity(active.len());
        for &i in &active {
            let stream = streams.get_mut(i).ok_or_else(|| lost(i))?;
            let id = next.get(i).copied().ok_or_else(|| lost(i))?;
            let (event, finished) = stream.accept(id)?;
            let flow = on_token(i, &event);
            if finished.is_none() && flow.is_break() {
                stream.output.finish_reason = FinishReason::Cancelled;
            }
            if finished.is_none() && flow.is_continue() {
                running.push(i);
            } else {
                sequences.free(i)?;
            }
        }
        active = running;
        if active.is_empty() {
            break;
        }

        let started = Instant::now();
        let mut batch = Vec::with_capacity(active.len());
        let mut samplers = Vec::with_capacity(active.len());
        // `active` is ascending, so walking the streams in order visits each active one once.
        let running = streams
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| active.binary_search(i).is_ok());
        for (i, stream) in running {
            let (history, sampler) = stream.decode_parts();
            let position = history.len() - 1;
            batch.push(SeqStep {
                seq: live(&sequences, i)?,
                tokens: history.get(position..).unwrap_or_default(),
                start_pos: position,
                logits: LogitsFor::Last,
            });
            samplers.push(sampler);
        }
        if batch.len() != active.len() {
            return Err(GenerateError::EngineOutput(format!(
                "{} of {} running sequences found",
                batch.len(),
                active.len()
            )));
        }
        let ids = token_step(&mut sequences, &batch, &mut samplers)?;
        for (&i, id) in active.iter().zip(ids) {
            if let Some(slot) = next.get_mut(i) {
                *slot = id;
            }
        }
        let elapsed = started.elapsed();
        for &i in &active {
            if let Some(stream) = streams.get_mut(i) {
                stream.output.decode += elapsed;
                stream.output.decode_steps += 1;
            }
        }
    }
    sequences.free_all()?;
    Ok(streams.into_iter().map(|s| s.output).collect())
}

/// The engine sequence of batch entry `i`, which must still be live.
fn live(sequences: &Sequences<'_>, i: usize) -> Result<SeqId, GenerateError> {
    sequences.id(i).ok_or_else(|| lost(i))
}

/// An internal bookkeeping failure for batch entry `i` (never expected).
fn lost(i: usize) -> GenerateError {
    GenerateError::EngineOutput(format!("batch entry {i} has no live sequence"))
}
