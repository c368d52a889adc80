//! Builds [`ModelWeights`] whose quantizable projections (attention q/k/v/o, expert w1/w2/w3) are
//! quantized and held in the packed layout of [`crate::packed`] ([`TensorView::from_packed`]): the
//! GPU engine uploads that layout, the CPU reference engine dequantizes each matrix to f32 the first
//! time it reads it. (Layouts the packed form cannot express are held dequantized instead: GPTQ or
//! compressed-tensors groups that are not equal runs of columns, compressed-tensors 8-bit with
//! groups or zero points, bitsandbytes blocks that straddle rows, and 4-bit on load of a matrix
//! with an odd column count.)
//!
//! Per projection `<p>.weight` (shape `[out, in]` from the config), the first that applies:
//! - `<p>.weight_packed` exists: compressed-tensors `pack-quantized` (see [`compressed`]);
//! - the config declares `awq` and `<p>.qweight` exists: AutoAWQ GEMM (see [`awq`]);
//! - `<p>.qweight` exists: GPTQ 4-bit (see [`int4`]): `<p>.qweight` I32 `[in/8, out]`,
//!   `<p>.qzeros` I32 `[groups, out/8]`, `<p>.scales` float `[groups, out]`, `<p>.g_idx` I32
//!   `[in]` (optional: without it input `k` is in group `k / (in / groups)`);
//! - `<p>.weight` is `U8` beside `<p>.weight.absmax`: bitsandbytes 4-bit (see [`bnb`]);
//! - `<p>.weight` is `F8_E4M3`: FP8 with `<p>.weight_scale` float, per tensor (`[]` or `[1]`) or
//!   per output channel (`[out]` or `[out, 1]`), the `compressed-tensors` layout; an
//!   `<p>.input_scale` (static activation scale) is ignored: activations stay f32 on the CPU;
//! - `<p>.weight` is `I8`: INT8 with `<p>.weight_scale` as for FP8;
//! - `<p>.weight` is a float type: taken as stored, or quantized then dequantized when a format
//!   is asked for ([`fp8::quantize_per_channel`], [`int8::quantize_per_channel`](crate::packed::int8::quantize_per_channel),
//!   [`int4::quantize_rtn`] with groups of 128).
//!
//! Every other tensor is taken exactly as [`ModelWeights::from_checkpoint`] takes it (memory-mapped,
//! no copy) and must be stored in a float type, except a router stored in the bitsandbytes or
//! `pack-quantized` layout, which is dequantized to f32.

use super::{awq, bnb, compressed, packed, QuantError, QuantFormat, QuantMethod};
use crate::checkpoint::{Checkpoint, RawTensor, TensorView};
use crate::config::ModelConfig;
use crate::dtype::RawDType;
use crate::packed::{fp8, int4, LayoutError, PackedMatrix, Q8};
use crate::weights::{
    take, ExpertWeights, LayerWeights, ModelLayout, ModelWeights, TensorSpec, Weight, WeightsError,
};
use rayon::prelude::*;
use std::path::Path;
use std::sync::Arc;

/// How a GPTQ checkpoint stores its zero points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GptqZeros {
    /// The original format (`checkpoint_format` absent or `"gptq"`): the stored value is
    /// `zero - 1`, so dequantization adds 1 back.
    #[default]
    MinusOne,
    /// `checkpoint_format: "gptq_v2"`: the stored value is the zero itself.
    Exact,
}

impl GptqZeros {
    /// What dequantization adds to the stored zero.
    pub fn offset(self) -> i32 {
        match self {
            GptqZeros::MinusOne => 1,
            GptqZeros::Exact => 0,
        }
    }

    /// The convention named by `config.json`'s `quantization_config` (the original format when
    /// the file, the object or `checkpoint_format` is absent); see [`QuantMethod`].
    pub fn from_config_file(path: &Path) -> Result<Self, QuantError> {
        Ok(QuantMethod::from_config_file(path)?.gptq_zeros())
    }
}

/// The format `config.json`'s `quantization_config` declares, when it declares one this crate
/// reads ([`QuantMethod::format`]): GPTQ, AWQ, bitsandbytes 4-bit and compressed-tensors 4-bit
/// `pack-quantized` are INT4, `fp8` and compressed-tensors `float-quantized` FP8,
/// compressed-tensors `int-quantized` and 8-bit `pack-quantized` INT8. `None` otherwise (no file,
/// no object, a method this crate does not read); the tensors themselves decide how a checkpoint
/// is loaded.
pub fn declared_format(path: &Path) -> Option<QuantFormat> {
    QuantMethod::from_config_file(path).ok()?.format()
}

