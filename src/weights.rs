//! The typed weights of a Mixtral-family model, taken from a [`Checkpoint`] in one pass and checked
//! against the [`ModelConfig`]: every expected tensor present, with exactly the expected shape.
//!
//! Shapes (Hub layout, projections stored `[out, in]`): embedding and LM head `[vocab, hidden]`;
//! norms `[hidden]`; q/o `[heads * head_dim, hidden]` / `[hidden, heads * head_dim]`; k/v
//! `[kv_heads * head_dim, hidden]`; router `[experts, hidden]`; expert w1/w3
//! `[intermediate, hidden]`, w2 `[hidden, intermediate]`. A dense Mistral checkpoint's
//! `mlp.{gate,up,down}_proj` become the single expert's w1, w3, w2. Tensors the model does not use
//! (e.g. rotary `inv_freq` buffers) are ignored; tensors may mix dtypes.
//!
//! The MoE tensors are named in one of the forms of [`names::MoeForm`] (w1 = `gate_proj`,
//! w3 = `up_proj`, w2 = `down_proj`; or 3-D fused experts), detected once per checkpoint from the
//! names present ([`names::MoeForm::detect`]); every name is then resolved through that form.
//!
//! Uses [`crate::config`], [`crate::checkpoint`] and [`crate::dtype`]; the quantized loader
//! ([`crate::quant::load`]) builds on this module, never the reverse.

use crate::checkpoint::{Checkpoint, LoadProgress, TensorView};
use crate::config::{Architecture, ModelConfig};
use crate::dtype::{RawDType, WeightSlice};
use names::{ExpertSource, MoeForm};
use std::path::PathBuf;

pub mod names;

/// The name and exact shape of one tensor a model needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Checkpoint name (of the 3-D tensor holding it, for a [`Block`]).
    pub name: String,
    /// Shape: `[n]` for vectors, `[rows, cols]` for matrices.
    pub shape: Vec<usize>,
    /// `Some` when the matrix is stored as part of a 3-D tensor (fused experts).
    pub block: Option<Block>,
}

/// Where a matrix `[rows, cols]` lies inside a stored 3-D tensor `[count, rows_per, cols]`: rows
/// `first_row..first_row + rows` of matrix `index` (contiguous, so it is viewed without a copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// Shape of the stored tensor.
    pub stored: [usize; 3],
    /// Which matrix (the expert).
    pub index: usize,
    /// Its first row within that matrix.
    pub first_row: usize,
}

impl TensorSpec {
    fn vector(name: impl Into<String>, n: usize) -> Self {
        TensorSpec {
            name: name.into(),
            shape: vec![n],
            block: None,
        }
    }
    fn matrix(name: impl Into<String>, rows: usize, cols: usize) -> Self {
        TensorSpec {
            name: name.into(),
            shape: vec![rows, cols],
            block: None,
        }
    }
    /// Expert matrix `[rows, cols]` stored at `source`, out of `experts` (for a fused tensor).
    fn expert(source: ExpertSource, rows: usize, cols: usize, experts: usize) -> Self {
        match source {
            ExpertSource::Module(module) => {
                TensorSpec::matrix(format!("{module}.weight"), rows, cols)
            }
            ExpertSource::Fused {
                tensor,
                expert,
                part,
                parts,
            } => {
                let (rows_per, first_row) = (parts * rows, part * rows);
                TensorSpec {
                    name: tensor,
                    shape: vec![rows, cols],
                    block: Some(Block {
                        stored: [experts, rows_per, cols],
                        index: expert,
                        first_row,
                    }),
                }
            }
        }
    }
}

/// One expert's three matrices.
#[derive(Debug, Clone)]
pub struct ExpertLayout {
    /// `[intermediate, hidden]`.
    pub w1: TensorSpec,
    /// `[hidden, intermediate]`.
    pub w2: TensorSpec,
    /// `[intermediate, hidden]`.
    pub w3: TensorSpec,
}

