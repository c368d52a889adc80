//! The sharding plan: which rows, columns and experts of every weight each rank of a tensor-
//! parallel (TP) x expert-parallel (EP) layout owns.
//!
//! Ranks are numbered `rank = ep_rank * tp + tp_rank`: the `tp` ranks of one TP group are
//! consecutive. With projections stored `[out, in]`:
//! - attention, split by KV-head groups over the TP group: TP rank `t` owns KV heads
//!   `t * kv/tp ..` and the query heads that read them; q/k/v are row shards (output features, the
//!   "column-parallel" half), o_proj a column shard (its input features, "row-parallel");
//!   each rank's partial o_proj output is summed over its TP group (one all-reduce);
//! - experts: EP rank `p` owns whole experts `p * E/ep ..`; within them TP rank `t` owns
//!   intermediate rows `t * I/tp ..` of w1 and w3 and the same columns of w2. Routing is
//!   replicated; every rank's partial MoE output is summed over the whole world (one all-reduce);
//! - embedding and LM head, split by vocabulary over the whole world: rank `r` owns token ids
//!   `r * V/world ..`; the embedding's partial rows are summed (exactly one rank adds a non-zero
//!   row per token) and the LM head's logits are gathered in rank order before argmax or sampling;
//! - norms and the router are replicated.
//!
//! A size that does not divide is a [`PlanError`] naming the value and the divisor.

use crate::config::ModelConfig;
use std::ops::Range;

/// How many ways the model is split.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Layout {
    /// Tensor-parallel size (ranks of one TP group).
    pub tp: usize,
    /// Expert-parallel size (TP groups).
    pub ep: usize,
}

impl Default for Layout {
    /// One rank: no sharding.
    fn default() -> Self {
        Layout { tp: 1, ep: 1 }
    }
}

impl Layout {
    /// Ranks in all (`tp * ep`).
    pub fn world(&self) -> usize {
        self.tp * self.ep
    }

    /// True when the model is split at all.
    pub fn is_sharded(&self) -> bool {
        self.world() > 1
    }
}

impl std::fmt::Display for Layout {
    /// `tp=2 ep=1`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tp={} ep={}", self.tp, self.ep)
    }
}

/// Why a layout cannot split a model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A parallel size of zero.
    #[error("{what} must be at least 1")]
    Zero {
        /// `tensor-parallel size` or `expert-parallel size`.
        what: &'static str,
    },
    /// A model size is not a multiple of the number of parts it is split into.
    #[error(
        "{what} = {value} cannot be split {parts} ways ({by}): it is not a multiple of {parts}"
    )]
    NotDivisible {
        /// The config field (`num_key_value_heads`, `num_local_experts`, ...).
        what: &'static str,
        /// Its value.
        value: usize,
        /// Parts asked for.
        parts: usize,
        /// Which parallel size asks for them.
        by: &'static str,
    },
}

/// What one rank owns. Ranges index the full model's heads, rows, experts and token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankShard {
    /// Rank in the world.
    pub rank: usize,
    /// Rank within its TP group.
    pub tp_rank: usize,
    /// Which TP group (EP rank).
    pub ep_rank: usize,
    /// Query heads.
    pub heads: Range<usize>,
    /// KV heads.
    pub kv_heads: Range<usize>,
    /// Rows of q_proj and columns of o_proj (`heads * head_dim`).
    pub q_rows: Range<usize>,
    /// Rows of k_proj and v_proj (`kv_heads * head_dim`).
    pub kv_rows: Range<usize>,
    /// Experts (whole; all of them for a dense model's single MLP).
    pub experts: Range<usize>,
    /// Rows of every owned expert's w1 and w3, columns of its w2.
    pub inter: Range<usize>,
    /// Token ids: rows of the embedding and of the LM head.
    pub vocab: Range<usize>,
}

impl RankShard {
    /// Query heads owned.
    pub fn num_heads(&self) -> usize {
        self.heads.len()
    }

    /// KV heads owned.
    pub fn num_kv_heads(&self) -> usize {
        self.kv_heads.len()
    }
}

/// Every rank's [`RankShard`] for one model and layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    /// The layout.
    pub layout: Layout,
    /// One per rank, in rank order.
    pub ranks: Vec<RankShard>,
}

/// `value / parts`, or [`PlanError::NotDivisible`].
fn split(
    what: &'static str,
    value: usize,
    parts: usize,
    by: &'static str,
) -> Result<usize, PlanError> {
    if value.is_multiple_of(parts) {
        Ok(value / parts)
    } else {
        Err(PlanError::NotDivisible {
            what,
            value,
            parts,
            by,
        })
    }
}