/// The format the weights of the model whose `config.json` is at `path` will have once loaded:
/// `quantize` (quantize-on-load) when given, else the [`declared_format`], else bf16. What the
/// binaries' memory estimates, made before the weights are read, assume.
pub fn loaded_format(path: &Path, quantize: Option<QuantFormat>) -> QuantFormat {
    quantize
        .or_else(|| declared_format(path))
        .unwrap_or(QuantFormat::Bf16)
}

/// The weights and the format their quantized projections are in.
#[derive(Debug)]
pub struct QuantizedWeights {
    /// The weights; quantized projections are held packed (see the module documentation).
    pub weights: ModelWeights,
    /// The format of the first quantized projection found (`None` when none is quantized).
    pub format: Option<QuantFormat>,
}

/// Loads `config`'s weights from `checkpoint` (opened with
/// [`Checkpoint::open_with_packed`] to read pre-quantized tensors), quantizing float projections
/// to `quantize` (`None` or `Some(Bf16)`: keep them as stored). `method` is what the checkpoint's
/// `quantization_config` declares ([`QuantMethod::from_config_file`]).
pub fn load_weights(
    checkpoint: &Checkpoint,
    config: &ModelConfig,
    quantize: Option<QuantFormat>,
    method: &QuantMethod,
) -> Result<QuantizedWeights, QuantError> {
    let quantize = quantize.filter(|f| *f != QuantFormat::Bf16);
    // Module names (and so every `<module>.qweight`, `<module>.weight_scale`, ...) in the
    // checkpoint's naming form.
    let layout = ModelLayout::for_checkpoint(checkpoint, config)?;
    // The format of the first quantized projection seen.
    let format = std::cell::Cell::new(None);
    let seen = |f: Option<QuantFormat>| format.set(format.get().or(f));
    let proj = |spec: &TensorSpec| -> Result<Weight, QuantError> {
        let (w, f) = projection(checkpoint, spec, quantize, method)?;
        seen(f);
        Ok(w)
    };
    let mut layers = Vec::with_capacity(layout.layers.len());
    for l in &layout.layers {
        // Experts are (de)quantized in parallel; errors are then reported in expert order.
        let results: Vec<_> = l
            .experts
            .par_iter()
            .map(|e| {
                let one = |spec| projection(checkpoint, spec, quantize, method);
                Ok::<_, QuantError>([one(&e.w1)?, one(&e.w2)?, one(&e.w3)?])
            })
            .collect();
        let mut experts = Vec::with_capacity(l.experts.len());
        for result in results {
            let [(w1, f1), (w2, f2), (w3, f3)] = result?;
            [f1, f2, f3].into_iter().for_each(seen);
            experts.push(ExpertWeights { w1, w2, w3 });
        }
        layers.push(LayerWeights {
            attn_norm: high_precision(checkpoint, &l.attn_norm)?,
            q_proj: proj(&l.q_proj)?,
            k_proj: proj(&l.k_proj)?,
            v_proj: proj(&l.v_proj)?,
            o_proj: proj(&l.o_proj)?,
            ffn_norm: high_precision(checkpoint, &l.ffn_norm)?,
            router: l
                .router
                .as_ref()
                .map(|r| high_precision(checkpoint, r))
                .transpose()?,
            experts,
        });
    }
    let embed = high_precision(checkpoint, &layout.embed)?;
    let lm_head = match &layout.lm_head {
        Some(spec) => high_precision(checkpoint, spec)?,
        None => embed.clone(),
    };
    let weights = ModelWeights {
        config: config.clone(),
        embed,
        layers,
        final_norm: high_precision(checkpoint, &layout.final_norm)?,
        lm_head,
    };
    Ok(QuantizedWeights {
        weights,
        format: format.get(),
    })
}