/// The tensors of one decoder layer.
#[derive(Debug, Clone)]
pub struct LayerLayout {
    /// `[hidden]`.
    pub attn_norm: TensorSpec,
    /// `[heads * head_dim, hidden]`.
    pub q_proj: TensorSpec,
    /// `[kv_heads * head_dim, hidden]`.
    pub k_proj: TensorSpec,
    /// `[kv_heads * head_dim, hidden]`.
    pub v_proj: TensorSpec,
    /// `[hidden, heads * head_dim]`.
    pub o_proj: TensorSpec,
    /// `[hidden]`.
    pub ffn_norm: TensorSpec,
    /// `[experts, hidden]`; `None` for the dense case.
    pub router: Option<TensorSpec>,
    /// One per expert (one for the dense case).
    pub experts: Vec<ExpertLayout>,
}

/// Every tensor a model of a given configuration needs, with its name and shape.
#[derive(Debug, Clone)]
pub struct ModelLayout {
    /// How the MoE tensors are named (irrelevant for a dense model).
    pub form: MoeForm,
    /// `[vocab, hidden]`.
    pub embed: TensorSpec,
    /// Decoder layers.
    pub layers: Vec<LayerLayout>,
    /// `[hidden]`.
    pub final_norm: TensorSpec,
    /// `[vocab, hidden]`; `None` when tied to the embedding.
    pub lm_head: Option<TensorSpec>,
}

impl ModelLayout {
    /// The layout of `config`'s model, MoE tensors named in the classic form.
    pub fn new(config: &ModelConfig) -> Self {
        Self::with_form(config, MoeForm::Classic)
    }

    /// The layout of `config`'s model as `checkpoint` names it ([`MoeForm::detect`]; a dense model
    /// has one form). A fused checkpoint's 3-D expert tensors must be stored unquantized.
    pub fn for_checkpoint(
        checkpoint: &Checkpoint,
        config: &ModelConfig,
    ) -> Result<Self, WeightsError> {
        let moe = config.architecture != Architecture::Mistral && config.num_layers > 0;
        let form = if moe {
            MoeForm::detect(checkpoint)?
        } else {
            MoeForm::Classic
        };
        let layout = Self::with_form(config, form);
        if form == MoeForm::Fused {
            for spec in layout.tensors() {
                let raw = spec
                    .block
                    .as_ref()
                    .and_then(|_| checkpoint.raw_tensor(&spec.name));
                if let Some(raw) = raw.filter(|r| r.dtype().float().is_none()) {
                    return Err(WeightsError::QuantizedFused {
                        path: raw.path().to_path_buf(),
                        tensor: spec.name.clone(),
                        dtype: raw.dtype(),
                    });
                }
            }
        }
        Ok(layout)
    }

    /// The layout of `config`'s model, MoE tensors named in `form`.
    pub fn with_form(config: &ModelConfig, form: MoeForm) -> Self {
        let hidden = config.hidden_size;
        let inter = config.intermediate_size;
        let layers = (0..config.num_layers)
            .map(|i| {
                let dense = config.architecture == Architecture::Mistral;
                let mlp = |e: usize, n: u8, rows, cols| {
                    if dense {
                        TensorSpec::matrix(names::dense_mlp(i, n), rows, cols)
                    } else {
                        TensorSpec::expert(form.expert(i, e, n), rows, cols, config.num_experts)
                    }
                };
                LayerLayout {
                    attn_norm: TensorSpec::vector(names::attn_norm(i), hidden),
                    q_proj: TensorSpec::matrix(names::attn_proj(i, 'q'), config.q_width(), hidden),
                    k_proj: TensorSpec::matrix(names::attn_proj(i, 'k'), config.kv_width(), hidden),
                    v_proj: TensorSpec::matrix(names::attn_proj(i, 'v'), config.kv_width(), hidden),
                    o_proj: TensorSpec::matrix(names::attn_proj(i, 'o'), hidden, config.q_width()),
                    ffn_norm: TensorSpec::vector(names::ffn_norm(i), hidden),
                    router: (!dense)
                        .then(|| TensorSpec::matrix(form.router(i), config.num_experts, hidden)),
                    experts: (0..if dense { 1 } else { config.num_experts })
                        .map(|e| ExpertLayout {
                            w1: mlp(e, 1, inter, hidden),
                            w2: mlp(e, 2, hidden, inter),
                            w3: mlp(e, 3, inter, hidden),
                        })
                        .collect(),
                }
            })
            .collect();
        ModelLayout {
            form,
            embed: TensorSpec::matrix(names::EMBED, config.vocab_size, hidden),
            layers,
            final_norm: TensorSpec::vector(names::FINAL_NORM, hidden),
            lm_head: (!config.tie_word_embeddings)
                .then(|| TensorSpec::matrix(names::LM_HEAD, config.vocab_size, hidden)),
        }
    }

