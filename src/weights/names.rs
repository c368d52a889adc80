//! The checkpoint name of every tensor: the one place that spells them, in every naming form a
//! loader accepts. The MoE block's tensors come in the forms of [`MoeForm`] (w1 = `gate_proj`,
//! w3 = `up_proj`, w2 = `down_proj`, or fused 3-D experts), detected once per checkpoint
//! ([`MoeForm::detect`]); the other tensors have one name each.

use super::WeightsError;
use crate::checkpoint::Checkpoint;

/// Token embedding.
pub const EMBED: &str = "model.embed_tokens.weight";
/// Final RMSNorm.
pub const FINAL_NORM: &str = "model.norm.weight";
/// LM head.
pub const LM_HEAD: &str = "lm_head.weight";

fn layer(i: usize, rest: &str) -> String {
    format!("model.layers.{i}.{rest}")
}
/// RMSNorm before attention of layer `i`.
pub fn attn_norm(i: usize) -> String {
    layer(i, "input_layernorm.weight")
}
/// Attention projection `which` (`'q'`, `'k'`, `'v'` or `'o'`) of layer `i`.
pub fn attn_proj(i: usize, which: char) -> String {
    layer(i, &format!("self_attn.{which}_proj.weight"))
}
/// RMSNorm before the feed-forward block of layer `i`.
pub fn ffn_norm(i: usize) -> String {
    layer(i, "post_attention_layernorm.weight")
}
/// Router of layer `i` (classic form).
pub fn router(i: usize) -> String {
    MoeForm::Classic.router(i)
}
/// Expert `e`'s `w{n}` (n = 1, 2, 3) of layer `i` (classic form).
pub fn expert(i: usize, e: usize, n: u8) -> String {
    format!("{}.weight", MoeForm::Classic.module(i, e, n))
}
/// Dense MLP projection of layer `i` (`gate_proj` = w1, `down_proj` = w2, `up_proj` = w3),
/// named by the expert matrix number `n` it stands for.
pub fn dense_mlp(i: usize, n: u8) -> String {
    layer(i, &format!("mlp.{}.weight", proj(n)))
}
/// The projection name of expert matrix `n`: w1 = `gate_proj`, w2 = `down_proj`,
/// w3 = `up_proj`.
fn proj(n: u8) -> &'static str {
    match n {
        1 => "gate_proj",
        2 => "down_proj",
        _ => "up_proj",
    }
}

/// How a checkpoint names the tensors of its MoE blocks (router and experts); one form per
/// checkpoint. `N` is the layer, `E` the expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoeForm {
    /// `model.layers.N.block_sparse_moe.{gate, experts.E.w1/w2/w3}` (the Mixtral release, and
    /// what transformers writes by default).
    Classic,
    /// `model.layers.N.mlp.{gate, experts.E.gate_proj/up_proj/down_proj}` (GPTQModel 7.7 on
    /// transformers 5).
    MlpProj,
    /// `model.layers.N.block_sparse_moe.{gate, experts.E.gate_proj/up_proj/down_proj}`
    /// (llm-compressor on transformers 5).
    SparseMoeProj,
    /// `model.layers.N.mlp.gate` and 3-D `model.layers.N.mlp.experts.gate_up_proj`
    /// `[experts, 2 * intermediate, hidden]` (each expert's w1 rows, then its w3 rows) and
    /// `model.layers.N.mlp.experts.down_proj` `[experts, hidden, intermediate]` (transformers
    /// 5's own module layout, written by `save_pretrained(save_original_format=False)`).
    /// Unquantized (BF16, F16, F32) only.
    Fused,
}

/// Where one expert matrix is stored, in a given [`MoeForm`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpertSource {
    /// A tensor of its own, `<module>.weight`; a quantized one's companions share the module
    /// prefix (`<module>.qweight`, `<module>.weight_scale`, ...).
    Module(String),
    /// Part `part` of `parts` equal runs of rows of matrix `expert` of the 3-D tensor `tensor`
    /// (`gate_up_proj`: 2 parts, w1 then w3; `down_proj`: 1 part, w2).
    Fused {
        /// The 3-D tensor's name.
        tensor: String,
        /// The expert (first dimension).
        expert: usize,
        /// Which run of rows.
        part: usize,
        /// How many runs of rows each matrix holds.
        parts: usize,
    },
}

impl MoeForm {
    /// Every form, in the order detection reports them.
    pub const ALL: [MoeForm; 4] = [
        MoeForm::Classic,
        MoeForm::MlpProj,
        MoeForm::SparseMoeProj,
        MoeForm::Fused,
    ];