/// A tensor that is never quantized: it must be stored in a float type, or (a router a tool
/// quantized anyway) in the bitsandbytes 4-bit or compressed-tensors `pack-quantized` layout,
/// then dequantized to f32 here.
fn high_precision(checkpoint: &Checkpoint, spec: &TensorSpec) -> Result<Weight, QuantError> {
    let (rows, cols) = dims(spec);
    let base = spec.name.strip_suffix(".weight").unwrap_or(&spec.name);
    let tool = if checkpoint
        .raw_tensor(&format!("{base}.weight_packed"))
        .is_some()
    {
        Some(compressed::load(checkpoint, base, (rows, cols), &[])?)
    } else {
        bnb::find(checkpoint, &spec.name)
            .map(|raw| bnb::load(checkpoint, &raw, (rows, cols)))
            .transpose()?
    };
    if let Some(loaded) = tool {
        return owned(spec, loaded.matrix.into_f32(), &loaded.path);
    }
    if let Some(raw) = checkpoint.raw_tensor(&spec.name) {
        if raw.dtype().float().is_none() {
            return Err(QuantError::Unsupported {
                path: raw.path().to_path_buf(),
                tensor: spec.name.clone(),
                reason: format!(
                    "stored as {}, but routers, norms, embeddings and the LM head must stay in \
                     high precision (BF16, F16 or F32)",
                    raw.dtype()
                ),
            });
        }
    }
    Ok(take(checkpoint, spec)?)
}

/// `(rows, cols)` of a matrix spec.
fn dims(spec: &TensorSpec) -> (usize, usize) {
    match spec.shape.as_slice() {
        [r, c] => (*r, *c),
        other => (1, other.iter().product()),
    }
}

/// One quantizable projection, and the format it ended up in.
fn projection(
    checkpoint: &Checkpoint,
    spec: &TensorSpec,
    quantize: Option<QuantFormat>,
    method: &QuantMethod,
) -> Result<(Weight, Option<QuantFormat>), QuantError> {
    let (rows, cols) = dims(spec);
    let base = spec.name.strip_suffix(".weight").unwrap_or(&spec.name);
    if let Some((name, loaded)) = published(checkpoint, spec, method)? {
        no_conflict(&name, quantize, loaded.format)?;
        let w = match loaded.matrix {
            Matrix::Packed(p) => packed_weight(spec, p, &loaded.path)?,
            Matrix::Dequantized(data) => owned(spec, data, &loaded.path)?,
        };
        return Ok((w, Some(loaded.format)));
    }
    let qweight_name = format!("{base}.qweight");
    if let Some(qweight) = checkpoint.raw_tensor(&qweight_name) {
        no_conflict(&qweight_name, quantize, QuantFormat::Int4)?;
        let w = match gptq(checkpoint, base, &qweight, rows, cols, method.gptq_zeros())? {
            Matrix::Packed(p) => packed_weight(spec, p, qweight.path())?,
            Matrix::Dequantized(data) => owned(spec, data, qweight.path())?,
        };
        return Ok((w, Some(QuantFormat::Int4)));
    }
    let Some(raw) = checkpoint.raw_tensor(&spec.name) else {
        return Err(WeightsError::Missing {
            tensor: spec.name.clone(),
        }
        .into());
    };
    match raw.dtype() {
        RawDType::Float(_) => {
            let w = take(checkpoint, spec)?;
            let Some(format) = quantize else {
                return Ok((w, None));
            };
            let values = w.data().to_f32_vec();
            let weight = match packed::quantize(format, &values, rows, cols) {
                Ok(Some(p)) => packed_weight(spec, p, w.tensor.path())?,
                // Not packable (4-bit with an odd column count): quantized and dequantized here.
                Ok(None) | Err(_) => {
                    let data = quantize_dequantize(format, &values, rows, cols).unwrap_or_default();
                    owned(spec, data, w.tensor.path())?
                }
            };
            Ok((weight, Some(format)))
        }
        RawDType::F8E4M3 => {
            no_conflict(&spec.name, quantize, QuantFormat::Fp8)?;
            check_shape(&raw, &[rows, cols], || {
                format!("[{rows}, {cols}] (out, in)")
            })?;
            let codes = raw.bytes();
            if let Some(i) = codes.iter().position(|&c| fp8::is_nan_code(c)) {
                return Err(QuantError::Unsupported {
                    path: raw.path().to_path_buf(),
                    tensor: spec.name.clone(),
                    reason: format!("element {i} is an FP8 NaN code"),
                });
            }
            let scales = weight_scales(checkpoint, &spec.name, rows)?;
            let p = PackedMatrix::fp8(codes.to_vec(), &scales, rows, cols)
                .map_err(|e| unsupported(&raw, &spec.name, e))?;
            Ok((packed_weight(spec, p, raw.path())?, Some(QuantFormat::Fp8)))
        }
        RawDType::I8 => {
            no_conflict(&spec.name, quantize, QuantFormat::Int8)?;
            check_shape(&raw, &[rows, cols], || {
                format!("[{rows}, {cols}] (out, in)")
            })?;
            let codes: Vec<i8> = raw.bytes().iter().map(|&b| b as i8).collect();
            let scales = weight_scales(checkpoint, &spec.name, rows)?;
            let p = PackedMatrix::int8(&codes, &scales, rows, cols)
                .map_err(|e| unsupported(&raw, &spec.name, e))?;
            Ok((packed_weight(spec, p, raw.path())?, Some(QuantFormat::Int8)))
        }
        other => Err(QuantError::DType {
            path: raw.path().to_path_buf(),
            tensor: spec.name.clone(),
            expected: "BF16, F16, F32, F8_E4M3 or I8 (or a GPTQ qweight beside it)",
            found: other,
        }),
    }
}

