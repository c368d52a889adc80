//! STUB: GPU test of the attention_prefill op (being written).
