//! One rank of a sharded CUDA engine: what its forward pass adds to the unsharded one.
//!
//! A rank runs the same [`Plan::forward`](super::plan::Plan) over its [`RankWeights`] shard, with
//! the model dimensions of its shard ([`plan_config`]: its query and KV heads, its intermediate
//! rows; all experts for the replicated router and the whole vocabulary for the logits) and a
//! [`RankPlan`] naming what it holds of the rest (its token ids, its experts) and its
//! collectives, issued on the engine's stream at the points of the CPU rank
//! ([`crate::shard::rank`]), so a decode graph captures them with the kernels:
//! - the embedding: rows of the rank's token ids (zeros for the others), `[T, hidden]` f32,
//!   all-reduced over the world;
//! - after o_proj: the rank's partial `[T, hidden]` f32, all-reduced over its TP group;
//! - after the experts: the rank's partial expert slots `[T, top_k, hidden]` f32 (zeros for slots
//!   routed to other ranks' experts), all-reduced over the world;
//! - the LM head: the rank's vocabulary columns `[R, vocab / world]`, all-gathered over the world
//!   into the logits `[R, vocab]` row by row, before the argmax and sampling.
//!
//! A rank's stacks are stored as a whole model's would be ([`formats`]): packed where its parts of
//! a quantized checkpoint are packed in a kind the kernels read, bf16 otherwise (and for random
//! weights); they are uploaded by the same [`upload_weights`](super::upload::upload_weights). The
//! router is whole, `[experts, hidden]`.

use std::ops::Range;

use cudarc::driver::CudaStream;

use super::super::error::CudaError;
use super::super::memory::{DeviceArena, DeviceBuffer, Rows, ViewMut};
use super::matrix::StackFormat;
use super::upload::{allocate_weights, weight_formats, GpuWeights, LayerFormats};
use crate::config::ModelConfig;
use crate::shard::{RankShard, RankWeights};

/// Which group of ranks a collective spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Every rank (the embedding, the experts, the LM head).
    World,
    /// The rank's tensor-parallel group (attention).
    Tp,
}

/// The collectives a rank's forward pass issues, on device memory, ordered on the engine's
/// stream (and so captured into its decode graphs). Every rank of a group issues the same calls
/// in the same order with buffers of the same length.
pub trait DeviceCollectives: Send + std::fmt::Debug {
    /// A function that aborts every communicator of the rank, from any thread: a collective
    /// blocked on a dead or stuck peer then returns (with an error), and later ones fail. The
    /// rank's watchdog calls it when a step waits past its timeout.
    fn aborter(&self) -> Box<dyn Fn() + Send>;

    /// Ranks in `group`.
    fn size(&self, group: Group) -> usize;

    /// Replaces `buf` by its element-wise sum over `group`.
    fn all_reduce(
        &self,
        group: Group,
        stream: &CudaStream,
        buf: ViewMut<'_, f32>,
    ) -> Result<(), CudaError>;

    /// Fills each row of `out` (`[part.rows(), size * part.width()]`, world group) with every
    /// rank's row of `part`, in rank order.
    fn all_gather_rows(
        &self,
        stream: &CudaStream,
        part: Rows<'_, f32>,
        out: ViewMut<'_, f32>,
    ) -> Result<(), CudaError>;
}

/// What a rank's forward pass needs besides the unsharded plan.
#[derive(Debug)]
pub struct RankPlan {
    /// Token ids whose embedding and LM-head rows the rank holds.
    pub vocab: Range<usize>,
    /// Experts whose stacks the rank holds (indices into the router's experts).
    pub experts: Range<usize>,
    /// True when other ranks hold other experts: the slots routed to them stay zero here.
    pub partial_experts: bool,
    /// The rank's groups.
    pub comms: Box<dyn DeviceCollectives>,
    /// `[max_tokens, vocab.len()]` the rank's logits columns.
    pub logits_part: DeviceBuffer<f32>,
}

/// The first `len` elements of `buf`, for `what` (named in the error when `buf` is shorter).
fn prefix<'a>(
    buf: &'a mut DeviceBuffer<f32>,
    len: usize,
    what: &str,
) -> Result<ViewMut<'a, f32>, CudaError> {
    let have = buf.len();
    buf.view_mut()
        .sub(0, len)
        .ok_or_else(|| CudaError::Dead(format!("{what} of {len} elements of a buffer of {have}")))
}

impl RankPlan {
    /// Sums the first `len` elements of `buf` over `group`.
    pub fn reduce(
        &self,
        group: Group,
        stream: &CudaStream,
        buf: &mut DeviceBuffer<f32>,
        len: usize,
    ) -> Result<(), CudaError> {
        let view = prefix(buf, len, "an all-reduce")?;
        self.comms.all_reduce(group, stream, view)
    }

