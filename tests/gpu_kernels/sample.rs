//! STUB: GPU test of the sample op (being written).
