//! STUB: GPU test of the attention_decode op (being written).
