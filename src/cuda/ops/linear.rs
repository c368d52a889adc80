//! STUB: linear op (being written).
