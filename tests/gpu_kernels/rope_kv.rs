//! STUB: GPU test of the rope_kv op (being written).