/// A projection in a tool's own layout, recognised by its tensors: compressed-tensors
/// `pack-quantized` (`<p>.weight_packed`), AutoAWQ (`<p>.qweight` when the config declares
/// `awq`), bitsandbytes 4-bit (`<p>.weight` U8 beside `<p>.weight.absmax`). Returns the tensor
/// that decided it and what was loaded; `None` for the other layouts (GPTQ, FP8, INT8, float).
fn published(
    checkpoint: &Checkpoint,
    spec: &TensorSpec,
    method: &QuantMethod,
) -> Result<Option<(String, Loaded)>, QuantError> {
    let (rows, cols) = dims(spec);
    let base = spec.name.strip_suffix(".weight").unwrap_or(&spec.name);
    let packed = format!("{base}.weight_packed");
    if checkpoint.raw_tensor(&packed).is_some() {
        let bits = match method {
            QuantMethod::CompressedTensors { pack_bits, .. } => pack_bits.as_slice(),
            _ => &[],
        };
        let loaded = compressed::load(checkpoint, base, (rows, cols), bits)?;
        return Ok(Some((packed, loaded)));
    }
    if let QuantMethod::Awq { group_size } = method {
        let qweight = format!("{base}.qweight");
        if let Some(raw) = checkpoint.raw_tensor(&qweight) {
            let loaded = awq::load(checkpoint, base, &raw, (rows, cols), *group_size)?;
            return Ok(Some((qweight, loaded)));
        }
    }
    if let Some(raw) = bnb::find(checkpoint, &spec.name) {
        let loaded = bnb::load(checkpoint, &raw, (rows, cols))?;
        return Ok(Some((spec.name.clone(), loaded)));
    }
    Ok(None)
}

/// Quantizes `w` (`[rows, cols]`) to `format` and back to f32 (FP8 and INT8 per row: empty, and
/// 4-bit `None`, only for an empty matrix).
fn quantize_dequantize(
    format: QuantFormat,
    w: &[f32],
    rows: usize,
    cols: usize,
) -> Option<Vec<f32>> {
    match format {
        QuantFormat::Bf16 => Some(w.to_vec()),
        QuantFormat::Fp8 => Some(Q8::Fp8.round_trip_rows(w, cols)),
        QuantFormat::Int8 => Some(Q8::Int8.round_trip_rows(w, cols)),
        QuantFormat::Int4 => {
            int4::dequantize_rtn(&int4::quantize_rtn(w, rows, cols, int4::GROUP_SIZE))
        }
    }
}

/// Rejects quantizing on load a tensor already stored as `found`.
fn no_conflict(
    tensor: &str,
    requested: Option<QuantFormat>,
    found: QuantFormat,
) -> Result<(), QuantError> {
    match requested {
        Some(r) if r != found => Err(QuantError::Conflict {
            tensor: tensor.into(),
            requested: r,
            found,
        }),
        _ => Ok(()),
    }
}

/// A weight for `spec` held packed (dequantized on first CPU use), derived from the file `path`.
pub(super) fn packed_weight(
    spec: &TensorSpec,
    p: PackedMatrix,
    path: &Path,
) -> Result<Weight, QuantError> {
    let (rows, cols) = dims(spec);
    let found = vec![p.rows, p.cols];
    let tensor = TensorView::from_packed(&spec.name, spec.shape.clone(), Arc::new(p), path)
        .ok_or_else(|| QuantError::Shape {
            path: path.to_path_buf(),
            tensor: spec.name.clone(),
            expected: format!("{:?}", spec.shape),
            found,
        })?;
    Ok(Weight { rows, cols, tensor })
}

