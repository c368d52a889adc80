//! STUB: GPU test of the rmsnorm op (being written).
