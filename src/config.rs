//! `config.json` (and `generation_config.json`) of a Hugging Face model directory -> a validated
//! [`ModelConfig`].
//!
//! Accepts the forms written by the released Mixtral files and by transformers 5: `rope_theta` at top
//! level or inside `rope_parameters`, `sliding_window` null or a number, `torch_dtype` or `dtype`,
//! `head_dim` absent, null or explicit, `eos_token_id` a number or a list. `MistralForCausalLM` loads
//! as the dense one-expert case (one expert, top-1, no router weights).

use crate::dtype::DType;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Largest value any size field may take; anything above is treated as a corrupt file.
const ABSURD: u64 = 1 << 24;
/// Largest vocabulary accepted.
const MAX_VOCAB: u64 = 1 << 22;
/// Most expert MLPs in all layers together (`num_hidden_layers * num_local_experts`); Mixtral-8x22B
/// has 448. Bounds the weight layout built from the config before any checkpoint is read.
const MAX_EXPERT_MLPS: usize = 1 << 16;

/// What went wrong reading or validating a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid JSON or not a JSON object.
    #[error("{path}: not a valid JSON object: {message}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A required field is absent.
    #[error("{path}: missing field `{field}`")]
    Missing {
        /// The file.
        path: PathBuf,
        /// The field name.
        field: &'static str,
    },
    /// A field is present but its value is not acceptable.
    #[error("{path}: invalid `{field}` = {value}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The field name.
        field: &'static str,
        /// The value as written in the file.
        value: String,
        /// Why it was rejected.
        reason: String,
    },
}

/// Model family, from `architectures` / `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `MixtralForCausalLM`: sparse MoE feed-forward.
    Mixtral,
    /// `MistralForCausalLM`: dense feed-forward, loaded as one expert with top-1 routing.
    Mistral,
}

/// The validated hyper-parameters of a Mixtral-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Model family.
    pub architecture: Architecture,
    /// Vocabulary size (rows of the embedding and LM head).
    pub vocab_size: usize,
    /// Residual stream width.
    pub hidden_size: usize,
    /// Expert (SwiGLU) inner width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA: divides `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Experts per MoE layer (1 for the dense Mistral case).
    pub num_experts: usize,
    /// Experts each token is routed to.
    pub experts_per_token: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base.
    pub rope_theta: f32,
    /// Sliding attention window W (keys `i - W < j <= i`); `None` = full causal.
    pub sliding_window: Option<usize>,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u32>,
    /// Every end-of-sequence token id (config.json, merged with generation_config.json by the loader).
    pub eos_token_ids: Vec<u32>,
    /// Declared weight dtype (`torch_dtype` or `dtype`), if any.
    pub dtype: Option<DType>,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text, path)
    }

    /// Parses and validates the text of a `config.json`; `path` is used in error messages only.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let fields = Fields::parse(text, path)?;
        let architecture = fields.architecture()?;
        let hidden_size = fields.size("hidden_size", ABSURD)?;
        let num_heads = fields.size("num_attention_heads", 1 << 16)?;
        let num_kv_heads = match fields.get("num_key_value_heads") {
            None | Some(Value::Null) => num_heads,
            Some(_) => fields.size("num_key_value_heads", 1 << 16)?,
        };
        let head_dim = match fields.get("head_dim") {
            None | Some(Value::Null) => {
                if hidden_size % num_heads != 0 {
                    return Err(fields.invalid(
                        "num_attention_heads",
                        format!("{num_heads} does not divide hidden_size {hidden_size}"),
                    ));
                }
                hidden_size / num_heads
            }
            Some(_) => fields.size("head_dim", 1 << 16)?,
        };
        if num_heads % num_kv_heads != 0 {
            return Err(fields.invalid(
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads {num_heads}"),
            ));
        }
        if head_dim % 2 != 0 {
            return Err(fields.invalid("head_dim", "must be even for rotary embeddings".into()));
        }
        let (num_experts, experts_per_token) = match architecture {
            Architecture::Mixtral => {
                let experts = fields.size("num_local_experts", 1 << 12)?;
                let top_k = fields.size("num_experts_per_tok", 1 << 12)?;
                if top_k > experts {
                    return Err(fields.invalid(
                        "num_experts_per_tok",
                        format!("{top_k} exceeds num_local_experts {experts}"),
                    ));
                }
                (experts, top_k)
            }
            Architecture::Mistral => (1, 1),
        };
        let num_layers = fields.size("num_hidden_layers", 1 << 12)?;
        if num_layers.saturating_mul(num_experts) > MAX_EXPERT_MLPS {
            return Err(fields.invalid(
                "num_local_experts",
                format!(
                    "{num_experts} experts in each of {num_layers} layers is more than \
                     {MAX_EXPERT_MLPS} expert MLPs in all"
                ),
            ));
        }
        let rope_theta = fields.rope_theta()?;
        let sliding_window = match fields.get("sliding_window") {
            None | Some(Value::Null) => None,
            Some(_) => Some(fields.size("sliding_window", u64::MAX >> 1)?),
        };
        let max_position_embeddings = fields.size("max_position_embeddings", u64::MAX >> 1)?;
        let rms_norm_eps = fields.positive_float("rms_norm_eps", Some(1e-5))?;
        let dtype = fields.dtype()?;
        let tie_word_embeddings = match fields.get("tie_word_embeddings") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(fields.invalid_value("tie_word_embeddings", v, "expected a boolean"))
            }
        };
        let vocab_size = fields.size("vocab_size", MAX_VOCAB)?;
        let bos_token_id = fields.optional_token("bos_token_id", vocab_size)?;
        let eos_token_ids = fields.token_list("eos_token_id", vocab_size)?;
        Ok(ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: fields.size("intermediate_size", ABSURD)?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            num_experts,
            experts_per_token,
            rms_norm_eps,
            rope_theta,
            sliding_window,
            max_position_embeddings,
            tie_word_embeddings,
            bos_token_id,
            eos_token_ids,
            dtype,
        })
    }

    /// Query heads sharing one KV head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Width of all query heads together (`num_heads * head_dim`).
    pub fn q_width(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of all KV heads together (`num_kv_heads * head_dim`).
    pub fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Adds the EOS ids of a `generation_config.json` (if the file exists) to `eos_token_ids`.
    pub fn merge_generation_config(&mut self, path: &Path) -> Result<(), ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(ConfigError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let fields = Fields::parse(&text, path)?;
        for id in fields.token_list("eos_token_id", self.vocab_size)? {
            if !self.eos_token_ids.contains(&id) {
                self.eos_token_ids.push(id);
            }
        }
        Ok(())
    }
}

