//! Seeded random Mixtral-family checkpoints written to a directory (config.json + safetensors), for
//! tests and benchmarks that need real files of a chosen shape.
//!
//! STUB: interface only; implementation pending.
