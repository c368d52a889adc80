//! The per-rank memory plan: bytes one rank of a [`Layout`] holds on its device, from the config
//! alone (before anything is loaded), by the same per-matrix sizes as the single-device preflight
//! ([`crate::quant::estimate_memory`]):
//! - weights: the rank's q/k/v rows and o_proj columns (`1/tp` of attention), its experts
//!   (`1/ep` of them) with `1/tp` of each one's intermediate size, its `1/(tp * ep)` of the
//!   embedding and LM head, and the replicated router and norms;
//! - KV cache: its `1/tp` of the KV heads in bf16, `context * batch` tokens;
//! - activations: the single-device estimate (an upper bound: a rank holds the whole hidden state
//!   and less of everything else).

use super::plan::{Layout, PlanError, ShardPlan};
use crate::config::ModelConfig;
use crate::quant::memory::projection_bytes;
use crate::quant::{estimate_memory, QuantFormat};

/// Bytes one rank holds, by use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankMemory {
    /// The rank's weights.
    pub weights_bytes: u64,
    /// Its KV cache.
    pub kv_bytes: u64,
    /// Working buffers of one step.
    pub activations_bytes: u64,
    /// The sum of the three.
    pub total: u64,
}

impl RankMemory {
    /// True when the rank's total plus `reserve` (the CUDA context, the allocator's slack) is at
    /// most `capacity` bytes.
    pub fn fits(&self, capacity: u64, reserve: u64) -> bool {
        self.total + reserve <= capacity
    }
}

/// The memory of every rank of `layout` (all ranks hold the same amount) for `config`'s model in
/// `format`, with a KV cache of `context` tokens for each of `batch` sequences.
pub fn rank_memory(
    config: &ModelConfig,
    format: QuantFormat,
    layout: Layout,
    context: usize,
    batch: usize,
) -> Result<RankMemory, PlanError> {
    let plan = ShardPlan::new(config, layout)?;
    let shard = &plan.ranks[0];
    let c = |v: usize| v as u64;
    let hidden = c(config.hidden_size);
    let hd = c(config.head_dim);
    let (q_rows, kv_rows) = (c(shard.q_rows.len()), c(shard.kv_rows.len()));
    let inter = c(shard.inter.len());
    let attention = 2 * projection_bytes(format, q_rows, hidden)
        + 2 * projection_bytes(format, kv_rows, hidden);
    let expert =
        2 * projection_bytes(format, inter, hidden) + projection_bytes(format, hidden, inter);
    let router = c(config.num_experts.max(1)) * hidden * 2;
    let norms = 2 * hidden * 2;
    let per_layer = attention + c(shard.experts.len()) * expert + router + norms;
    let heads = if config.tie_word_embeddings { 1 } else { 2 };
    let layers = c(config.num_layers);
    let weights_bytes = layers * per_layer + heads * c(shard.vocab.len()) * hidden * 2 + hidden * 2;
    let kv_width = c(shard.num_kv_heads()) * hd;
    let kv_bytes = 2 * layers * kv_width * 2 * c(context) * c(batch);
    let activations_bytes = estimate_memory(config, format, context, batch).activations_bytes;
    Ok(RankMemory {
        weights_bytes,
        kv_bytes,
        activations_bytes,
        total: weights_bytes + kv_bytes + activations_bytes,
    })
}