/// A parsed JSON object plus its path, with typed, validating accessors.
struct Fields<'p> {
    map: serde_json::Map<String, Value>,
    path: &'p Path,
}

impl<'p> Fields<'p> {
    fn parse(text: &str, path: &'p Path) -> Result<Self, ConfigError> {
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => Ok(Fields { map, path }),
            Ok(_) => Err(ConfigError::Json {
                path: path.to_path_buf(),
                message: "top level is not an object".into(),
            }),
            Err(e) => Err(ConfigError::Json {
                path: path.to_path_buf(),
                message: e.to_string(),
            }),
        }
    }

    fn get(&self, field: &str) -> Option<&Value> {
        self.map.get(field)
    }

    fn require(&self, field: &'static str) -> Result<&Value, ConfigError> {
        self.get(field).ok_or_else(|| ConfigError::Missing {
            path: self.path.to_path_buf(),
            field,
        })
    }

    fn invalid(&self, field: &'static str, reason: String) -> ConfigError {
        let value = self
            .get(field)
            .map_or_else(|| "absent".into(), |v| v.to_string());
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            field,
            value,
            reason,
        }
    }

    fn invalid_value(&self, field: &'static str, value: &Value, reason: &str) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            field,
            value: truncate(value.to_string()),
            reason: reason.into(),
        }
    }

    /// A positive integer no larger than `max`.
    fn size(&self, field: &'static str, max: u64) -> Result<usize, ConfigError> {
        let v = self.require(field)?;
        match v.as_u64() {
            Some(0) => Err(self.invalid_value(field, v, "must be positive")),
            Some(n) if n > max => Err(self.invalid_value(field, v, &format!("larger than {max}"))),
            Some(n) => usize::try_from(n).map_err(|_| self.invalid_value(field, v, "too large")),
            None => Err(self.invalid_value(field, v, "expected a positive integer")),
        }
    }

    fn positive_float(
        &self,
        field: &'static str,
        default: Option<f64>,
    ) -> Result<f32, ConfigError> {
        let v = match (self.get(field), default) {
            (None | Some(Value::Null), Some(d)) => return Ok(d as f32),
            (None, None) => return Err(self.require(field).unwrap_err()),
            (Some(v), _) => v,
        };
        match v.as_f64() {
            Some(x) if x.is_finite() && x > 0.0 && (x as f32).is_finite() && x as f32 > 0.0 => {
                Ok(x as f32)
            }
            _ => Err(self.invalid_value(field, v, "expected a finite positive number")),
        }
    }

    fn architecture(&self) -> Result<Architecture, ConfigError> {
        let named = |s: &str| match s {
            "MixtralForCausalLM" | "mixtral" => Some(Architecture::Mixtral),
            "MistralForCausalLM" | "mistral" => Some(Architecture::Mistral),
            _ => None,
        };
        if let Some(Value::Array(list)) = self.get("architectures") {
            for a in list.iter().filter_map(Value::as_str) {
                if let Some(arch) = named(a) {
                    return Ok(arch);
                }
            }
            return Err(self.invalid(
                "architectures",
                "expected MixtralForCausalLM or MistralForCausalLM".into(),
            ));
        }
        match self
            .get("model_type")
            .and_then(Value::as_str)
            .and_then(named)
        {
            Some(arch) => Ok(arch),
            None => Err(ConfigError::Missing {
                path: self.path.to_path_buf(),
                field: "architectures",
            }),
        }
    }

    fn rope_theta(&self) -> Result<f32, ConfigError> {
        if matches!(self.get("rope_theta"), Some(v) if !v.is_null()) {
            return self.positive_float("rope_theta", None);
        }
        if let Some(params) = self.get("rope_parameters").filter(|v| !v.is_null()) {
            let theta = params.get("rope_theta");
            if let Some(kind) = params.get("rope_type").and_then(Value::as_str) {
                if kind != "default" {
                    return Err(self.invalid(
                        "rope_parameters",
                        format!("rope_type {kind:?} is not supported (only \"default\")"),
                    ));
                }
            }
            return match theta.and_then(Value::as_f64) {
                Some(x) if x.is_finite() && x > 0.0 && (x as f32).is_finite() => Ok(x as f32),
                _ => Err(self.invalid(
                    "rope_parameters",
                    "rope_parameters.rope_theta must be a finite positive number".into(),
                )),
            };
        }
        // transformers' default for Mixtral when neither form is present.
        Ok(1e6)
    }

    fn dtype(&self) -> Result<Option<DType>, ConfigError> {
        for field in ["torch_dtype", "dtype"] {
            match self.get(field) {
                None | Some(Value::Null) => continue,
                Some(Value::String(s)) => {
                    let name = s.trim_start_matches("torch.");
                    return match DType::from_torch_name(name) {
                        Some(d) => Ok(Some(d)),
                        None => Err(self.invalid_value(
                            if field == "dtype" {
                                "dtype"
                            } else {
                                "torch_dtype"
                            },
                            &Value::String(s.clone()),
                            "expected bfloat16, float16 or float32",
                        )),
                    };
                }
                Some(v) => {
                    return Err(self.invalid_value(
                        if field == "dtype" {
                            "dtype"
                        } else {
                            "torch_dtype"
                        },
                        v,
                        "expected a string",
                    ))
                }
            }
        }
        Ok(None)
    }

    fn token(&self, field: &'static str, v: &Value, vocab: usize) -> Result<u32, ConfigError> {
        match v.as_u64() {
            Some(id) if (id as u128) < vocab as u128 => Ok(id as u32),
            Some(_) => Err(self.invalid_value(field, v, &format!("not below vocab_size {vocab}"))),
            None => Err(self.invalid_value(field, v, "expected a token id")),
        }
    }

    fn optional_token(
        &self,
        field: &'static str,
        vocab: usize,
    ) -> Result<Option<u32>, ConfigError> {
        match self.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => self.token(field, v, vocab).map(Some),
        }
    }

    fn token_list(&self, field: &'static str, vocab: usize) -> Result<Vec<u32>, ConfigError> {
        match self.get(field) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => {
                items.iter().map(|v| self.token(field, v, vocab)).collect()
            }
            Some(v) => Ok(vec![self.token(field, v, vocab)?]),
        }
    }
}

