//! One rank's part of the model's weights ([`RankWeights`]), cut out of the full
//! [`ModelWeights`] by its [`RankShard`]: whole replicated tensors, row shards (q/k/v, w1/w3, the
//! embedding and LM head by vocabulary) and column shards (o_proj, w2).
//!
//! A rank touches only its own bytes, and every read is recorded in a [`ReadLog`]:
//! - memory-mapped float tensors: a row shard is a sub-slice of the mapping (no copy; the rank's
//!   kernels read only those rows; data at an offset not aligned for its type is copied, rows
//!   only), a column shard copies each row's owned columns;
//! - quantized matrices held in the packed layout ([`crate::packed`]): the owned rows, or for
//!   8-bit formats and 4-bit formats without act-order the owned columns (whole 4-bit groups), are
//!   copied out of the codes and parameters and stay packed: [`Part::matrix`] gives the products
//!   the packed form, as the unsharded engines read the whole matrix, and [`Part::data`]
//!   dequantizes only when elements are asked for. A 4-bit act-order matrix (GPTQ `g_idx`) stores
//!   its columns permuted and cannot be split by columns; neither can 4-bit groups cut by the
//!   shard boundary: both are [`ShardWeightError::Unsliceable`] naming the tensor.

use super::plan::RankShard;
use crate::checkpoint::TensorView;
use crate::cpu::packed_matmul::Matrix;
use crate::dtype::{DType, WeightSlice};
use crate::packed::{PackedKind, PackedMatrix};
use crate::weights::{ModelWeights, Weight};
use half::{bf16, f16};
use std::ops::Range;
use std::sync::Arc;

/// A weight that cannot be split the way the plan asks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardWeightError {
    /// The storage format cannot be cut this way.
    #[error("tensor `{tensor}` ({format}) cannot be sharded by {how}: {reason}")]
    Unsliceable {
        /// The tensor.
        tensor: String,
        /// Its format (`int4 act-order`, `int4 groups of 128`, ...).
        format: String,
        /// `rows` or `columns`.
        how: &'static str,
        /// Why not.
        reason: String,
    },
}

/// One recorded read: bytes `bytes` of the stored data of `tensor` (for a packed matrix, of its
/// codes (`<name> codes`) or of its f32 parameters (`<name> params`)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// The tensor (with ` codes` / ` params` for the parts of a packed matrix).
    pub tensor: String,
    /// Byte range within that data.
    pub bytes: Range<usize>,
}

/// Every read a rank made while taking its weights.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadLog {
    /// The reads, in order.
    pub reads: Vec<Read>,
}

impl ReadLog {
    /// Bytes read in all.
    pub fn total_bytes(&self) -> u64 {
        self.reads.iter().map(|r| r.bytes.len() as u64).sum()
    }

    fn record(&mut self, tensor: &str, bytes: Range<usize>) {
        if !bytes.is_empty() {
            self.reads.push(Read {
                tensor: tensor.to_string(),
                bytes,
            });
        }
    }
}

/// Elements owned in memory, in the precision they were stored in.
#[derive(Debug, Clone)]
enum Owned {
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    F32(Vec<f32>),
}

/// A rank's piece of one tensor, row-major `[rows, cols]`.
#[derive(Debug, Clone)]
pub struct Part {
    /// The tensor it is cut from and which piece (`... rows 0..64`, `... columns 32..64`).
    name: String,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    data: PartData,
}

#[derive(Debug, Clone)]
enum PartData {
    /// Elements `elements` of a memory-mapped (or owned, or packed) tensor.
    Mapped {
        tensor: TensorView,
        elements: Range<usize>,
    },
    /// A copy.
    Owned(Owned),
}

