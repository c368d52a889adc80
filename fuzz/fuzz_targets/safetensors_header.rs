//! A whole `model.safetensors` file (8-byte header length, JSON header, data section) from the
//! input: opening it must either fail with a `CheckpointError` or give tensors whose every byte can
//! be read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mixtral::checkpoint::{Checkpoint, SINGLE_FILE};
use std::path::PathBuf;
use std::sync::OnceLock;

static DIR: OnceLock<PathBuf> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(|| mixtral_fuzz::scratch_dir("safetensors-header"));
    mixtral_fuzz::write(&dir.join(SINGLE_FILE), data);
    if let Ok(checkpoint) = Checkpoint::open(dir) {
        std::hint::black_box(mixtral_fuzz::touch_all(&checkpoint));
        assert!(checkpoint.total_bytes() <= data.len() as u64);
    }
});