    /// Every tensor, in checkpoint order (embedding, layers, final norm, LM head). In the fused
    /// form each expert matrix is a [`Block`] of a 3-D tensor, so those names repeat.
    pub fn tensors(&self) -> Vec<&TensorSpec> {
        let mut out = vec![&self.embed];
        for l in &self.layers {
            out.extend([&l.attn_norm, &l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj]);
            out.push(&l.ffn_norm);
            out.extend(l.router.as_ref());
            for e in &l.experts {
                out.extend([&e.w1, &e.w2, &e.w3]);
            }
        }
        out.push(&self.final_norm);
        out.extend(self.lm_head.as_ref());
        out
    }
}

/// A weight tensor whose whole shape was checked: `[rows, cols]` (vectors have `rows == 1`).
#[derive(Debug, Clone)]
pub struct Weight {
    /// Rows (output features for a projection).
    pub rows: usize,
    /// Columns (input features for a projection).
    pub cols: usize,
    /// Where the data lives.
    pub tensor: TensorView,
}

impl Weight {
    /// The elements, row-major `[rows, cols]`.
    pub fn data(&self) -> WeightSlice<'_> {
        self.tensor.data()
    }
}

/// One SwiGLU expert: `w2( silu(w1 x) * (w3 x) )`.
#[derive(Debug, Clone)]
pub struct ExpertWeights {
    /// Gate projection `[intermediate, hidden]`.
    pub w1: Weight,
    /// Down projection `[hidden, intermediate]`.
    pub w2: Weight,
    /// Up projection `[intermediate, hidden]`.
    pub w3: Weight,
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// RMSNorm before attention `[hidden]`.
    pub attn_norm: Weight,
    /// `[heads * head_dim, hidden]`.
    pub q_proj: Weight,
    /// `[kv_heads * head_dim, hidden]`.
    pub k_proj: Weight,
    /// `[kv_heads * head_dim, hidden]`.
    pub v_proj: Weight,
    /// `[hidden, heads * head_dim]`.
    pub o_proj: Weight,
    /// RMSNorm before the MoE block `[hidden]`.
    pub ffn_norm: Weight,
    /// Router `[experts, hidden]`; `None` for the dense (one-expert) case.
    pub router: Option<Weight>,
    /// The experts (one for the dense case).
    pub experts: Vec<ExpertWeights>,
}

/// All weights of a model.
#[derive(Debug)]
pub struct ModelWeights {
    /// The configuration the weights were checked against.
    pub config: ModelConfig,
    /// Token embedding `[vocab, hidden]`.
    pub embed: Weight,
    /// Decoder layers.
    pub layers: Vec<LayerWeights>,
    /// Final RMSNorm `[hidden]`.
    pub final_norm: Weight,
    /// LM head `[vocab, hidden]` (the embedding when tied).
    pub lm_head: Weight,
}

