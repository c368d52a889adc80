//! Seeded random Mixtral-family checkpoints written to a directory (config.json,
//! generation_config.json and safetensors, sharded with an index when asked), for tests and
//! benchmarks that need real files of a chosen shape.
//!
//! Values come from a counter-based splitmix64 stream per tensor (seeded by the model seed and the
//! tensor name), so element `i` of a tensor is the same however the file is chunked or sharded.
//! Norm weights are `1 + 0.2 u`, projections uniform with standard deviation
//! `gain / sqrt(fan_in)` (`u` uniform in `(-1, 1)`, never zero); the embedding and LM head use a larger gain
//! so that logits are clearly peaked.

use crate::checkpoint::{write_safetensors, TensorSource, INDEX_FILE, SINGLE_FILE};
use crate::config::ModelConfig;
use crate::dtype::DType;
use crate::weights::{names, ModelLayout, TensorSpec};
use serde_json::{json, Value};
use std::io;
use std::path::Path;

/// Gain of the embedding and LM head: logits get a standard deviation of about this much.
pub const LOGIT_GAIN: f32 = 4.0;
/// Gain of every other projection.
pub const PROJECTION_GAIN: f32 = 1.0;
/// Norm weights are `1 + NORM_SPREAD * u`.
pub const NORM_SPREAD: f32 = 0.2;

/// What to write: the full config.json object, the storage type, the seed and the shard count.
#[derive(Debug, Clone, PartialEq)]
pub struct RandomModelSpec {
    /// The config.json object, written as is.
    pub config: Value,
    /// Storage type of every tensor.
    pub dtype: DType,
    /// Seed of every value.
    pub seed: u64,
    /// Number of safetensors files (1: `model.safetensors`; more: shards plus an index).
    pub shards: usize,
}

fn torch_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F32 => "float32",
    }
}

impl RandomModelSpec {
    /// A Mixtral config with the given sizes and the usual constants.
    fn mixtral(sizes: [(&str, u64); 8], dtype: DType, seed: u64) -> Self {
        let mut config = json!({
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 1e6,
            "sliding_window": null,
            "tie_word_embeddings": false,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "router_aux_loss_coef": 0.02,
            "output_router_logits": false,
            "use_cache": true,
            "torch_dtype": torch_name(dtype),
        });
        if let Value::Object(map) = &mut config {
            for (key, value) in sizes {
                map.insert(key.into(), value.into());
            }
        }
        RandomModelSpec {
            config,
            dtype,
            seed,
            shards: 1,
        }
    }

    /// A small Mixtral: vocab 256, hidden 64, 2 layers, 4 query / 2 KV heads, 4 experts top-2,
    /// intermediate 96, full causal attention, f32.
    pub fn tiny(seed: u64) -> Self {
        Self::mixtral(
            [
                ("vocab_size", 256),
                ("hidden_size", 64),
                ("intermediate_size", 96),
                ("num_hidden_layers", 2),
                ("num_attention_heads", 4),
                ("num_key_value_heads", 2),
                ("num_local_experts", 4),
                ("num_experts_per_tok", 2),
            ],
            DType::F32,
            seed,
        )
        .with("max_position_embeddings", 4096)
    }

    /// A mid-size Mixtral (~1.6 GB): vocab 32000, hidden 1024, 8 layers, 16 query / 4 KV heads,
    /// 8 experts top-2, intermediate 3584, bf16.
    pub fn mid_size(seed: u64) -> Self {
        Self::mixtral(
            [
                ("vocab_size", 32000),
                ("hidden_size", 1024),
                ("intermediate_size", 3584),
                ("num_hidden_layers", 8),
                ("num_attention_heads", 16),
                ("num_key_value_heads", 4),
                ("num_local_experts", 8),
                ("num_experts_per_tok", 2),
            ],
            DType::BF16,
            seed,
        )
        .with("max_position_embeddings", 32768)
    }

    /// Sets the config.json field `key` to `value`.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        if let Value::Object(map) = &mut self.config {
            map.insert(key.to_string(), value.into());
        }
        self
    }

    /// Removes the config.json field `key`.
    pub fn without(mut self, key: &str) -> Self {
        if let Value::Object(map) = &mut self.config {
            map.remove(key);
        }
        self
    }

    /// Sets the storage type (and config.json's `torch_dtype` to match).
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self.with("torch_dtype", torch_name(dtype))
    }

    /// Sets the number of safetensors files.
    pub fn with_shards(mut self, shards: usize) -> Self {
        self.shards = shards;
        self
    }

    /// The configuration, validated as the loader will.
    pub fn model_config(&self) -> io::Result<ModelConfig> {
        ModelConfig::from_json_str(&self.config.to_string(), Path::new("config.json"))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
    }

    /// Elements `start..start + out.len()` of `tensor`, as written by [`write_random_model`]
    /// (before rounding to the storage type).
    pub fn fill(&self, tensor: &TensorSpec, start: usize, out: &mut [f32]) {
        let stream = splitmix64(self.seed ^ fnv1a(tensor.name.as_bytes()));
        let (offset, scale) = match tensor.shape.as_slice() {
            [_, fan_in] => {
                let gain = if tensor.name == names::EMBED || tensor.name == names::LM_HEAD {
                    LOGIT_GAIN
                } else {
                    PROJECTION_GAIN
                };
                // Uniform on [-a, a) has standard deviation a / sqrt(3).
                (0.0, gain * 3f32.sqrt() / (*fan_in as f32).sqrt())
            }
            _ => (1.0, NORM_SPREAD),
        };
        for (i, o) in out.iter_mut().enumerate() {
            *o = offset + scale * uniform(stream, (start + i) as u64);
        }
    }
}

