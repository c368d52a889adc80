//! Memory preflight: how many bytes a model needs on one device for a weight format, a context
//! length and a batch, before anything is loaded.
//!
//! - weights: the quantizable projections (attention q/k/v/o, every expert's w1/w2/w3) at the
//!   format's bytes per parameter plus its scales (FP8/INT8: one f32 scale per output channel;
//!   INT4: the packed layout of [`crate::packed`] as the GPU holds it, one 32-bit (f16 scale, zero)
//!   word per group of 128 inputs per output, where the CPU engine keeps an f32 pair, 1/32 byte per
//!   parameter more; an act-order permutation, 4 bytes per input, is left out); router, norms,
//!   embedding and LM head in bf16;
//! - KV cache: keys and values of every layer in bf16, `context_tokens * batch` tokens;
//! - activations: the f32 working buffers of one step of `batch` sequences prefilling
//!   [`ACTIVATION_CHUNK`] tokens each (hidden states, q/k/v, the top-k experts' intermediates,
//!   one attention score row per head over the whole context, and the logits).

use super::QuantFormat;
use crate::config::ModelConfig;

/// Prefill tokens per sequence and step assumed for the activation estimate.
pub const ACTIVATION_CHUNK: usize = 512;

/// Bytes a model needs, by use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// All weights, quantized projections in the chosen format.
    pub weights_bytes: u64,
    /// The KV cache (bf16).
    pub kv_bytes: u64,
    /// Working buffers of one step.
    pub activations_bytes: u64,
    /// The sum of the three.
    pub total: u64,
}

/// Bytes of a quantizable `[rows, cols]` projection in `format`.
pub(crate) fn projection_bytes(format: QuantFormat, rows: u64, cols: u64) -> u64 {
    match format {
        QuantFormat::Bf16 => rows * cols * 2,
        QuantFormat::Fp8 | QuantFormat::Int8 => rows * cols + rows * 4,
        QuantFormat::Int4 => {
            let groups = cols.div_ceil(128);
            rows * cols / 2 + groups * rows * 4
        }
    }
}

/// Bytes of one layer's weights by part: the attention projections and one expert's w1/w2/w3 in
/// `format`; the router and the two norms in bf16.
struct LayerBytes {
    attention: u64,
    expert: u64,
    router: u64,
    norms: u64,
}

fn layer_bytes(config: &ModelConfig, format: QuantFormat) -> LayerBytes {
    let c = |v: usize| v as u64;
    let (hidden, inter) = (c(config.hidden_size), c(config.intermediate_size));
    let (q_width, kv_width) = (c(config.q_width()), c(config.kv_width()));
    LayerBytes {
        attention: 2 * projection_bytes(format, q_width, hidden)
            + 2 * projection_bytes(format, kv_width, hidden),
        expert: 2 * projection_bytes(format, inter, hidden)
            + projection_bytes(format, hidden, inter),
        router: c(config.num_experts.max(1)) * hidden * 2,
        norms: 2 * hidden * 2,
    }
}

/// Bytes of weights one token of a batch-1 decode reads, each once: the attention projections
/// and the `experts_per_token` chosen experts' w1/w2/w3 in `format` (as [`estimate_memory`] counts
/// them), the router and the two norms of every layer, the final norm, the LM head and one
/// embedding row in bf16. A decode step cannot take less than these bytes over the memory
/// bandwidth: its floor.
pub fn decode_weight_bytes(config: &ModelConfig, format: QuantFormat) -> u64 {
    let parts = layer_bytes(config, format);
    let chosen = config.experts_per_token.clamp(1, config.num_experts.max(1)) as u64;
    let per_layer = parts.attention + chosen * parts.expert + parts.router + parts.norms;
    let (hidden, vocab) = (config.hidden_size as u64, config.vocab_size as u64);
    config.num_layers as u64 * per_layer + vocab * hidden * 2 + hidden * 2 + hidden * 2
}

/// Estimates the memory `config`'s model needs in `format`, with a KV cache for
/// `context_tokens` tokens of each of `batch` sequences.
pub fn estimate_memory(
    config: &ModelConfig,
    format: QuantFormat,
    context_tokens: usize,
    batch: usize,
) -> MemoryEstimate {
    let c = |v: usize| v as u64;
    let (hidden, inter, vocab) = (
        c(config.hidden_size),
        c(config.intermediate_size),
        c(config.vocab_size),
    );
    let (q_width, kv_width) = (c(config.q_width()), c(config.kv_width()));
    let layers = c(config.num_layers);
    let experts = c(config.num_experts.max(1));
    let parts = layer_bytes(config, format);
    let per_layer = parts.attention + experts * parts.expert + parts.router + parts.norms;
    let heads = if config.tie_word_embeddings { 1 } else { 2 };
    let weights_bytes = layers * per_layer + heads * vocab * hidden * 2 + hidden * 2;
    let (context, batch) = (c(context_tokens), c(batch));
    let kv_bytes = 2 * layers * kv_width * 2 * context * batch;
    let tokens = batch * c(ACTIVATION_CHUNK.min(context_tokens.max(1)));
    let top_k = c(config.experts_per_token.max(1));
    let per_token = 4 * hidden + q_width + 2 * kv_width + 3 * inter * top_k + vocab;
    let scores = batch * c(config.num_heads) * context;
    let activations_bytes = 4 * (tokens * per_token + scores);
    MemoryEstimate {
        weights_bytes,
        kv_bytes,
        activations_bytes,
        total: weights_bytes + kv_bytes + activations_bytes,
    }
}