impl Part {
    /// The tensor it is cut from and which piece, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The elements (a packed part's are dequantized on the first call and kept).
    pub fn data(&self) -> WeightSlice<'_> {
        match &self.data {
            PartData::Mapped { tensor, elements } => tensor.data().slice(elements.clone()),
            PartData::Owned(Owned::BF16(v)) => WeightSlice::BF16(v),
            PartData::Owned(Owned::F16(v)) => WeightSlice::F16(v),
            PartData::Owned(Owned::F32(v)) => WeightSlice::F32(v),
        }
    }

    /// The matrix a product reads: the packed codes of a quantized part (never dequantized), or
    /// the elements.
    pub fn matrix(&self) -> Matrix<'_> {
        match self.packed() {
            Some(packed) => Matrix::Packed(packed),
            None => Matrix::Dense(self.data()),
        }
    }

    /// The packed form of a quantized part, else `None`.
    pub fn packed(&self) -> Option<&PackedMatrix> {
        match &self.data {
            PartData::Mapped { tensor, .. } => tensor.packed().map(|p| &**p),
            PartData::Owned(_) => None,
        }
    }

    /// Bytes the part holds itself: 0 for a view of the mapping, the codes and parameters of a
    /// packed part (its elements are not kept), the elements of a copy.
    pub fn owned_bytes(&self) -> usize {
        match &self.data {
            PartData::Mapped { tensor, .. } => match tensor.packed() {
                Some(packed) => packed.stored_bytes(),
                None => 0,
            },
            PartData::Owned(o) => match o {
                Owned::BF16(v) => v.len() * 2,
                Owned::F16(v) => v.len() * 2,
                Owned::F32(v) => v.len() * 4,
            },
        }
    }
}

/// The whole of `w`.
fn whole(w: &Weight, log: &mut ReadLog) -> Result<Part, ShardWeightError> {
    rows(w, 0..w.rows, log)
}

/// Rows `range` of `w`.
fn rows(w: &Weight, range: Range<usize>, log: &mut ReadLog) -> Result<Part, ShardWeightError> {
    let name = w.tensor.name();
    let piece = format!("{name} rows {range:?}");
    let n = range.len();
    if let Some(packed) = w.tensor.packed() {
        let (rc, rp) = (packed.row_code_bytes(), packed.row_params());
        let codes = range.start * rc..range.end * rc;
        let params = range.start * rp..range.end * rp;
        log.record(&format!("{name} codes"), codes.clone());
        log.record(&format!("{name} params"), params.start * 4..params.end * 4);
        let part = PackedMatrix {
            kind: packed.kind,
            rows: n,
            cols: packed.cols,
            codes: packed.codes[codes].to_vec(),
            params: packed.params[params].to_vec(),
            perm: packed.perm.clone(),
        };
        return Ok(packed_part(w, part, piece));
    }
    let elements = range.start * w.cols..range.end * w.cols;
    let size = w.tensor.dtype().size();
    let bytes = elements.start * size..elements.end * size;
    log.record(name, bytes.clone());
    let stored = w.tensor.bytes();
    if stored.as_ptr().align_offset(size) != 0 {
        // Data at an offset not aligned for its type: typed views of the whole tensor would copy
        // all of it, so the rank copies its own rows.
        return Ok(Part {
            name: piece,
            rows: n,
            cols: w.cols,
            data: PartData::Owned(owned_copy(w, &stored[bytes])),
        });
    }
    Ok(Part {
        name: piece,
        rows: n,
        cols: w.cols,
        data: PartData::Mapped {
            tensor: w.tensor.clone(),
            elements,
        },
    })
}

/// `bytes` of `w`'s data (whole elements), copied into memory aligned for their type.
fn owned_copy(w: &Weight, bytes: &[u8]) -> Owned {
    match w.tensor.dtype() {
        DType::BF16 => Owned::BF16(bytemuck::pod_collect_to_vec(bytes)),
        DType::F16 => Owned::F16(bytemuck::pod_collect_to_vec(bytes)),
        DType::F32 => Owned::F32(bytemuck::pod_collect_to_vec(bytes)),
    }
}

