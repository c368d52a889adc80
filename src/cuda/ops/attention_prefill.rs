//! STUB: attention_prefill op (being written).