/// A tensor missing or of the wrong shape.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The checkpoint has no tensor of this name.
    #[error("tensor `{tensor}` is missing from the checkpoint")]
    Missing {
        /// The tensor name.
        tensor: String,
    },
    /// The tensor's shape differs from what the configuration implies.
    #[error("{path}: tensor `{tensor}` has shape {found:?}, the config implies {expected:?}")]
    Shape {
        /// The file holding it.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// Shape implied by the configuration.
        expected: Vec<usize>,
        /// Shape in the checkpoint.
        found: Vec<usize>,
    },
    /// The MoE tensors are named in none of the forms the loader knows.
    #[error(
        "the checkpoint's MoE tensors are named in no known form; found {found}; known forms \
         (N = layer, E = expert, under `model.layers.N.`): {known}"
    )]
    UnknownForm {
        /// The first layer's feed-forward tensor names (or the checkpoint's first names).
        found: String,
        /// The known forms, in words.
        known: String,
    },
    /// Tensors of more than one naming form are present.
    #[error("the checkpoint holds MoE tensors named in several forms: {}", forms.join("; "))]
    AmbiguousForm {
        /// The forms found, in words.
        forms: Vec<String>,
    },
    /// Fused 3-D experts stored in a quantized type (only BF16, F16 and F32 are read).
    #[error(
        "{path}: tensor `{tensor}` holds fused experts stored as {dtype}; fused experts are read \
         only unquantized (BF16, F16, F32)"
    )]
    QuantizedFused {
        /// The file holding it.
        path: PathBuf,
        /// The 3-D tensor.
        tensor: String,
        /// Its dtype.
        dtype: RawDType,
    },
}

/// Looks up `spec` in `checkpoint` and checks its shape (for a [`Block`], the stored tensor's, then
/// views the block).
pub(crate) fn take(checkpoint: &Checkpoint, spec: &TensorSpec) -> Result<Weight, WeightsError> {
    let tensor = checkpoint
        .tensor(&spec.name)
        .ok_or_else(|| WeightsError::Missing {
            tensor: spec.name.clone(),
        })?;
    if let Some(block) = &spec.block {
        return take_block(tensor, spec, block);
    }
    if tensor.shape() != spec.shape.as_slice() {
        return Err(WeightsError::Shape {
            path: tensor.path().to_path_buf(),
            tensor: spec.name.clone(),
            expected: spec.shape.clone(),
            found: tensor.shape().to_vec(),
        });
    }
    // Layout specs are vectors `[n]` or matrices `[rows, cols]`.
    let (rows, cols) = match spec.shape.as_slice() {
        [r, c] => (*r, *c),
        other => (1, other.iter().product()),
    };
    Ok(Weight {
        rows,
        cols,
        tensor: tensor.clone(),
    })
}

/// The matrix `block` of the 3-D `tensor`, `spec.shape` `[rows, cols]`, viewed without a copy.
fn take_block(
    tensor: &TensorView,
    spec: &TensorSpec,
    block: &Block,
) -> Result<Weight, WeightsError> {
    let shape_error = || WeightsError::Shape {
        path: tensor.path().to_path_buf(),
        tensor: spec.name.clone(),
        expected: block.stored.to_vec(),
        found: tensor.shape().to_vec(),
    };
    let &[rows, cols] = spec.shape.as_slice() else {
        return Err(shape_error());
    };
    if tensor.shape() != block.stored.as_slice() {
        return Err(shape_error());
    }
    let name = format!(
        "{}[{}][{}..{}]",
        spec.name,
        block.index,
        block.first_row,
        block.first_row + rows
    );
    let view = tensor
        .block(name, [rows, cols], (block.index, block.first_row))
        .ok_or_else(shape_error)?;
    Ok(Weight {
        rows,
        cols,
        tensor: view,
    })
}

