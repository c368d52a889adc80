//! Loads everything a model directory holds in one call: config (merged with
//! generation_config.json), checkpoint, typed weights and, when present, the tokenizer.

use crate::checkpoint::{Checkpoint, CheckpointError, LoadProgress, OpenOptions};
use crate::config::{ConfigError, ModelConfig};
use crate::quant::{QuantError, QuantFormat, QuantMethod};
use crate::tokenizer::{Tokenizer, TokenizerError};
use crate::weights::{ModelWeights, WeightsError};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a model directory could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The path is not a readable directory.
    #[error("{path}: not a model directory: {reason}")]
    NotADirectory {
        /// The path given.
        path: PathBuf,
        /// What the OS or the check said.
        reason: String,
    },
    /// config.json or generation_config.json.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The safetensors files.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Tensors missing or of the wrong shape.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// tokenizer.json or tokenizer_config.json.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// Quantized tensors malformed, or a quantization that cannot be applied.
    #[error(transparent)]
    Quant(#[from] QuantError),
}

/// Receives progress of long loads.
pub type ProgressFn = Arc<dyn Fn(LoadProgress) + Send + Sync>;

/// How to load a model directory.
#[derive(Clone, Default)]
pub struct LoadOptions {
    /// Called as the weights are read in (page-faulted), for a progress display.
    pub progress: Option<ProgressFn>,
    /// Fail when the directory has no tokenizer.json (otherwise `Model::tokenizer` is `None`).
    pub require_tokenizer: bool,
    /// Quantize the attention and expert projections of a bf16/f16/f32 checkpoint to this format
    /// as they are loaded (`None` or `Some(Bf16)`: as stored). A pre-quantized checkpoint is
    /// recognised by its tensors and loaded as published without this option. The CPU reference
    /// path dequantizes quantized projections to f32 (see [`crate::quant`]).
    pub quant: Option<QuantFormat>,
}

impl std::fmt::Debug for LoadOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadOptions")
            .field("progress", &self.progress.is_some())
            .field("require_tokenizer", &self.require_tokenizer)
            .field("quant", &self.quant)
            .finish()
    }
}

/// A loaded model directory.
pub struct Model {
    /// The directory.
    pub dir: PathBuf,
    /// Validated configuration, EOS ids merged from generation_config.json.
    pub config: ModelConfig,
    /// The weights, memory-mapped; shared by engines.
    pub weights: Arc<ModelWeights>,
    /// The tokenizer, when the directory has one.
    pub tokenizer: Option<Tokenizer>,
    /// The format of the quantized projections (quantized on load or as published); `None` when
    /// they are as stored in a float type.
    pub quant: Option<QuantFormat>,
}

impl Model {
    /// Loads `dir`: config.json, generation_config.json (optional), the safetensors checkpoint and
    /// tokenizer.json / tokenizer_config.json (optional unless `require_tokenizer`).
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Model, ModelError> {
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(ModelError::NotADirectory {
                    path: dir.into(),
                    reason: "not a directory".into(),
                })
            }
            Err(e) => {
                return Err(ModelError::NotADirectory {
                    path: dir.into(),
                    reason: e.to_string(),
                })
            }
        }
        let mut config = ModelConfig::from_file(&dir.join("config.json"))?;
        config.merge_generation_config(&dir.join("generation_config.json"))?;
        // Read first: a quantization method this crate does not read is refused by name, before
        // any of its tensors is looked at.
        let method = QuantMethod::from_config_file(&dir.join("config.json"))?;
        let checkpoint = Checkpoint::open_with_packed(dir, OpenOptions::default())?;
        let quantize = options.quant.filter(|f| *f != QuantFormat::Bf16);
        let (weights, quant) = if quantize.is_some() || checkpoint.has_packed() {
            let q = crate::quant::load_weights(&checkpoint, &config, quantize, &method)?;
            (q.weights, q.format)
        } else {
            // Unquantized: every weight stays memory-mapped, nothing is copied.
            (ModelWeights::from_checkpoint(&checkpoint, &config)?, None)
        };
        if let Some(progress) = &options.progress {
            weights.prefetch(&**progress);
        }
        let tokenizer = if dir.join("tokenizer.json").exists() || options.require_tokenizer {
            Some(Tokenizer::from_dir(dir)?)
        } else {
            None
        };
        Ok(Model {
            dir: dir.to_path_buf(),
            config,
            weights: Arc::new(weights),
            tokenizer,
            quant,
        })
    }
}
