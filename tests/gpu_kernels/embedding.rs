//! STUB: GPU test of the embedding op (being written).