impl ModelWeights {
    /// Takes every weight of `config`'s model from `checkpoint`, checking names and shapes, the MoE
    /// tensors named in whichever known form the checkpoint uses ([`ModelLayout::for_checkpoint`]).
    /// With `tie_word_embeddings` the LM head is the embedding (a stored `lm_head.weight` is
    /// ignored); tensors the model does not use are ignored.
    pub fn from_checkpoint(
        checkpoint: &Checkpoint,
        config: &ModelConfig,
    ) -> Result<Self, WeightsError> {
        let layout = ModelLayout::for_checkpoint(checkpoint, config)?;
        let layers = layout
            .layers
            .iter()
            .map(|l| {
                Ok(LayerWeights {
                    attn_norm: take(checkpoint, &l.attn_norm)?,
                    q_proj: take(checkpoint, &l.q_proj)?,
                    k_proj: take(checkpoint, &l.k_proj)?,
                    v_proj: take(checkpoint, &l.v_proj)?,
                    o_proj: take(checkpoint, &l.o_proj)?,
                    ffn_norm: take(checkpoint, &l.ffn_norm)?,
                    router: l.router.as_ref().map(|r| take(checkpoint, r)).transpose()?,
                    experts: l
                        .experts
                        .iter()
                        .map(|e| {
                            Ok(ExpertWeights {
                                w1: take(checkpoint, &e.w1)?,
                                w2: take(checkpoint, &e.w2)?,
                                w3: take(checkpoint, &e.w3)?,
                            })
                        })
                        .collect::<Result<_, WeightsError>>()?,
                })
            })
            .collect::<Result<_, WeightsError>>()?;
        let embed = take(checkpoint, &layout.embed)?;
        let lm_head = match &layout.lm_head {
            Some(spec) => take(checkpoint, spec)?,
            None => embed.clone(),
        };
        Ok(ModelWeights {
            config: config.clone(),
            embed,
            layers,
            final_norm: take(checkpoint, &layout.final_norm)?,
            lm_head,
        })
    }

    /// Every weight, in checkpoint order; the LM head appears even when it is the embedding.
    pub fn all(&self) -> Vec<&Weight> {
        let mut out = vec![&self.embed];
        for l in &self.layers {
            out.extend([&l.attn_norm, &l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj]);
            out.push(&l.ffn_norm);
            out.extend(l.router.as_ref());
            for e in &l.experts {
                out.extend([&e.w1, &e.w2, &e.w3]);
            }
        }
        out.push(&self.final_norm);
        out.push(&self.lm_head);
        out
    }

    /// Bytes of weight data, each tensor counted once (a tied LM head is not counted twice).
    pub fn total_bytes(&self) -> u64 {
        self.distinct()
            .iter()
            .map(|w| w.tensor.stored_bytes() as u64)
            .sum()
    }

    /// [`ModelWeights::all`] without repeats of the same bytes (a tied LM head).
    fn distinct(&self) -> Vec<&Weight> {
        let mut out = self.all();
        if self.lm_head.tensor.same_data(&self.embed.tensor) {
            out.pop();
        }
        out
    }
}

/// Bytes between two progress reports.
const PROGRESS_STEP: u64 = 64 << 20;
/// Stride of the prefetch touch (the smallest common page size).
const PAGE: usize = 4096;

impl ModelWeights {
    /// Reads every weight page once (so the first token does not pay the page faults), reporting
    /// progress as it goes: about every 64 MiB, and once at the end with `done_bytes == total_bytes`.
    pub fn prefetch(&self, progress: &dyn Fn(LoadProgress)) {
        // Owned data (dequantized or packed projections) is already in memory.
        let weights: Vec<&Weight> = self
            .distinct()
            .into_iter()
            .filter(|w| !w.tensor.is_owned())
            .collect();
        let total_bytes = weights.iter().map(|w| w.tensor.bytes().len() as u64).sum();
        let mut done_bytes = 0u64;
        let mut reported = 0u64;
        let mut checksum = 0u8;
        for w in weights {
            w.tensor.will_need();
            // The first and last byte of each 4 KiB step: every page the tensor overlaps.
            for page in w.tensor.bytes().chunks(PAGE) {
                let ends = [page.first(), page.last()];
                for b in ends.into_iter().flatten() {
                    checksum = checksum.wrapping_add(*b);
                }
                done_bytes += page.len() as u64;
                if done_bytes - reported >= PROGRESS_STEP {
                    reported = done_bytes;
                    progress(LoadProgress {
                        done_bytes,
                        total_bytes,
                    });
                }
            }
        }
        std::hint::black_box(checksum);
        progress(LoadProgress {
            done_bytes,
            total_bytes,
        });
    }
}