    /// Zeroes the first `len` elements of `buf` (stream ordered, capturable).
    pub fn zero(
        &self,
        stream: &CudaStream,
        buf: &mut DeviceBuffer<f32>,
        len: usize,
    ) -> Result<(), CudaError> {
        let view = prefix(buf, len, "zeroing")?;
        // SAFETY: the range lies inside a live, exclusively borrowed allocation; the memset is
        // ordered on `stream` with every kernel touching the buffer.
        unsafe {
            cudarc::driver::result::memset_d8_async(
                view.address(),
                0,
                len * std::mem::size_of::<f32>(),
                stream.cu_stream(),
            )
        }
        .map_err(CudaError::driver("zeroing the expert slots of other ranks"))
    }

    /// Gathers the first `rows` rows of every rank's logits columns into `logits` (`[rows, vocab]`).
    pub fn gather_logits(
        &self,
        stream: &CudaStream,
        rows: usize,
        logits: ViewMut<'_, f32>,
    ) -> Result<(), CudaError> {
        let (part, width) = (self.logits_part.view(), self.vocab.len());
        let have = part.len();
        let part = part.rows(rows, width).ok_or_else(|| {
            CudaError::Dead(format!(
                "{rows} logits rows of {width} in a buffer of {have}"
            ))
        })?;
        self.comms.all_gather_rows(stream, part, logits)
    }
}

/// The dimensions a rank's plan and kernels run with: its query and KV heads and intermediate
/// rows; the experts (the router is replicated) and the vocabulary (the gathered logits) whole.
pub fn plan_config(config: &ModelConfig, shard: &RankShard) -> ModelConfig {
    ModelConfig {
        num_heads: shard.num_heads(),
        num_kv_heads: shard.num_kv_heads(),
        intermediate_size: shard.inter.len(),
        ..config.clone()
    }
}

/// The dimensions of a rank's weight stacks: [`plan_config`] with its own experts and token ids.
fn weight_config(config: &ModelConfig, shard: &RankShard) -> ModelConfig {
    ModelConfig {
        num_experts: if config.num_experts == 0 {
            0
        } else {
            shard.experts.len()
        },
        vocab_size: shard.vocab.len(),
        ..plan_config(config, shard)
    }
}

/// The storage of a rank's stacks: packed where its shard's parts allow (as for a whole model,
/// [`weight_formats`]), bf16 for random weights (`None`).
pub fn formats(config: &ModelConfig, weights: Option<&RankWeights>) -> Vec<LayerFormats> {
    match weights {
        Some(w) => weight_formats(w),
        None => vec![LayerFormats::all(StackFormat::Bf16); config.num_layers],
    }
}

/// Device bytes of a rank's weights stored in `formats` and of its [`RankPlan`] buffers, for chunks
/// of up to `max_tokens` tokens: what [`allocate_rank_weights`] and [`rank_plan`] allocate (run on a
/// sizing arena); `usize::MAX` when a length overflows.
pub fn rank_bytes(
    config: &ModelConfig,
    shard: &RankShard,
    formats: &[LayerFormats],
    max_tokens: usize,
) -> usize {
    DeviceArena::sized(|arena| {
        allocate_rank_weights(config, shard, formats, max_tokens, arena)?;
        logits_part(shard, max_tokens, arena)
    })
}

/// The rank's columns of the logits, `[max_tokens, vocab part]` f32.
fn logits_part(
    shard: &RankShard,
    max_tokens: usize,
    arena: &mut DeviceArena,
) -> Result<DeviceBuffer<f32>, CudaError> {
    arena.zeroed(max_tokens * shard.vocab.len(), "the rank's logits columns")
}

/// Allocates a rank's weight regions in `formats`: the unsharded layout at its shard's sizes, with
/// the whole router.
pub fn allocate_rank_weights(
    config: &ModelConfig,
    shard: &RankShard,
    formats: &[LayerFormats],
    max_tokens: usize,
    arena: &mut DeviceArena,
) -> Result<GpuWeights, CudaError> {
    let w = weight_config(config, shard);
    let mut gpu = allocate_weights(&w, false, formats, max_tokens, arena)?;
    let router = config.num_experts.max(1) * config.hidden_size;
    for (l, layer) in gpu.layers.iter_mut().enumerate() {
        layer.gate = arena.zeroed(router, &format!("layer {l} router"))?;
    }
    Ok(gpu)
}