/// A packing refusal as a typed error naming the tensor.
pub(super) fn unsupported(raw: &RawTensor, tensor: &str, e: LayoutError) -> QuantError {
    QuantError::Unsupported {
        path: raw.path().to_path_buf(),
        tensor: tensor.into(),
        reason: e.to_string(),
    }
}

/// A published projection: packed, or (a layout the packed form cannot express, e.g. groups that
/// are not equal runs) dequantized to f32 `[rows, cols]`.
pub(super) enum Matrix {
    /// In the packed layout.
    Packed(PackedMatrix),
    /// Dequantized.
    Dequantized(Vec<f32>),
}

impl Matrix {
    /// The f32 values `[rows, cols]`.
    pub(super) fn into_f32(self) -> Vec<f32> {
        match self {
            Matrix::Packed(p) => p.dequantize(),
            Matrix::Dequantized(d) => d,
        }
    }
}

/// A published matrix, the format it counts as and the file it was read from.
pub(super) struct Loaded {
    /// The matrix.
    pub matrix: Matrix,
    /// INT4 or INT8.
    pub format: QuantFormat,
    /// The file holding its main tensor.
    pub path: std::path::PathBuf,
}

/// An owned f32 weight for `spec`, derived from the file `path`.
pub(super) fn owned(spec: &TensorSpec, data: Vec<f32>, path: &Path) -> Result<Weight, QuantError> {
    let (rows, cols) = dims(spec);
    let found = vec![data.len()];
    let tensor =
        TensorView::from_f32(&spec.name, spec.shape.clone(), data, path).ok_or_else(|| {
            QuantError::Shape {
                path: path.to_path_buf(),
                tensor: spec.name.clone(),
                expected: format!("{:?} elements after dequantization", spec.shape),
                found,
            }
        })?;
    Ok(Weight { rows, cols, tensor })
}

/// The error for `raw`'s shape, which is not `expected`.
pub(super) fn shape_error(raw: &RawTensor, expected: String) -> QuantError {
    QuantError::Shape {
        path: raw.path().to_path_buf(),
        tensor: raw.name().into(),
        expected,
        found: raw.shape().to_vec(),
    }
}

/// Checks `raw`'s shape is `expected` (described by `words` in the error).
pub(super) fn check_shape(
    raw: &RawTensor,
    expected: &[usize],
    words: impl FnOnce() -> String,
) -> Result<(), QuantError> {
    if raw.shape() == expected {
        Ok(())
    } else {
        Err(shape_error(raw, words()))
    }
}

/// `name` as a required companion of `projection`.
pub(super) fn companion(
    checkpoint: &Checkpoint,
    name: &str,
    projection: &str,
) -> Result<RawTensor, QuantError> {
    checkpoint
        .raw_tensor(name)
        .ok_or_else(|| QuantError::Missing {
            tensor: name.into(),
            projection: projection.into(),
        })
}

/// The elements of a float tensor as f32.
pub(super) fn floats(raw: &RawTensor) -> Result<Vec<f32>, QuantError> {
    match raw.as_float() {
        Some(view) => Ok(view.data().to_f32_vec()),
        None => Err(QuantError::DType {
            path: raw.path().to_path_buf(),
            tensor: raw.name().into(),
            expected: "BF16, F16 or F32",
            found: raw.dtype(),
        }),
    }
}

