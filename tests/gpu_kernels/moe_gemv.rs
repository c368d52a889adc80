//! STUB: GPU test of the moe_gemv op (being written).
