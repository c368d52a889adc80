//! STUB: sample op (being written).
