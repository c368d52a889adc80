//! A bitsandbytes 4-bit weight `<w>` (`<p>.weight`, `[out, in]` from the config) as transformers
//! saves a `load_in_4bit` model (the encoding is [`crate::packed::lut4`]):
//! - `<w>` U8, `ceil(out * in / 2)` bytes (stored `[n / 2, 1]`): the codes, high nibble first;
//! - `<w>.quant_state.bitsandbytes__nf4` (or `__fp4`) U8: UTF-8 JSON with `quant_type`,
//!   `blocksize`, `shape` (`[out, in]`), `dtype` and, with double quantization,
//!   `nested_blocksize` and `nested_offset`;
//! - `<w>.quant_map` F32 `[16]`: the table, which must be bitsandbytes' built-in one (its
//!   decoders use the built-in table; a file with another is refused);
//! - `<w>.absmax`: F32 `[blocks]`, or with double quantization U8 `[blocks]` beside
//!   `<w>.nested_absmax` F32 `[ceil(blocks / nested_blocksize)]` and `<w>.nested_quant_map` F32
//!   `[256]`.
//!
//! Lands in the packed LUT4 layout when every block lies within one row or every row within one
//! block (`in` a multiple of `blocksize`, or `blocksize` a multiple of `in`); otherwise held
//! dequantized (f32).

use super::load::{companion, floats, shape_error, unsupported, Loaded, Matrix};
use super::{QuantError, QuantFormat};
use crate::checkpoint::{Checkpoint, RawTensor};
use crate::dtype::RawDType;
use crate::packed::lut4::{self, Lut4};
use crate::packed::PackedMatrix;
use serde_json::Value;

/// The quant-state blob names, by table.
const STATES: [(&str, Lut4); 2] = [
    ("quant_state.bitsandbytes__nf4", Lut4::Nf4),
    ("quant_state.bitsandbytes__fp4", Lut4::Fp4),
];

/// `name` when it is a bitsandbytes 4-bit weight: U8 with a `<name>.absmax` beside it.
pub(super) fn find(checkpoint: &Checkpoint, name: &str) -> Option<RawTensor> {
    let raw = checkpoint.raw_tensor(name)?;
    let absmax = checkpoint.raw_tensor(&format!("{name}.absmax"));
    (raw.dtype() == RawDType::U8 && absmax.is_some()).then_some(raw)
}

/// The error for a tensor that is not what bitsandbytes writes.
fn bad_state(raw: &RawTensor, reason: impl Into<String>) -> QuantError {
    QuantError::Unsupported {
        path: raw.path().to_path_buf(),
        tensor: raw.name().into(),
        reason: reason.into(),
    }
}

/// A weight's quant state: the JSON object and the tensor holding it.
struct State {
    json: Value,
    raw: RawTensor,
}

impl State {
    fn field(&self, key: &str) -> Result<&Value, QuantError> {
        self.json
            .get(key)
            .ok_or_else(|| bad_state(&self.raw, format!("no `{key}`")))
    }

    fn positive(&self, key: &str) -> Result<usize, QuantError> {
        self.field(key)?
            .as_u64()
            .filter(|&v| v > 0)
            .map(|v| v as usize)
            .ok_or_else(|| bad_state(&self.raw, format!("`{key}` is not a positive integer")))
    }
}

