//! [`SequenceState`]: everything one choice of a request carries between steps: its
//! [`Stream`] (sampler, incremental detokenizer sharing the tokenizer, stop strings and ids, token
//! limit, history), the request's bias, penalties and log-probability setting, the counts the
//! penalties read, and where its engine sequence stands.

use super::event::{GeneratedToken, TokenLogprob, Usage};
use super::logits::{adjust, logprobs};
use super::request::{Request, RequestId, ServeError};
use crate::engine::{RowSampler, SeqId};
use crate::generate::{FinishReason, GenerateError, Stream};
use crate::tokenizer::Tokenizer;
use std::collections::HashMap;
use std::sync::Arc;

/// The state of one choice of a request.
#[derive(Debug)]
pub struct SequenceState {
    request: RequestId,
    choice: usize,
    stream: Stream<Arc<Tokenizer>>,
    prompt_tokens: usize,
    logprobs: Option<usize>,
    logit_bias: Vec<(u32, f32)>,
    presence_penalty: f32,
    frequency_penalty: f32,
    /// How often this choice generated each id.
    counts: HashMap<u32, usize>,
    /// The engine sequence while the choice is running.
    pub(super) engine_seq: Option<SeqId>,
    /// Tokens of the history whose KV the engine holds.
    pub(super) computed: usize,
    /// Prompt tokens that came from the prefix cache at the first prefill.
    pub(super) cached_tokens: Option<usize>,
}

/// A [`GenerateError`] of a stream as a [`ServeError`].
fn serve_error(e: GenerateError) -> ServeError {
    match e {
        GenerateError::Tokenizer(t) => ServeError::Tokenizer(Arc::new(t)),
        GenerateError::Sampling(s) => ServeError::Sampling(s),
        GenerateError::Engine(e) => ServeError::Engine(e),
        GenerateError::EmptyPrompt => ServeError::EmptyPrompt,
        GenerateError::EmptyStopString { index } => ServeError::EmptyStopString { index },
        other => ServeError::Engine(crate::engine::EngineError::backend(other.to_string())),
    }
}

impl SequenceState {
    /// Choice `choice` of `request` (validated), before its first token: the sampler is seeded
    /// with `seed + choice`.
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        id: RequestId,
        request: &Request,
        choice: usize,
    ) -> Result<Self, ServeError> {
        let mut options = request.generate.clone();
        options.sampling.seed = options.sampling.seed.wrapping_add(choice as u64);
        let stream = Stream::new(tokenizer, &request.prompt, &options).map_err(serve_error)?;
        Ok(SequenceState {
            request: id,
            choice,
            stream,
            prompt_tokens: request.prompt.len(),
            logprobs: request.logprobs,
            logit_bias: request.logit_bias.clone(),
            presence_penalty: request.presence_penalty,
            frequency_penalty: request.frequency_penalty,
            counts: HashMap::new(),
            engine_seq: None,
            computed: 0,
            cached_tokens: None,
        })
    }

    /// The request this choice belongs to.
    pub fn request(&self) -> RequestId {
        self.request
    }

    /// The choice's index among the request's `n`.
    pub fn choice(&self) -> usize {
        self.choice
    }

    /// Prompt and generated ids so far.
    pub fn history(&self) -> &[u32] {
        self.stream.history()
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.history().len() - self.prompt_tokens
    }

    /// True when choosing the next token needs the logits row on the host.
    pub fn needs_logits(&self) -> bool {
        self.logprobs.is_some()
            || !self.logit_bias.is_empty()
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }

    /// How an engine's token step draws this choice's next id (its sampler after its history);
    /// only for a choice that does not [need the logits](SequenceState::needs_logits).
    pub fn row_sampler(&mut self) -> RowSampler<'_> {
        self.stream.row_sampler()
    }

    /// The history and the row sampler together, borrowed for one token step whose input ends
    /// at the history's end.
    pub fn step_parts(&mut self) -> (&[u32], RowSampler<'_>) {
        self.stream.decode_parts()
    }

    /// Chooses the next id from the raw logits row of the last history position: bias and
    /// penalties applied, then the sampler; log-probabilities from the raw row when asked for.
    pub fn choose(&mut self, row: &[f32]) -> Result<(u32, Option<TokenLogprob>), ServeError> {
        let adjusted;
        let input = if self.logit_bias.is_empty()
            && self.presence_penalty == 0.0
            && self.frequency_penalty == 0.0
        {
            row
        } else {
            adjusted = adjust(
                row,
                &self.logit_bias,
                self.presence_penalty,
                self.frequency_penalty,
                &self.counts,
            );
            &adjusted
        };
        let (sampler, history) = self.stream.sampler_parts();
        let id = sampler.sample(input, history)?;
        let lp = self.logprobs.map(|k| logprobs(row, id, k));
        Ok((id, lp))
    }

    /// Takes `id` as the next generated token: the token to stream and, when the choice ends with
    /// it, why.
    pub fn accept(
        &mut self,
        id: u32,
        logprob: Option<TokenLogprob>,
    ) -> Result<(GeneratedToken, Option<FinishReason>), ServeError> {
        let (event, finished) = self.stream.accept(id).map_err(serve_error)?;
        *self.counts.entry(id).or_default() += 1;
        let token = GeneratedToken {
            id,
            text: event.text,
            index: event.index,
            logprob,
        };
        Ok((token, finished))
    }

    /// The choice's token counts so far.
    pub fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.generated(),
            cached_tokens: self.cached_tokens.unwrap_or(0),
        }
    }
}
