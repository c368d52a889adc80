//! STUB: GPU test of the moe_grouped op (being written).
