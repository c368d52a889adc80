//! Quantizing an f32 matrix on load into the packed layout ([`quantize`]). The layout itself, and
//! the encodings it holds, are defined in [`crate::packed`], below the checkpoint reader.

use super::QuantFormat;
use crate::packed::{fp8, int4, int8, LayoutError, PackedMatrix};

/// Quantizes `w` (`[rows, cols]`, f32) on load: FP8 / INT8 with a scale per row, or 4-bit RTN in
/// groups of [`int4::GROUP_SIZE`]; `None` for [`QuantFormat::Bf16`].
pub fn quantize(
    format: QuantFormat,
    w: &[f32],
    rows: usize,
    cols: usize,
) -> Result<Option<PackedMatrix>, LayoutError> {
    Ok(Some(match format {
        QuantFormat::Bf16 => return Ok(None),
        QuantFormat::Fp8 => {
            let (codes, scales) = fp8::quantize_per_channel(w, rows, cols);
            PackedMatrix::fp8(codes, &scales, rows, cols)?
        }
        QuantFormat::Int8 => {
            let (codes, scales) = int8::quantize_per_channel(w, rows, cols);
            PackedMatrix::int8(&codes, &scales, rows, cols)?
        }
        QuantFormat::Int4 => {
            PackedMatrix::from_rtn(&int4::quantize_rtn(w, rows, cols, int4::GROUP_SIZE))?
        }
    }))
}
