//! STUB: moe_grouped op (being written).
