//! The batched step API that every backend (CPU reference, CUDA) implements.
//!
//! A step takes a batch of (sequence, new tokens, start position) and returns logits for the
//! positions asked for. Prefill is a step with many tokens of one sequence; decode is a step with one
//! token for each of many sequences. Sequences own blocks of the engine's paged KV cache from
//! [`Engine::new_sequence`] until [`Engine::free_sequence`].

use crate::config::ModelConfig;

/// Identifies one sequence (one KV-cache block table) inside an engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// Which positions of a [`SeqStep`] should produce logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// No logits (e.g. the first chunks of a long prefill).
    None,
    /// Only the last new token (generation).
    Last,
    /// Every new token (scoring, perplexity).
    All,
}

/// One sequence's part of a step.
#[derive(Debug, Clone, Copy)]
pub struct SeqStep<'a> {
    /// The sequence.
    pub seq: SeqId,
    /// New token ids, at positions `start_pos ..`; never empty.
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`. Must not exceed the sequence's cached length; a smaller value
    /// first truncates the cache to `start_pos` tokens (rewinding the sequence).
    pub start_pos: usize,
    /// Which positions produce logits.
    pub logits: LogitsFor,
}

/// Logits of a step: one row of `vocab` f32 values for each requested position, in batch order and
/// then position order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOutput {
    /// Vocabulary size (row length).
    pub vocab: usize,
    /// Row-major `[rows.len(), vocab]`.
    pub logits: Vec<f32>,
    /// For each row: (index into the step's batch, absolute position of the token).
    pub rows: Vec<(usize, usize)>,
}

impl StepOutput {
    /// Logits row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.logits[i * self.vocab..(i + 1) * self.vocab]
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when no logits were requested.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// Why a step or a sequence operation was refused. A refused step changes nothing: every sequence's
/// cache is as it was before the call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// A token id is not below the vocabulary size.
    #[error("token id {token} is out of range (vocab size {vocab})")]
    TokenOutOfRange {
        /// The offending id.
        token: u32,
        /// The model's vocabulary size.
        vocab: usize,
    },
    /// A step entry has no tokens.
    #[error("step for sequence {0:?} has no tokens")]
    EmptyStep(SeqId),
    /// The sequence would grow past the engine's context length.
    #[error(
        "context overflow for sequence {seq:?}: {needed} tokens needed, context is {max_context}"
    )]
    ContextOverflow {
        /// The sequence.
        seq: SeqId,
        /// Tokens the sequence would hold after the step.
        needed: usize,
        /// The engine's context length.
        max_context: usize,
    },
    /// `start_pos` is past the sequence's cached length.
    #[error("sequence {seq:?} holds {cached} tokens; cannot start at position {start_pos}")]
    BadStartPosition {
        /// The sequence.
        seq: SeqId,
        /// Tokens currently cached.
        cached: usize,
        /// The requested start.
        start_pos: usize,
    },
    /// The sequence id is unknown (never created, or already freed).
    #[error("unknown sequence {0:?}")]
    UnknownSequence(SeqId),
    /// The same sequence appears twice in one step.
    #[error("sequence {0:?} appears twice in one step")]
    DuplicateSequence(SeqId),
    /// Not enough free KV-cache blocks for the step; nothing was changed.
    #[error("KV cache full: {needed} blocks needed, {free} free")]
    KvCacheFull {
        /// Blocks the step needs.
        needed: usize,
        /// Blocks free.
        free: usize,
    },
    /// Too many sequences at once.
    #[error("too many sequences (limit {limit})")]
    TooManySequences {
        /// The engine's limit.
        limit: usize,
    },
    /// Engine options that cannot work (a zero size, a pool too large to count); the message
    /// names the option.
    #[error("invalid engine options: {0}")]
    InvalidOptions(String),
    /// A logits row holds NaN or infinity, so no token can be drawn from it (device sampling).
    #[error("logits row {row} of the step is not finite; no token was drawn")]
    NonFiniteLogits {
        /// Index of the row in the step's output order.
        row: usize,
    },
    /// A backend failure (device error, out of memory). The message names the operation.
    #[error("backend error: {0}")]
    Backend(String),
}

/// A model executor with a paged KV cache, driven one batched step at a time.
pub trait Engine: Send {
    /// The model's hyper-parameters.
    fn config(&self) -> &ModelConfig;

    /// The largest number of tokens a sequence may hold.
    fn max_context(&self) -> usize;

    /// Starts an empty sequence.
    fn new_sequence(&mut self) -> Result<SeqId, EngineError>;

    /// Frees a sequence and returns its KV blocks to the pool.
    fn free_sequence(&mut self, seq: SeqId) -> Result<(), EngineError>;

    /// Tokens currently cached for `seq`.
    fn sequence_len(&self, seq: SeqId) -> Result<usize, EngineError>;

    /// KV blocks currently free in the pool.
    fn free_kv_blocks(&self) -> usize;

    /// Total KV blocks in the pool.
    fn total_kv_blocks(&self) -> usize;

    /// Runs one batched forward step; see [`SeqStep`]. Either every entry is applied or none is.
    fn step(&mut self, batch: &[SeqStep<'_>]) -> Result<StepOutput, EngineError>;
}