/// A part of the quantized `w`, held packed; `piece` names it.
fn packed_part(w: &Weight, part: PackedMatrix, piece: String) -> Part {
    let (rows, cols) = (part.rows, part.cols);
    let part = Arc::new(part);
    let name = w.tensor.name();
    match TensorView::from_packed(name, vec![rows, cols], Arc::clone(&part), w.tensor.path()) {
        Some(tensor) => Part {
            name: piece,
            rows,
            cols,
            data: PartData::Mapped {
                tensor,
                elements: 0..rows * cols,
            },
        },
        // Not reached: the shape is the packed matrix's own.
        None => Part {
            name: piece,
            rows,
            cols,
            data: PartData::Owned(Owned::F32(part.dequantize())),
        },
    }
}

/// Columns `range` of `w` (all rows).
fn cols(w: &Weight, range: Range<usize>, log: &mut ReadLog) -> Result<Part, ShardWeightError> {
    if range == (0..w.cols) {
        return whole(w, log);
    }
    let name = w.tensor.name();
    let piece = format!("{name} columns {range:?}");
    let width = range.len();
    if let Some(packed) = w.tensor.packed() {
        return Ok(packed_part(
            w,
            packed_cols(name, packed, range, log)?,
            piece,
        ));
    }
    let size = w.tensor.dtype().size();
    let bytes = w.tensor.bytes();
    let mut copied = Vec::with_capacity(w.rows * width * size);
    for r in 0..w.rows {
        let at = (r * w.cols + range.start) * size..(r * w.cols + range.end) * size;
        log.record(name, at.clone());
        copied.extend_from_slice(&bytes[at]);
    }
    Ok(Part {
        name: piece,
        rows: w.rows,
        cols: width,
        data: PartData::Owned(owned_copy(w, &copied)),
    })
}

/// Columns `range` of a packed matrix, as a packed matrix.
fn packed_cols(
    name: &str,
    packed: &PackedMatrix,
    range: Range<usize>,
    log: &mut ReadLog,
) -> Result<PackedMatrix, ShardWeightError> {
    let unsliceable = |format: String, reason: String| ShardWeightError::Unsliceable {
        tensor: name.to_string(),
        format,
        how: "columns",
        reason,
    };
    let (rc, rp) = (packed.row_code_bytes(), packed.row_params());
    let width = range.len();
    let (code_cols, param_cols) = match packed.kind {
        PackedKind::Fp8 | PackedKind::Int8 => (range.clone(), 0..1),
        PackedKind::Int4 { group_size } | PackedKind::Lut4 { group_size, .. } => {
            // INT4 keeps a (scale, zero) pair per group, LUT4 a scale.
            let (kind, per_group) = if matches!(packed.kind, PackedKind::Int4 { .. }) {
                ("int4", 2)
            } else {
                ("lut4", 1)
            };
            if packed.perm.is_some() {
                return Err(unsliceable(
                    "int4 act-order".into(),
                    "its columns are stored permuted (g_idx), so a column range is not a range of \
                     stored columns"
                        .into(),
                ));
            }
            let whole_groups = |c: usize| c.is_multiple_of(group_size) || c == packed.cols;
            if !whole_groups(range.start)
                || !whole_groups(range.end)
                || !range.start.is_multiple_of(2)
            {
                return Err(unsliceable(
                    format!("{kind} groups of {group_size}"),
                    format!(
                        "columns {}..{} cut a quantization group (or a byte of two codes)",
                        range.start, range.end
                    ),
                ));
            }
            let groups = range.start / group_size..range.end.div_ceil(group_size);
            (
                range.start / 2..range.end / 2,
                groups.start * per_group..groups.end * per_group,
            )
        }
    };
    let mut codes = Vec::with_capacity(packed.rows * code_cols.len());
    let mut params = Vec::with_capacity(packed.rows * param_cols.len());
    for r in 0..packed.rows {
        let c = r * rc + code_cols.start..r * rc + code_cols.end;
        let p = r * rp + param_cols.start..r * rp + param_cols.end;
        log.record(&format!("{name} codes"), c.clone());
        log.record(&format!("{name} params"), p.start * 4..p.end * 4);
        codes.extend_from_slice(&packed.codes[c]);
        params.extend_from_slice(&packed.params[p]);
    }
    Ok(PackedMatrix {
        kind: packed.kind,
        rows: packed.rows,
        cols: width,
        codes,
        params,
        perm: None,
    })
}

