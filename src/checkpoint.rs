//! Memory-mapped safetensors checkpoints: `model.safetensors`, or the shards named by
//! `model.safetensors.index.json`, validated and exposed as zero-copy [`TensorView`]s.
//!
//! STUB: interface only; implementation pending.

use crate::dtype::{DType, WeightSlice};
use std::path::{Path, PathBuf};

/// What was wrong with a checkpoint file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Placeholder.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
}

/// A read-only view of one tensor inside a memory-mapped shard.
#[derive(Debug, Clone)]
pub struct TensorView {}

impl TensorView {
    /// Tensor name as written in the header.
    pub fn name(&self) -> &str {
        todo!()
    }
    /// Storage type.
    pub fn dtype(&self) -> DType {
        todo!()
    }
    /// Shape, outermost first (weights are `[out, in]`).
    pub fn shape(&self) -> &[usize] {
        todo!()
    }
    /// The shard file holding it.
    pub fn path(&self) -> &Path {
        todo!()
    }
    /// The elements, borrowed from the mapping.
    pub fn data(&self) -> WeightSlice<'_> {
        todo!()
    }
}

/// Progress of a long load, reported to a callback.
#[derive(Debug, Clone, Copy)]
pub struct LoadProgress {
    /// Bytes processed so far.
    pub done_bytes: u64,
    /// Bytes in all.
    pub total_bytes: u64,
}

/// Every tensor of a model directory's safetensors files.
#[derive(Debug)]
pub struct Checkpoint {}

impl Checkpoint {
    /// Opens and validates `dir/model.safetensors` or the shards of `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        let _ = dir;
        todo!()
    }
    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorView> {
        let _ = name;
        todo!()
    }
    /// Names of every tensor, sorted.
    pub fn names(&self) -> Vec<&str> {
        todo!()
    }
    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> u64 {
        todo!()
    }
}
