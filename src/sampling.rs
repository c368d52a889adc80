//! Token selection from a row of logits: greedy, temperature, top-k, top-p, repetition penalty, with a
//! seeded RNG; and log-softmax for scoring.
//!
//! STUB: interface only; implementation pending.
