//! [`EngineError`]: why an engine refused a step or a sequence operation, one type for every
//! backend. A backend failure keeps the backend's typed error ([`BackendSource`]) and says whether
//! the engine is dead ([`EngineError::is_dead`]), so a caller never parses text.

use std::error::Error;
use std::fmt;
use std::sync::Arc;

use super::SeqId;
use crate::sampling::SamplingError;

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
    #[error("KV cache full at sequence {seq:?}: {needed} blocks needed, {free} free")]
    KvCacheFull {
        /// The first entry of the step (in batch order) at which the blocks needed so far exceed
        /// the free ones: it and the entries after it did not fit.
        seq: SeqId,
        /// Blocks the step's entries up to and including `seq` need.
        needed: usize,
        /// Blocks free.
        free: usize,
    },
    /// A step would rewind a sequence to where it needs blocks that the sliding window already
    /// released.
    #[error(
        "sequence {seq:?} cannot start at position {start_pos}: blocks before position {first_kept} were released by the sliding window"
    )]
    WindowReleased {
        /// The sequence.
        seq: SeqId,
        /// The requested start.
        start_pos: usize,
        /// The first position still held.
        first_kept: usize,
    },
    /// An operation that needs an empty sequence (reusing a cached prefix) got one holding tokens.
    #[error("sequence {seq:?} already holds {len} tokens")]
    SequenceNotEmpty {
        /// The sequence.
        seq: SeqId,
        /// Tokens it holds.
        len: usize,
    },
    /// The backend does not implement the operation (named).
    #[error("not supported by this engine: {0}")]
    Unsupported(&'static str),
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
    /// A token step was given a different number of samplers than the logits rows it produces;
    /// refused before anything changed.
    #[error("{samplers} samplers for a step producing {rows} logits rows")]
    SamplerCount {
        /// Samplers given.
        samplers: usize,
        /// Logits rows the step produces.
        rows: usize,
    },
    /// The host sampler refused logits row `row` of a token step (a non-finite logit, a history
    /// token outside the vocabulary); the step itself was applied.
    #[error("sampling logits row {row} of the step: {source}")]
    Sampling {
        /// Index of the row in the step's output order.
        row: usize,
        /// The sampler's error (it names the logit or token).
        #[source]
        source: SamplingError,
    },
    /// A backend failure (device error, out of memory, output of the wrong shape), with the
    /// backend's own typed error as its source. `dead` says whether the engine now refuses all
    /// further work (a sticky device fault): see [`EngineError::is_dead`].
    #[error("backend error{}: {source}", if *dead { " (the engine is dead)" } else { "" })]
    Backend {
        /// The backend's error (for the CUDA engine a `CudaError`; reach it with
        /// [`BackendSource::downcast_ref`]).
        #[source]
        source: BackendSource,
        /// True when the engine refuses all further work.
        dead: bool,
    },
}

impl EngineError {
    /// A backend failure after which the engine still works.
    pub fn backend(source: impl Into<Box<dyn Error + Send + Sync>>) -> Self {
        EngineError::Backend {
            source: BackendSource::new(source),
            dead: false,
        }
    }

    /// A backend failure after which the engine refuses all further work.
    pub fn dead(source: impl Into<Box<dyn Error + Send + Sync>>) -> Self {
        EngineError::Backend {
            source: BackendSource::new(source),
            dead: true,
        }
    }

    /// True when the engine that returned this error refuses all further work (a sticky device
    /// fault): a server should drop it and open a new one. Every other error leaves the engine
    /// usable.
    pub fn is_dead(&self) -> bool {
        matches!(self, EngineError::Backend { dead: true, .. })
    }
}

/// The typed error a backend failed with, shared (so [`EngineError`] stays `Clone`). Displays as
/// the error itself and passes on its source. Two are equal when they hold the same error (clones
/// of one failure).
#[derive(Debug, Clone)]
pub struct BackendSource(Arc<dyn Error + Send + Sync>);

impl BackendSource {
    /// Wraps a backend's error (or a message: `&str` and `String` convert).
    pub fn new(source: impl Into<Box<dyn Error + Send + Sync>>) -> Self {
        BackendSource(Arc::from(source.into()))
    }

    /// The backend's error.
    pub fn get(&self) -> &(dyn Error + Send + Sync + 'static) {
        &*self.0
    }

    /// The backend's error as a `T`, when it is one (e.g. `mixtral::cuda::CudaError`).
    pub fn downcast_ref<T: Error + 'static>(&self) -> Option<&T> {
        self.0.downcast_ref::<T>()
    }
}

impl fmt::Display for BackendSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Error for BackendSource {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for BackendSource {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.0), Arc::as_ptr(&other.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_dead_backend_error_is_dead() {
        assert!(EngineError::dead("sticky fault").is_dead());
        assert!(!EngineError::backend("transient").is_dead());
        assert!(!EngineError::UnknownSequence(SeqId(3)).is_dead());
        assert!(!EngineError::NonFiniteLogits { row: 0 }.is_dead());
    }

    #[test]
    fn the_typed_source_survives_clone_and_downcast() {
        #[derive(Debug, thiserror::Error, PartialEq)]
        #[error("device {0} fell over")]
        struct DeviceFault(u32);

        let error = EngineError::dead(DeviceFault(7));
        let copy = error.clone();
        assert_eq!(copy, error, "a clone holds the same source");
        assert_ne!(EngineError::dead(DeviceFault(7)), error, "another failure");
        let EngineError::Backend { source, dead } = &copy else {
            panic!("{copy:?}");
        };
        assert!(*dead);
        assert_eq!(source.downcast_ref::<DeviceFault>(), Some(&DeviceFault(7)));
        assert!(source.downcast_ref::<std::io::Error>().is_none());
        assert_eq!(
            error.to_string(),
            "backend error (the engine is dead): device 7 fell over"
        );
        let chained = error.source().map(ToString::to_string);
        assert_eq!(chained.as_deref(), Some("device 7 fell over"));
    }
}
