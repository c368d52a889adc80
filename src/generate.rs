//! Generation on top of an [`Engine`](crate::engine::Engine): prefill, sampling, stop conditions (EOS
//! ids, stop strings, max new tokens), streaming to a callback; and perplexity scoring.
//!
//! STUB: interface only; implementation pending.