/// Loads the weight `raw` (`rows` outputs, `cols` inputs).
pub(super) fn load(
    checkpoint: &Checkpoint,
    raw: &RawTensor,
    (rows, cols): (usize, usize),
) -> Result<Loaded, QuantError> {
    let name = raw.name();
    let Some((state, table)) = STATES.iter().find_map(|(suffix, t)| {
        checkpoint
            .raw_tensor(&format!("{name}.{suffix}"))
            .map(|s| (s, *t))
    }) else {
        return Err(QuantError::Missing {
            tensor: format!("{name}.{}", STATES[0].0),
            projection: name.into(),
        });
    };
    let json: Value = std::str::from_utf8(state.bytes())
        .ok()
        .and_then(|text| serde_json::from_str(text).ok())
        .ok_or_else(|| bad_state(&state, "not a UTF-8 JSON object"))?;
    let state = State { json, raw: state };
    if state.field("quant_type")?.as_str() != Some(table.name()) {
        return Err(bad_state(
            &state.raw,
            format!("`quant_type` is not `{}`", table.name()),
        ));
    }
    let shape = state.field("shape")?;
    let dims: Option<Vec<u64>> = shape
        .as_array()
        .and_then(|a| a.iter().map(Value::as_u64).collect());
    if dims != Some(vec![rows as u64, cols as u64]) {
        return Err(bad_state(
            &state.raw,
            format!("`shape` is {shape}, expected [{rows}, {cols}]"),
        ));
    }
    let blocksize = state.positive("blocksize")?;
    let n = rows * cols;
    let q = lut4::unpack_high_first(raw.bytes(), n).ok_or_else(|| QuantError::Shape {
        path: raw.path().to_path_buf(),
        tensor: name.into(),
        expected: format!("{} bytes (out * in / 2, rounded up)", n.div_ceil(2)),
        found: raw.shape().to_vec(),
    })?;
    let quant_map_raw = companion(checkpoint, &format!("{name}.quant_map"), name)?;
    let quant_map = floats(&quant_map_raw)?;
    let builtin = table.values();
    let same = quant_map.len() == 16
        && quant_map
            .iter()
            .zip(builtin)
            .all(|(a, b)| (a - b).abs() <= 1e-6);
    if !same {
        return Err(bad_state(
            &quant_map_raw,
            format!(
                "is not bitsandbytes' built-in {} table {builtin:?}",
                table.name()
            ),
        ));
    }
    let blocks = n.div_ceil(blocksize);
    let absmax = block_absmax(checkpoint, name, blocks, &state)?;
    // Per-row groups: blocks within rows, or rows within blocks.
    let per_row = if cols.is_multiple_of(blocksize) {
        Some((absmax.clone(), blocksize))
    } else if blocksize.is_multiple_of(cols) {
        Some((
            (0..rows).map(|r| absmax[r * cols / blocksize]).collect(),
            cols,
        ))
    } else {
        None
    };
    let matrix = match per_row {
        Some((scales, group)) if cols.is_multiple_of(2) => Matrix::Packed(
            PackedMatrix::lut4(table, &q, &scales, (rows, cols), group)
                .map_err(|e| unsupported(raw, name, e))?,
        ),
        _ => {
            Matrix::Dequantized(lut4::dequantize(table, &q, &absmax, blocksize).unwrap_or_default())
        }
    };
    Ok(Loaded {
        matrix,
        format: QuantFormat::Int4,
        path: raw.path().to_path_buf(),
    })
}

/// The f32 absmax of each of the `blocks` blocks of `name`, plain or double-quantized.
fn block_absmax(
    checkpoint: &Checkpoint,
    name: &str,
    blocks: usize,
    state: &State,
) -> Result<Vec<f32>, QuantError> {
    let absmax_raw = companion(checkpoint, &format!("{name}.absmax"), name)?;
    let count = |raw: &RawTensor, expected: usize| {
        if raw.shape() == [expected] {
            Ok(())
        } else {
            Err(shape_error(raw, format!("[{expected}]")))
        }
    };
    count(&absmax_raw, blocks)?;
    let Some(nested_raw) = checkpoint.raw_tensor(&format!("{name}.nested_absmax")) else {
        return floats(&absmax_raw);
    };
    if absmax_raw.dtype() != RawDType::U8 {
        return Err(QuantError::DType {
            path: absmax_raw.path().to_path_buf(),
            tensor: absmax_raw.name().into(),
            expected: "U8 (double quantization)",
            found: absmax_raw.dtype(),
        });
    }
    let nested_blocksize = state.positive("nested_blocksize")?;
    let offset = state
        .field("nested_offset")?
        .as_f64()
        .ok_or_else(|| bad_state(&state.raw, "`nested_offset` is not a number"))?
        as f32;
    count(&nested_raw, blocks.div_ceil(nested_blocksize))?;
    let nested = floats(&nested_raw)?;
    let code_raw = companion(checkpoint, &format!("{name}.nested_quant_map"), name)?;
    count(&code_raw, 256)?;
    let code = floats(&code_raw)?;
    Ok(
        lut4::nested_absmax(absmax_raw.bytes(), &code, &nested, nested_blocksize, offset)
            .unwrap_or_default(),
    )
}