fn truncate(mut s: String) -> String {
    if s.len() > 80 {
        let mut cut = 77;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mixtral_json() -> Value {
        serde_json::json!({
            "architectures": ["MixtralForCausalLM"],
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
            "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
            "sliding_window": null, "max_position_embeddings": 32768, "vocab_size": 32000,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16", "tie_word_embeddings": false
        })
    }

    fn parse(v: &Value) -> Result<ModelConfig, ConfigError> {
        ModelConfig::from_json_str(&v.to_string(), Path::new("config.json"))
    }

    #[test]
    fn released_mixtral_config_parses() {
        let c = parse(&mixtral_json()).unwrap();
        assert_eq!(c.head_dim, 128);
        assert_eq!(c.group_size(), 4);
        assert_eq!(c.sliding_window, None);
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.eos_token_ids, vec![2]);
        assert_eq!(c.dtype, Some(DType::BF16));
    }

    #[test]
    fn transformers5_form_parses() {
        let mut v = mixtral_json();
        let m = v.as_object_mut().unwrap();
        m.remove("rope_theta");
        m.remove("torch_dtype");
        m.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_theta": 12345.0, "rope_type": "default"}),
        );
        m.insert("dtype".into(), "float32".into());
        m.insert("head_dim".into(), 64.into());
        m.insert("sliding_window".into(), 4096.into());
        m.insert("eos_token_id".into(), serde_json::json!([2, 7]));
        let c = parse(&v).unwrap();
        assert_eq!(c.rope_theta, 12345.0);
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.sliding_window, Some(4096));
        assert_eq!(c.dtype, Some(DType::F32));
        assert_eq!(c.eos_token_ids, vec![2, 7]);
    }

    #[test]
    fn invalid_values_name_the_field() {
        let cases: &[(&str, Value, &str)] = &[
            ("num_key_value_heads", 5.into(), "num_key_value_heads"),
            ("num_experts_per_tok", 9.into(), "num_experts_per_tok"),
            ("num_experts_per_tok", 0.into(), "num_experts_per_tok"),
            ("hidden_size", 0.into(), "hidden_size"),
            ("hidden_size", (-3).into(), "hidden_size"),
            ("num_attention_heads", 3.into(), "num_attention_heads"),
            ("vocab_size", "big".into(), "vocab_size"),
            ("rms_norm_eps", (-1.0).into(), "rms_norm_eps"),
            ("rope_theta", 0.into(), "rope_theta"),
            ("eos_token_id", 32000.into(), "eos_token_id"),
            ("torch_dtype", "int3".into(), "torch_dtype"),
            (
                "num_hidden_layers",
                (1u64 << 40).into(),
                "num_hidden_layers",
            ),
        ];
        for (field, value, named) in cases {
            let mut v = mixtral_json();
            v.as_object_mut()
                .unwrap()
                .insert(field.to_string(), value.clone());
            let err = parse(&v).expect_err(field);
            assert!(err.to_string().contains(named), "{field}: {err}");
        }
    }

    #[test]
    fn missing_field_and_bad_json_are_errors() {
        let mut v = mixtral_json();
        v.as_object_mut().unwrap().remove("vocab_size");
        assert!(matches!(
            parse(&v),
            Err(ConfigError::Missing {
                field: "vocab_size",
                ..
            })
        ));
        for text in ["", "[1]", "{", "null"] {
            assert!(matches!(
                ModelConfig::from_json_str(text, Path::new("c.json")),
                Err(ConfigError::Json { .. })
            ));
        }
    }

    #[test]
    fn mistral_is_one_expert() {
        let mut v = mixtral_json();
        let m = v.as_object_mut().unwrap();
        m.insert(
            "architectures".into(),
            serde_json::json!(["MistralForCausalLM"]),
        );
        m.remove("num_local_experts");
        m.remove("num_experts_per_tok");
        let c = parse(&v).unwrap();
        assert_eq!((c.num_experts, c.experts_per_token), (1, 1));
        assert_eq!(c.architecture, Architecture::Mistral);
    }
}
