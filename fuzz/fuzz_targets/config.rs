//! `config.json` (and, with the same text, `generation_config.json`) from the input: parsing must
//! either fail with a `ConfigError` or give a configuration whose derived sizes and weight layout can
//! be computed without overflow or panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mixtral::config::ModelConfig;
use mixtral::weights::ModelLayout;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

static DIR: OnceLock<PathBuf> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(|| mixtral_fuzz::scratch_dir("config"));
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(config) = ModelConfig::from_json_str(text, Path::new("config.json")) {
            check(&config);
        }
    }
    // Through a file: any bytes (invalid UTF-8 included); then the same file merged as a
    // generation_config.json into the configuration it gave.
    let path = dir.join("config.json");
    mixtral_fuzz::write(&path, data);
    if let Ok(mut config) = ModelConfig::from_file(&path) {
        check(&config);
        let before = config.eos_token_ids.clone();
        if config.merge_generation_config(&path).is_ok() {
            assert!(config.eos_token_ids.starts_with(&before));
            check(&config);
        }
    }
});

/// Everything a loader derives from a valid configuration.
fn check(config: &ModelConfig) {
    assert!(config.num_kv_heads > 0 && config.num_heads.is_multiple_of(config.num_kv_heads));
    assert!(config.experts_per_token >= 1 && config.experts_per_token <= config.num_experts);
    assert!(config.head_dim.is_multiple_of(2) && config.head_dim > 0);
    let _ = (config.group_size(), config.q_width(), config.kv_width());
    for id in config.bos_token_id.iter().chain(&config.eos_token_ids) {
        assert!((*id as usize) < config.vocab_size);
    }
    // The layout lists (num_layers * experts * 3) specs; the limits keep that bounded.
    let layout = ModelLayout::new(config);
    let tensors = layout.tensors();
    assert!(!tensors.is_empty());
}