/// The elements of an I32 tensor.
pub(super) fn ints(raw: &RawTensor) -> Result<Vec<i32>, QuantError> {
    if raw.dtype() != RawDType::I32 {
        return Err(QuantError::DType {
            path: raw.path().to_path_buf(),
            tensor: raw.name().into(),
            expected: "I32",
            found: raw.dtype(),
        });
    }
    Ok(raw
        .bytes()
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// The elements of an I32 or I64 tensor, as i64.
pub(super) fn int64s(raw: &RawTensor) -> Result<Vec<i64>, QuantError> {
    match raw.dtype() {
        RawDType::I64 => Ok(raw
            .bytes()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect()),
        RawDType::I32 => Ok(ints(raw)?.into_iter().map(i64::from).collect()),
        found => Err(QuantError::DType {
            path: raw.path().to_path_buf(),
            tensor: raw.name().into(),
            expected: "I32 or I64",
            found,
        }),
    }
}

/// Checks every scale of `raw` (values `scales`) is positive and finite.
pub(super) fn check_scales(raw: &RawTensor, scales: &[f32]) -> Result<(), QuantError> {
    match scales.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
        Some(index) => Err(QuantError::BadScale {
            path: raw.path().to_path_buf(),
            tensor: raw.name().into(),
            index,
            value: scales[index],
        }),
        None => Ok(()),
    }
}

/// `<weight>_scale` of an FP8 / INT8 weight with `rows` output channels: one scale, or one per row.
fn weight_scales(
    checkpoint: &Checkpoint,
    weight: &str,
    rows: usize,
) -> Result<Vec<f32>, QuantError> {
    let name = format!("{weight}_scale");
    let raw = companion(checkpoint, &name, weight)?;
    let ok = matches!(raw.shape(), [] | [1]) || raw.shape() == [rows] || raw.shape() == [rows, 1];
    if !ok {
        return Err(QuantError::Shape {
            path: raw.path().to_path_buf(),
            tensor: name,
            expected: format!("[] or [1] (per tensor), or [{rows}] or [{rows}, 1] (per channel)"),
            found: raw.shape().to_vec(),
        });
    }
    let scales = floats(&raw)?;
    check_scales(&raw, &scales)?;
    Ok(scales)
}

/// Dequantizes the GPTQ projection `base` (`rows` outputs, `cols` inputs) to `[rows, cols]`.
fn gptq(
    checkpoint: &Checkpoint,
    base: &str,
    qweight: &RawTensor,
    rows: usize,
    cols: usize,
    zeros: GptqZeros,
) -> Result<Matrix, QuantError> {
    let weight = format!("{base}.weight");
    if !cols.is_multiple_of(8) || !rows.is_multiple_of(8) {
        return Err(QuantError::Unsupported {
            path: qweight.path().to_path_buf(),
            tensor: qweight.name().into(),
            reason: format!("GPTQ 4-bit packing needs in ({cols}) and out ({rows}) divisible by 8"),
        });
    }
    check_shape(qweight, &[cols / 8, rows], || {
        format!("[{}, {rows}] (in / 8, out: 4-bit GPTQ)", cols / 8)
    })?;
    let q = ints(qweight)?;
    let scales_raw = companion(checkpoint, &format!("{base}.scales"), &weight)?;
    let groups = match scales_raw.shape() {
        [g, n] if *n == rows && *g > 0 => *g,
        _ => {
            return Err(shape_error(
                &scales_raw,
                format!("[groups, {rows}] (groups >= 1, out)"),
            ))
        }
    };
    let scales = floats(&scales_raw)?;
    check_scales(&scales_raw, &scales)?;
    let qzeros_raw = companion(checkpoint, &format!("{base}.qzeros"), &weight)?;
    check_shape(&qzeros_raw, &[groups, rows / 8], || {
        format!("[{groups}, {}] (groups, out / 8)", rows / 8)
    })?;
    let qzeros = ints(&qzeros_raw)?;
    let g_idx = match checkpoint.raw_tensor(&format!("{base}.g_idx")) {
        Some(raw) => {
            check_shape(&raw, &[cols], || format!("[{cols}] (in)"))?;
            let values = ints(&raw)?;
            let mut out = Vec::with_capacity(cols);
            for (index, &v) in values.iter().enumerate() {
                match usize::try_from(v) {
                    Ok(g) if g < groups => out.push(g),
                    _ => {
                        return Err(QuantError::GroupIndex {
                            path: raw.path().to_path_buf(),
                            tensor: raw.name().into(),
                            index,
                            value: i64::from(v),
                            groups,
                        })
                    }
                }
            }
            out
        }
        None if cols.is_multiple_of(groups) => int4::sequential_g_idx(cols, cols / groups),
        None => {
            return Err(QuantError::Missing {
                tensor: format!("{base}.g_idx"),
                projection: weight,
            })
        }
    };
    let shape = int4::GptqShape {
        inputs: cols,
        outputs: rows,
        groups,
    };
    if let Ok(p) = PackedMatrix::from_gptq(shape, &q, &qzeros, &scales, &g_idx, zeros.offset()) {
        return Ok(Matrix::Packed(p));
    }
    // Groups that are not equal runs of columns: only the CPU reference can use this layout.
    int4::dequantize_gptq(shape, &q, &qzeros, &scales, &g_idx, zeros.offset())
        .map(Matrix::Dequantized)
        .ok_or_else(|| shape_error(qweight, "tensors consistent with each other".into()))
}
