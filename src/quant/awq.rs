//! An AutoAWQ GEMM projection `<p>` (`[out, in]` from the config; the encoding is
//! [`crate::packed::awq`]): `<p>.qweight` I32 `[in, out / 8]`, `<p>.qzeros` I32
//! `[groups, out / 8]`, `<p>.scales` float (f16 as written) `[groups, out]`, groups of
//! `in / groups` inputs (which must equal the declared `group_size`, when declared). Lands in the
//! packed INT4 layout (held dequantized only for an odd input count, which AWQ does not write).

use super::load::{
    check_scales, check_shape, companion, floats, ints, shape_error, Loaded, Matrix,
};
use super::{QuantError, QuantFormat};
use crate::checkpoint::{Checkpoint, RawTensor};
use crate::packed::{awq, int4, Grouped, PackedMatrix};

/// Loads the projection `base` (`rows` outputs, `cols` inputs) whose `qweight` is `qweight`.
pub(super) fn load(
    checkpoint: &Checkpoint,
    base: &str,
    qweight: &RawTensor,
    (rows, cols): (usize, usize),
    group_size: Option<usize>,
) -> Result<Loaded, QuantError> {
    let weight = format!("{base}.weight");
    if !rows.is_multiple_of(8) || cols == 0 {
        return Err(QuantError::Unsupported {
            path: qweight.path().to_path_buf(),
            tensor: qweight.name().into(),
            reason: format!("AWQ packing needs out ({rows}) divisible by 8 and in ({cols}) > 0"),
        });
    }
    check_shape(qweight, &[cols, rows / 8], || {
        format!("[{cols}, {}] (in, out / 8: AWQ GEMM)", rows / 8)
    })?;
    let scales_raw = companion(checkpoint, &format!("{base}.scales"), &weight)?;
    let groups = match scales_raw.shape() {
        [g, n] if *n == rows && *g > 0 && cols.is_multiple_of(*g) => *g,
        _ => {
            return Err(shape_error(
                &scales_raw,
                format!("[groups, {rows}] (groups >= 1 dividing in = {cols}, out)"),
            ))
        }
    };
    if let Some(g) = group_size.filter(|&g| g * groups != cols) {
        return Err(shape_error(
            &scales_raw,
            format!("[{}, {rows}] (in / group_size {g}, out)", cols.div_ceil(g)),
        ));
    }
    let scales_t = floats(&scales_raw)?;
    check_scales(&scales_raw, &scales_t)?;
    let qzeros_raw = companion(checkpoint, &format!("{base}.qzeros"), &weight)?;
    check_shape(&qzeros_raw, &[groups, rows / 8], || {
        format!("[{groups}, {}] (groups, out / 8)", rows / 8)
    })?;
    // Both unpack: the shapes were checked above.
    let q_t = awq::unpack(&ints(qweight)?, cols, rows).unwrap_or_default();
    let z_t = awq::unpack(&ints(&qzeros_raw)?, groups, rows).unwrap_or_default();
    // Transposed to outputs first.
    let q: Vec<u8> = (0..rows * cols)
        .map(|i| q_t[(i % cols) * rows + i / cols])
        .collect();
    let zeros: Vec<i32> = (0..rows * groups)
        .map(|i| i32::from(z_t[(i % groups) * rows + i / groups]))
        .collect();
    let scales: Vec<f32> = (0..rows * groups)
        .map(|i| scales_t[(i % groups) * rows + i / groups])
        .collect();
    let g_idx = int4::sequential_g_idx(cols, cols / groups);
    let grouped = Grouped {
        rows,
        cols,
        groups,
        scales: &scales,
        zeros: &zeros,
        g_idx: &g_idx,
    };
    let matrix = match PackedMatrix::int4_grouped(&q, grouped) {
        Ok(p) => Matrix::Packed(p),
        Err(_) => Matrix::Dequantized(grouped.dequantize(&q).unwrap_or_default()),
    };
    Ok(Loaded {
        matrix,
        format: QuantFormat::Int4,
        path: qweight.path().to_path_buf(),
    })
}