/// Allocates the [`RankPlan`] of `shard` for chunks of up to `max_tokens` tokens.
pub fn rank_plan(
    config: &ModelConfig,
    shard: &RankShard,
    comms: Box<dyn DeviceCollectives>,
    max_tokens: usize,
    arena: &mut DeviceArena,
) -> Result<RankPlan, CudaError> {
    Ok(RankPlan {
        vocab: shard.vocab.clone(),
        experts: shard.experts.clone(),
        partial_experts: shard.experts.len() < config.num_experts.max(1),
        comms,
        logits_part: logits_part(shard, max_tokens, arena)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::weights::Part;
    use crate::shard::{Layout, ShardPlan};

    fn config() -> ModelConfig {
        let text = r#"{"architectures":["MixtralForCausalLM"],"hidden_size":64,"intermediate_size":96,
            "num_hidden_layers":2,"num_attention_heads":8,"num_key_value_heads":4,
            "num_local_experts":8,"num_experts_per_tok":2,"vocab_size":512,
            "max_position_embeddings":128}"#;
        ModelConfig::from_json_str(text, "config.json".as_ref()).unwrap()
    }

    #[test]
    fn a_rank_runs_its_heads_and_rows_with_every_expert_and_token_id() {
        let c = config();
        let plan = ShardPlan::new(&c, Layout { tp: 2, ep: 2 }).unwrap();
        let shard = &plan.ranks[3];
        let p = plan_config(&c, shard);
        assert_eq!(
            (p.num_heads, p.num_kv_heads, p.intermediate_size),
            (4, 2, 48)
        );
        assert_eq!((p.num_experts, p.vocab_size), (8, 512));
        assert_eq!(p.group_size(), c.group_size());
        let w = weight_config(&c, shard);
        assert_eq!((w.num_experts, w.vocab_size, w.q_width()), (4, 128, 4 * 8));
    }

    /// Every part a rank uploads fills its device region exactly (the regions are sized from
    /// [`weight_config`] the way `allocate_weights` sizes them; a part too large would be refused
    /// by the upload, one too small would leave zeros in the region).
    #[test]
    fn a_ranks_parts_fill_its_device_regions_exactly() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-mixtral");
        let model = crate::Model::load(&dir, &crate::LoadOptions::default()).unwrap();
        let full = &model.config;
        for layout in [
            Layout { tp: 2, ep: 1 },
            Layout { tp: 1, ep: 2 },
            Layout { tp: 2, ep: 4 },
        ] {
            let plan = ShardPlan::new(full, layout).unwrap();
            for shard in &plan.ranks {
                let mut log = crate::shard::ReadLog::default();
                let w = RankWeights::new(&model.weights, shard, &mut log).unwrap();
                let c = weight_config(full, shard);
                let (h, inter) = (c.hidden_size, c.intermediate_size);
                let size = |p: &Part| p.rows * p.cols;
                let what = format!("{layout} rank {}", shard.rank);
                for l in &w.layers {
                    let qkv = size(&l.q_proj) + size(&l.k_proj) + size(&l.v_proj);
                    assert_eq!(qkv, (c.q_width() + 2 * c.kv_width()) * h, "{what}");
                    assert_eq!(size(&l.o_proj), h * c.q_width(), "{what}");
                    let router = l.router.as_ref().map_or(0, size);
                    assert_eq!(router, full.num_experts * h, "{what}: the whole router");
                    assert_eq!(l.experts.len(), c.num_experts.max(1), "{what}");
                    for e in &l.experts {
                        assert_eq!(size(&e.w1), inter * h, "{what}");
                        assert_eq!(size(&e.w3), inter * h, "{what}");
                        assert_eq!((e.w2.rows, e.w2.cols), (h, inter), "{what}");
                    }
                }
                assert_eq!(size(&w.embed), c.vocab_size * h, "{what}");
                assert_eq!(size(&w.lm_head), c.vocab_size * h, "{what}");
                // The plan runs with the whole vocabulary and every expert.
                let p = plan_config(full, shard);
                assert_eq!(
                    (p.vocab_size, p.num_experts),
                    (full.vocab_size, full.num_experts)
                );
            }
        }
    }

    /// A rank of a quantized checkpoint keeps its stacks packed where its parts can be read by the
    /// kernels (8-bit rows: a multiple of 16 columns), and its memory plan counts the packed
    /// bytes, not bf16: the FP8 fixture (hidden 64, intermediate 96, 4 heads of 16) packs every
    /// stack under EP=2, and under TP=2 too (o_proj's 32 and w2's 48 columns per rank).
    #[test]
    fn a_quantized_ranks_stacks_stay_packed_and_its_memory_plan_counts_them() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = root.join("tests/fixtures/quant/fp8-channel");
        let model = crate::Model::load(&dir, &crate::LoadOptions::default()).unwrap();
        let full = &model.config;
        let packed = StackFormat::Packed {
            kind: crate::quant::PackedKind::Fp8,
            perm: false,
        };
        for layout in [Layout { tp: 1, ep: 2 }, Layout { tp: 2, ep: 1 }] {
            let plan = ShardPlan::new(full, layout).unwrap();
            for shard in &plan.ranks {
                let mut log = crate::shard::ReadLog::default();
                let w = RankWeights::new(&model.weights, shard, &mut log).unwrap();
                let f = formats(full, Some(&w));
                assert!(
                    f.iter().all(|l| *l == LayerFormats::all(packed)),
                    "{layout}: {f:?}"
                );
                let bf16 = formats(full, None);
                assert!(rank_bytes(full, shard, &f, 8) < rank_bytes(full, shard, &bf16, 8));
            }
        }
    }
}