/// One line describing `memory` for a log: `per rank (tp=2 ep=1, bf16, 32768-token context):
/// weights 46.4 GiB, KV cache 2.0 GiB, activations 0.3 GiB, total 48.7 GiB`.
pub fn describe(
    memory: &RankMemory,
    layout: Layout,
    format: QuantFormat,
    context: usize,
) -> String {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    format!(
        "memory plan per rank ({layout}, {} ranks, {format}, {context}-token context): weights \
         {:.2} GiB, KV cache {:.2} GiB, activations {:.2} GiB, total {:.2} GiB",
        layout.world(),
        gib(memory.weights_bytes),
        gib(memory.kv_bytes),
        gib(memory.activations_bytes),
        gib(memory.total)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// mistralai/Mixtral-8x7B-v0.1 config.json, the fields the plan reads.
    const MIXTRAL_8X7B: &str = r#"{"architectures":["MixtralForCausalLM"],"hidden_size":4096,
        "intermediate_size":14336,"max_position_embeddings":32768,"num_attention_heads":32,
        "num_experts_per_tok":2,"num_hidden_layers":32,"num_key_value_heads":8,
        "num_local_experts":8,"rms_norm_eps":1e-05,"rope_theta":1000000.0,"sliding_window":null,
        "tie_word_embeddings":false,"torch_dtype":"bfloat16","vocab_size":32000}"#;

    /// mistralai/Mixtral-8x22B-v0.1 config.json, the fields the plan reads.
    const MIXTRAL_8X22B: &str = r#"{"architectures":["MixtralForCausalLM"],"hidden_size":6144,
        "intermediate_size":16384,"max_position_embeddings":65536,"num_attention_heads":48,
        "num_experts_per_tok":2,"num_hidden_layers":56,"num_key_value_heads":8,
        "num_local_experts":8,"rms_norm_eps":1e-05,"rope_theta":1000000,"sliding_window":null,
        "tie_word_embeddings":false,"torch_dtype":"bfloat16","vocab_size":32768}"#;

    /// An "80 GB" card, counted in decimal gigabytes (below the 80 GiB such cards report).
    const CARD_80GB: u64 = 80_000_000_000;
    /// Left for the CUDA context, cuBLAS-free kernels' modules and allocator slack.
    const RESERVE: u64 = 2 << 30;

    fn config(text: &str) -> ModelConfig {
        ModelConfig::from_json_str(text, "config.json".as_ref()).unwrap()
    }

    #[test]
    fn one_rank_is_the_single_device_estimate() {
        // The plan with one rank must agree with the preflight it is built from.
        for (text, format) in [
            (MIXTRAL_8X7B, QuantFormat::Bf16),
            (MIXTRAL_8X22B, QuantFormat::Fp8),
        ] {
            let c = config(text);
            let one = rank_memory(&c, format, Layout::default(), 4096, 2).unwrap();
            let single = estimate_memory(&c, format, 4096, 2);
            assert_eq!(one.weights_bytes, single.weights_bytes);
            assert_eq!(one.kv_bytes, single.kv_bytes);
            assert_eq!(one.total, single.total);
        }
    }

    #[test]
    fn mixtral_8x7b_bf16_at_tp2_with_32k_context_fits_two_80gb_cards() {
        let c = config(MIXTRAL_8X7B);
        let one = rank_memory(&c, QuantFormat::Bf16, Layout::default(), 32768, 1).unwrap();
        assert!(!one.fits(CARD_80GB, RESERVE), "one card: {one:?}");
        let tp2 = rank_memory(&c, QuantFormat::Bf16, Layout { tp: 2, ep: 1 }, 32768, 1).unwrap();
        assert!(tp2.fits(CARD_80GB, RESERVE), "{tp2:?}");
        // Half the weights, except the router and the norms, which both ranks hold; half the KV
        // cache.
        let replicated = 32 * (8 * 4096 * 2 + 2 * 4096 * 2) + 4096 * 2;
        assert_eq!(tp2.weights_bytes * 2 - one.weights_bytes, replicated);
        assert_eq!(tp2.kv_bytes * 2, one.kv_bytes);
        // Expert parallel holds the same expert bytes but the whole attention and KV cache.
        let ep2 = rank_memory(&c, QuantFormat::Bf16, Layout { tp: 1, ep: 2 }, 32768, 1).unwrap();
        assert!(ep2.fits(CARD_80GB, RESERVE), "{ep2:?}");
        assert_eq!(ep2.kv_bytes, one.kv_bytes);
    }

    #[test]
    fn mixtral_8x22b_fp8_at_tp4_fits_four_80gb_cards() {
        let c = config(MIXTRAL_8X22B);
        let context = c.max_position_embeddings;
        let one = rank_memory(&c, QuantFormat::Fp8, Layout::default(), context, 1).unwrap();
        assert!(!one.fits(CARD_80GB, RESERVE), "one card: {one:?}");
        let tp4 = rank_memory(&c, QuantFormat::Fp8, Layout { tp: 4, ep: 1 }, context, 1).unwrap();
        assert!(tp4.fits(CARD_80GB, RESERVE), "{tp4:?}");
        assert_eq!(tp4.kv_bytes * 4, one.kv_bytes);
        let line = describe(&tp4, Layout { tp: 4, ep: 1 }, QuantFormat::Fp8, context);
        assert!(line.contains("tp=4 ep=1") && line.contains("fp8"), "{line}");
    }

    #[test]
    fn a_layout_the_model_cannot_take_is_refused() {
        let c = config(MIXTRAL_8X7B);
        let e = rank_memory(&c, QuantFormat::Bf16, Layout { tp: 16, ep: 1 }, 1, 1).unwrap_err();
        assert!(e.to_string().contains("num_key_value_heads = 8"), "{e}");
    }
}
