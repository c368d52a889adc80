//! STUB: GPU test of the router op (being written).