impl ShardPlan {
    /// The plan of `layout` for `config`'s model: KV heads and the intermediate size must divide by
    /// `tp`, the experts by `ep` (a dense model has one), the vocabulary by `tp * ep`.
    pub fn new(config: &ModelConfig, layout: Layout) -> Result<Self, PlanError> {
        if layout.tp == 0 {
            return Err(PlanError::Zero {
                what: "tensor-parallel size",
            });
        }
        if layout.ep == 0 {
            return Err(PlanError::Zero {
                what: "expert-parallel size",
            });
        }
        const TP: &str = "tensor parallel";
        const EP: &str = "expert parallel";
        const WORLD: &str = "tensor x expert parallel";
        let (tp, ep, world) = (layout.tp, layout.ep, layout.world());
        let kv = split("num_key_value_heads", config.num_kv_heads, tp, TP)?;
        let heads = kv * config.group_size();
        let inter = split("intermediate_size", config.intermediate_size, tp, TP)?;
        let experts = split("num_local_experts", config.num_experts.max(1), ep, EP)?;
        let vocab = split("vocab_size", config.vocab_size, world, WORLD)?;
        let hd = config.head_dim;
        let ranks = (0..world)
            .map(|rank| {
                let (t, p) = (rank % tp, rank / tp);
                RankShard {
                    rank,
                    tp_rank: t,
                    ep_rank: p,
                    heads: t * heads..(t + 1) * heads,
                    kv_heads: t * kv..(t + 1) * kv,
                    q_rows: t * heads * hd..(t + 1) * heads * hd,
                    kv_rows: t * kv * hd..(t + 1) * kv * hd,
                    experts: p * experts..(p + 1) * experts,
                    inter: t * inter..(t + 1) * inter,
                    vocab: rank * vocab..(rank + 1) * vocab,
                }
            })
            .collect();
        Ok(ShardPlan { layout, ranks })
    }

    /// The ranks of TP group `ep_rank`, in rank order.
    pub fn tp_group(&self, ep_rank: usize) -> Range<usize> {
        ep_rank * self.layout.tp..(ep_rank + 1) * self.layout.tp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn config(kv_heads: usize, experts: usize, inter: usize) -> ModelConfig {
        let text = format!(
            r#"{{"architectures":["MixtralForCausalLM"],"hidden_size":64,"intermediate_size":{inter},
            "num_hidden_layers":2,"num_attention_heads":8,"num_key_value_heads":{kv_heads},
            "num_local_experts":{experts},"num_experts_per_tok":2,"vocab_size":512,
            "max_position_embeddings":128}}"#
        );
        ModelConfig::from_json_str(&text, "config.json".as_ref()).unwrap()
    }

    #[test]
    fn tp_splits_kv_head_groups_and_intermediate_rows_ep_whole_experts() {
        let c = config(4, 8, 96);
        let plan = ShardPlan::new(&c, Layout { tp: 2, ep: 2 }).unwrap();
        assert_eq!(plan.ranks.len(), 4);
        let r3 = &plan.ranks[3];
        assert_eq!((r3.tp_rank, r3.ep_rank), (1, 1));
        assert_eq!(r3.kv_heads, 2..4);
        assert_eq!(r3.heads, 4..8, "query heads follow their KV heads");
        assert_eq!(r3.q_rows, 4 * 8..8 * 8);
        assert_eq!(r3.kv_rows, 2 * 8..4 * 8);
        assert_eq!(r3.experts, 4..8);
        assert_eq!(r3.inter, 48..96);
        assert_eq!(r3.vocab, 384..512);
        assert_eq!(plan.tp_group(1), 2..4);
        // Every query head, KV head, intermediate row and token id owned exactly once per group.
        for p in 0..2 {
            let group = &plan.ranks[plan.tp_group(p)];
            let heads: Vec<usize> = group.iter().flat_map(|r| r.heads.clone()).collect();
            assert_eq!(heads, (0..8).collect::<Vec<_>>());
        }
        let vocab: Vec<usize> = plan.ranks.iter().flat_map(|r| r.vocab.clone()).collect();
        assert_eq!(vocab, (0..512).collect::<Vec<_>>());
    }

    #[test]
    fn sizes_that_do_not_divide_are_named() {
        let c = config(2, 8, 96);
        let e = ShardPlan::new(&c, Layout { tp: 4, ep: 1 }).unwrap_err();
        assert_eq!(
            e,
            PlanError::NotDivisible {
                what: "num_key_value_heads",
                value: 2,
                parts: 4,
                by: "tensor parallel"
            }
        );
        assert!(e.to_string().contains("num_key_value_heads = 2"), "{e}");
        let e = ShardPlan::new(&config(4, 8, 90), Layout { tp: 4, ep: 1 }).unwrap_err();
        assert!(e.to_string().contains("intermediate_size = 90"), "{e}");
        let e = ShardPlan::new(&config(4, 8, 96), Layout { tp: 1, ep: 3 }).unwrap_err();
        assert!(e.to_string().contains("num_local_experts = 8"), "{e}");
        let e = ShardPlan::new(&c, Layout { tp: 0, ep: 1 }).unwrap_err();
        assert_eq!(
            e,
            PlanError::Zero {
                what: "tensor-parallel size"
            }
        );
    }
}