/// One expert's parts: w1/w3 rows and w2 columns of the rank's intermediate range.
#[derive(Debug, Clone)]
pub struct RankExpert {
    /// The expert's index in the full model.
    pub id: usize,
    /// `[inter_local, hidden]`.
    pub w1: Part,
    /// `[hidden, inter_local]`.
    pub w2: Part,
    /// `[inter_local, hidden]`.
    pub w3: Part,
}

/// One decoder layer's parts.
#[derive(Debug, Clone)]
pub struct RankLayer {
    /// `[hidden]`, whole.
    pub attn_norm: Part,
    /// `[heads_local * head_dim, hidden]`.
    pub q_proj: Part,
    /// `[kv_heads_local * head_dim, hidden]`.
    pub k_proj: Part,
    /// `[kv_heads_local * head_dim, hidden]`.
    pub v_proj: Part,
    /// `[hidden, heads_local * head_dim]`.
    pub o_proj: Part,
    /// `[hidden]`, whole.
    pub ffn_norm: Part,
    /// `[experts, hidden]`, whole; `None` for a dense model.
    pub router: Option<Part>,
    /// The rank's experts, in increasing id.
    pub experts: Vec<RankExpert>,
}

/// Everything one rank holds.
#[derive(Debug, Clone)]
pub struct RankWeights {
    /// What the rank owns.
    pub shard: RankShard,
    /// `[vocab_local, hidden]`.
    pub embed: Part,
    /// The decoder layers.
    pub layers: Vec<RankLayer>,
    /// `[hidden]`, whole.
    pub final_norm: Part,
    /// `[vocab_local, hidden]` (the embedding's part when tied).
    pub lm_head: Part,
}

impl RankWeights {
    /// Takes `shard`'s parts of `weights`, recording every read in `log`.
    pub fn new(
        weights: &ModelWeights,
        shard: &RankShard,
        log: &mut ReadLog,
    ) -> Result<Self, ShardWeightError> {
        let layers = weights
            .layers
            .iter()
            .map(|l| {
                let experts = shard
                    .experts
                    .clone()
                    .map(|id| {
                        let e = &l.experts[id];
                        Ok(RankExpert {
                            id,
                            w1: rows(&e.w1, shard.inter.clone(), log)?,
                            w2: cols(&e.w2, shard.inter.clone(), log)?,
                            w3: rows(&e.w3, shard.inter.clone(), log)?,
                        })
                    })
                    .collect::<Result<_, ShardWeightError>>()?;
                Ok(RankLayer {
                    attn_norm: whole(&l.attn_norm, log)?,
                    q_proj: rows(&l.q_proj, shard.q_rows.clone(), log)?,
                    k_proj: rows(&l.k_proj, shard.kv_rows.clone(), log)?,
                    v_proj: rows(&l.v_proj, shard.kv_rows.clone(), log)?,
                    o_proj: cols(&l.o_proj, shard.q_rows.clone(), log)?,
                    ffn_norm: whole(&l.ffn_norm, log)?,
                    router: l.router.as_ref().map(|r| whole(r, log)).transpose()?,
                    experts,
                })
            })
            .collect::<Result<_, ShardWeightError>>()?;
        let embed = rows(&weights.embed, shard.vocab.clone(), log)?;
        let lm_head = if weights.lm_head.tensor.same_data(&weights.embed.tensor) {
            embed.clone()
        } else {
            rows(&weights.lm_head, shard.vocab.clone(), log)?
        };
        Ok(RankWeights {
            shard: shard.clone(),
            embed,
            layers,
            final_norm: whole(&weights.final_norm, log)?,
            lm_head,
        })
    }
}
