//! A compressed-tensors `pack-quantized` projection `<p>` (`[out, in]` from the config; the
//! encoding is [`crate::packed::pack_quantized`]):
//! - `<p>.weight_packed` I32 `[out, ceil(in * bits / 32)]`: the bit width (4 or 8) follows from
//!   this shape (and must be one the `quantization_config` declares, when it declares any);
//! - `<p>.weight_shape` I64 or I32 `[2]`: the values `[out, in]`;
//! - `<p>.weight_scale` float `[out, groups]` (`[out, 1]` per channel);
//! - `<p>.weight_zero_point` I32 `[ceil(out * bits / 32), groups]`, present when asymmetric;
//! - `<p>.weight_g_idx` I32 or I64 `[in]`, optional: the group of each input (act-order); a
//!   `g_idx` holding -1 means column order, as compressed-tensors reads it. Without it, input `k`
//!   is in group `k / (in / groups)`.
//!
//! 4-bit lands in the packed INT4 layout (a permutation for act-order), 8-bit symmetric per channel
//! in the INT8 layout; 8-bit with groups or zero points, and groups that are not equal runs of
//! columns, are held dequantized (f32, CPU-exact; the GPU engine stores them in bf16).

use super::load::{
    check_scales, check_shape, companion, floats, int64s, ints, shape_error, unsupported, Loaded,
    Matrix,
};
use super::{QuantError, QuantFormat};
use crate::checkpoint::Checkpoint;
use crate::packed::{int4, pack_quantized as pq, Grouped, PackedMatrix};

/// Loads the projection `base` (`rows` outputs, `cols` inputs); `declared` is the `num_bits` of
/// the config's `pack-quantized` groups (empty: any).
pub(super) fn load(
    checkpoint: &Checkpoint,
    base: &str,
    (rows, cols): (usize, usize),
    declared: &[u32],
) -> Result<Loaded, QuantError> {
    let weight = format!("{base}.weight");
    let packed = companion(checkpoint, &format!("{base}.weight_packed"), &weight)?;
    let shape = companion(checkpoint, &format!("{base}.weight_shape"), &weight)?;
    check_shape(&shape, &[2], || "[2]".into())?;
    let values = int64s(&shape)?;
    if values != [rows as i64, cols as i64] {
        return Err(QuantError::Unsupported {
            path: shape.path().to_path_buf(),
            tensor: shape.name().into(),
            reason: format!("holds {values:?}, the configuration needs [{rows}, {cols}]"),
        });
    }
    let fits = |b: u32| pq::per_word(b).map(|per| [rows, cols.div_ceil(per)]);
    let Some(bits) = [4u32, 8]
        .into_iter()
        .filter(|b| declared.is_empty() || declared.contains(b))
        .find(|&b| fits(b).is_some_and(|s| packed.shape() == s))
    else {
        return Err(shape_error(
            &packed,
            format!(
                "[{rows}, {}] (4-bit) or [{rows}, {}] (8-bit), bits declared {declared:?}",
                cols.div_ceil(8),
                cols.div_ceil(4)
            ),
        ));
    };
    let q = pq::unpack_rows(&ints(&packed)?, bits, rows, cols).unwrap_or_default();
    let scale_raw = companion(checkpoint, &format!("{base}.weight_scale"), &weight)?;
    let groups = match scale_raw.shape() {
        [r, g] if *r == rows && *g > 0 => *g,
        _ => {
            return Err(shape_error(
                &scale_raw,
                format!("[{rows}, groups] (out, groups >= 1)"),
            ))
        }
    };
    let scales = floats(&scale_raw)?;
    check_scales(&scale_raw, &scales)?;
    let zeros = match checkpoint.raw_tensor(&format!("{base}.weight_zero_point")) {
        Some(raw) => {
            let per = 32 / bits as usize;
            check_shape(&raw, &[rows.div_ceil(per), groups], || {
                format!(
                    "[{}, {groups}] (out / {per} rounded up, groups)",
                    rows.div_ceil(per)
                )
            })?;
            let unpacked = pq::unpack_cols(&ints(&raw)?, bits, rows, groups).unwrap_or_default();
            unpacked.into_iter().map(i32::from).collect()
        }
        None => vec![pq::symmetric_zero(bits); rows * groups],
    };
    let symmetric = zeros.iter().all(|&z| z == pq::symmetric_zero(bits));
    let g_idx = group_index(checkpoint, base, cols, groups, &scale_raw)?;
    let grouped = Grouped {
        rows,
        cols,
        groups,
        scales: &scales,
        zeros: &zeros,
        g_idx: &g_idx,
    };
    let path = packed.path().to_path_buf();
    let dequantized = || {
        grouped
            .dequantize(&q)
            .map(Matrix::Dequantized)
            .ok_or_else(|| QuantError::Unsupported {
                path: path.clone(),
                tensor: packed.name().into(),
                reason: "tensors inconsistent with each other".into(),
            })
    };
    let (matrix, format) = match bits {
        4 => match PackedMatrix::int4_grouped(&q, grouped) {
            Ok(p) => (Matrix::Packed(p), QuantFormat::Int4),
            Err(_) => (dequantized()?, QuantFormat::Int4),
        },
        _ if symmetric && groups == 1 => {
            let codes: Vec<i8> = q.iter().map(|&u| (u ^ 0x80) as i8).collect();
            let p = PackedMatrix::int8(&codes, &scales, rows, cols)
                .map_err(|e| unsupported(&packed, &weight, e))?;
            (Matrix::Packed(p), QuantFormat::Int8)
        }
        _ => (dequantized()?, QuantFormat::Int8),
    };
    Ok(Loaded {
        matrix,
        format,
        path,
    })
}

/// The group of each of the `cols` inputs: `<base>.weight_g_idx` when present and not -1, else
/// `k / (cols / groups)` (`scale` names the error when `groups` does not divide `cols`).
fn group_index(
    checkpoint: &Checkpoint,
    base: &str,
    cols: usize,
    groups: usize,
    scale: &crate::checkpoint::RawTensor,
) -> Result<Vec<usize>, QuantError> {
    if let Some(raw) = checkpoint.raw_tensor(&format!("{base}.weight_g_idx")) {
        check_shape(&raw, &[cols], || format!("[{cols}] (in)"))?;
        let values = int64s(&raw)?;
        if !values.contains(&-1) {
            let mut out = Vec::with_capacity(cols);
            for (index, &value) in values.iter().enumerate() {
                match usize::try_from(value) {
                    Ok(g) if g < groups => out.push(g),
                    _ => {
                        return Err(QuantError::GroupIndex {
                            path: raw.path().to_path_buf(),
                            tensor: raw.name().into(),
                            index,
                            value,
                            groups,
                        })
                    }
                }
            }
            return Ok(out);
        }
    }
    if !cols.is_multiple_of(groups) {
        return Err(shape_error(
            scale,
            format!("a group count dividing in ({cols})"),
        ));
    }
    Ok(int4::sequential_g_idx(cols, cols / groups))
}
