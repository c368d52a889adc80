//! STUB: GPU test of the linear op (being written).