/// The splitmix64 finaliser.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Element `i` of the stream `stream`: uniform in `(-1, 1)`, never exactly zero.
fn uniform(stream: u64, i: u64) -> f32 {
    let bits = splitmix64(stream.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    // 23 random bits k -> (2k + 1) / 2^23 - 1: exact in f32, symmetric about 0, odd so never 0.
    let k = (bits >> 41) as u32;
    (2 * k + 1) as f32 / (1u32 << 23) as f32 - 1.0
}

/// FNV-1a hash of a tensor name (seeds its stream).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// Name of shard `k` (0-based) of `n`.
fn shard_name(k: usize, n: usize) -> String {
    format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
}

/// Splits `tensors` (in order) into at most `shards` non-empty groups of about equal bytes.
fn split<'a>(tensors: &[&'a TensorSpec], shards: usize, dtype: DType) -> Vec<Vec<&'a TensorSpec>> {
    let bytes = |t: &TensorSpec| t.shape.iter().product::<usize>() as u128 * dtype.size() as u128;
    let total: u128 = tensors.iter().map(|t| bytes(t)).sum::<u128>().max(1);
    let shards = shards.max(1);
    let mut groups: Vec<Vec<&TensorSpec>> = vec![Vec::new(); shards];
    let mut before = 0u128;
    for t in tensors {
        let k = ((before * shards as u128) / total) as usize;
        if let Some(group) = groups.get_mut(k.min(shards - 1)) {
            group.push(t);
        }
        before += bytes(t);
    }
    groups.retain(|g| !g.is_empty());
    groups
}

/// The writer's view of one tensor of the random model.
fn source<'a>(spec: &'a RandomModelSpec, tensor: &'a TensorSpec) -> TensorSource<'a> {
    TensorSource {
        name: tensor.name.clone(),
        dtype: spec.dtype,
        shape: tensor.shape.clone(),
        fill: Box::new(move |start, out| spec.fill(tensor, start, out)),
    }
}

/// Writes `spec`'s model into `dir` (created if needed): config.json, generation_config.json and
/// `model.safetensors`, or `model-XXXXX-of-YYYYY.safetensors` shards plus
/// `model.safetensors.index.json` when `spec.shards > 1`. An existing `model.safetensors` or index
/// in `dir` is replaced.
pub fn write_random_model(dir: &Path, spec: &RandomModelSpec) -> io::Result<()> {
    if spec.shards == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "shards must be at least 1",
        ));
    }
    let config = spec.model_config()?;
    std::fs::create_dir_all(dir)?;
    for stale in [SINGLE_FILE, INDEX_FILE] {
        match std::fs::remove_file(dir.join(stale)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&spec.config)?,
    )?;
    let mut generation = serde_json::Map::new();
    for key in ["bos_token_id", "eos_token_id"] {
        if let Some(v) = spec.config.get(key) {
            generation.insert(key.into(), v.clone());
        }
    }
    std::fs::write(
        dir.join("generation_config.json"),
        serde_json::to_vec_pretty(&generation)?,
    )?;

    let layout = ModelLayout::new(&config);
    let tensors = layout.tensors();
    if spec.shards == 1 {
        let sources: Vec<_> = tensors.iter().map(|t| source(spec, t)).collect();
        return write_safetensors(&dir.join(SINGLE_FILE), &sources);
    }
    let groups = split(&tensors, spec.shards, spec.dtype);
    let mut weight_map = serde_json::Map::new();
    let mut total_size = 0u64;
    for (k, group) in groups.iter().enumerate() {
        let name = shard_name(k, groups.len());
        let sources: Vec<_> = group.iter().map(|t| source(spec, t)).collect();
        for s in &sources {
            weight_map.insert(s.name.clone(), name.clone().into());
            total_size += (s.shape.iter().product::<usize>() * s.dtype.size()) as u64;
        }
        write_safetensors(&dir.join(&name), &sources)?;
    }
    let index = json!({ "metadata": { "total_size": total_size }, "weight_map": weight_map });
    std::fs::write(dir.join(INDEX_FILE), serde_json::to_vec_pretty(&index)?)
}