    /// The form's names in words, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            MoeForm::Classic => "`block_sparse_moe.gate`, `block_sparse_moe.experts.E.w1/w2/w3`",
            MoeForm::MlpProj => "`mlp.gate`, `mlp.experts.E.gate_proj/up_proj/down_proj`",
            MoeForm::SparseMoeProj => {
                "`block_sparse_moe.gate`, `block_sparse_moe.experts.E.gate_proj/up_proj/down_proj`"
            }
            MoeForm::Fused => {
                "`mlp.gate`, fused 3-D `mlp.experts.gate_up_proj` [E, 2I, H] and \
                 `mlp.experts.down_proj` [E, H, I] (unquantized)"
            }
        }
    }

    /// The MoE block's module within a layer.
    fn block(self) -> &'static str {
        match self {
            MoeForm::Classic | MoeForm::SparseMoeProj => "block_sparse_moe",
            MoeForm::MlpProj | MoeForm::Fused => "mlp",
        }
    }

    /// Router of layer `i`.
    pub fn router(self, i: usize) -> String {
        layer(i, &format!("{}.gate.weight", self.block()))
    }

    /// Module prefix of expert `e`'s `w{n}` in layer `i` for the per-expert forms (for
    /// [`MoeForm::Fused`], the 3-D tensor's name).
    fn module(self, i: usize, e: usize, n: u8) -> String {
        let block = self.block();
        match self {
            MoeForm::Classic => layer(i, &format!("{block}.experts.{e}.w{n}")),
            MoeForm::MlpProj | MoeForm::SparseMoeProj => {
                layer(i, &format!("{block}.experts.{e}.{}", proj(n)))
            }
            MoeForm::Fused => {
                let tensor = if n == 2 { "down_proj" } else { "gate_up_proj" };
                layer(i, &format!("{block}.experts.{tensor}"))
            }
        }
    }

    /// Where expert `e`'s `w{n}` (n = 1, 2, 3) of layer `i` is stored.
    pub fn expert(self, i: usize, e: usize, n: u8) -> ExpertSource {
        let module = self.module(i, e, n);
        match self {
            MoeForm::Fused => ExpertSource::Fused {
                tensor: module,
                expert: e,
                part: usize::from(n == 3),
                parts: if n == 2 { 1 } else { 2 },
            },
            _ => ExpertSource::Module(module),
        }
    }

    /// True when `name` is one of this form's expert tensors of layer 0, expert 0 (any
    /// suffix: `.weight`, `.qweight`, ...; the exact 3-D tensor for the fused form).
    fn marks(self, name: &str) -> bool {
        let module = self.module(0, 0, 1);
        match self {
            MoeForm::Fused => name == module,
            _ => name
                .strip_prefix(module.as_str())
                .is_some_and(|rest| rest.starts_with('.')),
        }
    }

    /// The form of `checkpoint`'s MoE tensors, from the names present (packed types
    /// included): the forms whose first expert tensor of layer 0 is there. Exactly one must be.
    pub fn detect(checkpoint: &Checkpoint) -> Result<MoeForm, WeightsError> {
        let mut all = checkpoint.names();
        all.extend(checkpoint.packed_names());
        let found: Vec<MoeForm> = MoeForm::ALL
            .into_iter()
            .filter(|form| all.iter().any(|name| form.marks(name)))
            .collect();
        match found.as_slice() {
            [one] => Ok(*one),
            [] => Err(WeightsError::UnknownForm {
                found: first_layer_names(&all),
                known: known_forms(),
            }),
            several => Err(WeightsError::AmbiguousForm {
                forms: several.iter().map(|f| f.describe().to_string()).collect(),
            }),
        }
    }
}

/// At most this many names in a message.
const SHOWN: usize = 12;

/// What an unknown-form error shows: layer 0's tensors other than attention and norms (all of
/// the checkpoint's when layer 0 has none), at most [`SHOWN`], with a count of the rest.
fn first_layer_names(all: &[&str]) -> String {
    let prefix = layer(0, "");
    let skip = |n: &str| {
        let rest = n.strip_prefix(prefix.as_str()).unwrap_or(n);
        rest.starts_with("self_attn.") || rest.ends_with("layernorm.weight")
    };
    let mut names: Vec<&str> = all
        .iter()
        .copied()
        .filter(|n| n.starts_with(prefix.as_str()) && !skip(n))
        .collect();
    if names.is_empty() {
        names = all.to_vec();
    }
    names.sort_unstable();
    let mut shown = names
        .iter()
        .take(SHOWN)
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        shown.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    if shown.is_empty() {
        shown.push_str("no tensors");
    }
    shown
}

/// Every known form in words, numbered.
fn known_forms() -> String {
    MoeForm::ALL
        .iter()
        .enumerate()
        .map(|(k, f)| format!("({}) {}", k + 1, f.describe()))
        .collect::<Vec<_>>()
        .join("; ")
}
