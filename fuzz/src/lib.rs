//! Shared pieces of the fuzz targets: a scratch directory per process (the parsers under test read
//! files, so each input is written to disk first), the small model the `weights` target checks, and
//! a walk over every tensor of an opened checkpoint.

pub mod request;

use mixtral::checkpoint::Checkpoint;
use mixtral::dtype::DType;
use mixtral::random_model::RandomModelSpec;
use std::path::{Path, PathBuf};

/// A fresh, empty directory `mixtral-fuzz-<name>-<pid>` under the system temp directory.
///
/// # Panics
/// When the directory cannot be created (a broken environment, not a finding).
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mixtral-fuzz-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the scratch directory");
    dir
}

/// Writes `bytes` to `path`.
///
/// # Panics
/// When the write fails (a broken environment, not a finding).
pub fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("write a scratch file");
}

/// The model of the `weights` target: a Mixtral small enough that its whole checkpoint (a few KB)
/// is one fuzz input: vocab 16, hidden 8, 1 layer, 2 query / 1 KV heads of 4, 2 experts top-1,
/// intermediate 8, bf16.
pub fn weights_spec() -> RandomModelSpec {
    RandomModelSpec::tiny(7)
        .with("vocab_size", 16)
        .with("hidden_size", 8)
        .with("intermediate_size", 8)
        .with("num_hidden_layers", 1)
        .with("num_attention_heads", 2)
        .with("num_key_value_heads", 1)
        .with("num_local_experts", 2)
        .with("num_experts_per_tok", 1)
        .with("bos_token_id", 1)
        .with("eos_token_id", 2)
        .with("max_position_embeddings", 64)
        .with_dtype(DType::BF16)
}

/// Reads every element of every tensor (what a backend would do), returning a value that depends
/// on all of them so that the reads are not optimised away.
pub fn touch_all(checkpoint: &Checkpoint) -> f64 {
    let mut sum = 0.0f64;
    for tensor in checkpoint.iter() {
        let _ = (
            tensor.name(),
            tensor.shape(),
            tensor.path(),
            tensor.file_offset(),
        );
        assert_eq!(
            tensor.bytes().len(),
            tensor.num_elements() * tensor.dtype().size(),
            "tensor `{}`: byte length disagrees with its element count",
            tensor.name()
        );
        let data = tensor.data();
        assert_eq!(data.len(), tensor.num_elements());
        sum += data.to_f32_vec().iter().map(|&v| f64::from(v)).sum::<f64>();
    }
    sum
}

