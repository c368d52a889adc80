//! INT8 weight-only quantization with one symmetric scale per output channel: for a matrix
//! `[out, in]`, `scale[o] = max_i |w[o][i]| / 127` (1 for an all-zero row),
//! `q[o][i] = clamp(round_ties_even(w[o][i] / scale[o]), -127, 127)`, and
//! `w'[o][i] = q[o][i] * scale[o]`. The error of each element is at most `scale[o] / 2`.

/// Largest magnitude of a code (the range is symmetric, -128 is unused).
pub const QMAX: f32 = 127.0;

/// Quantizes `w` (`[rows, cols]`, row-major): codes and one scale per row.
pub fn quantize_per_channel(w: &[f32], rows: usize, cols: usize) -> (Vec<i8>, Vec<f32>) {
    let mut codes = Vec::with_capacity(w.len());
    let mut scales = Vec::with_capacity(rows);
    for row in w.chunks(cols.max(1)).take(rows) {
        let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = if amax > 0.0 && amax.is_finite() {
            amax / QMAX
        } else {
            1.0
        };
        codes.extend(
            row.iter()
                .map(|v| (v / scale).round_ties_even().clamp(-QMAX, QMAX) as i8),
        );
        scales.push(scale);
    }
    (codes, scales)
}

/// `q * scale[row]` for codes `[rows, cols]`: `scales` holds one scale per row, or one for the
/// whole tensor. `None` when the lengths disagree.
pub fn dequantize(codes: &[i8], scales: &[f32], cols: usize) -> Option<Vec<f32>> {
    let rows = super::fp8::rows_of(codes.len(), cols, scales.len())?;
    let mut out = Vec::with_capacity(codes.len());
    for (r, row) in codes.chunks(cols.max(1)).enumerate().take(rows) {
        let s = if scales.len() == 1 {
            scales.first()
        } else {
            scales.get(r)
        };
        let s = *s?;
        out.extend(row.iter().map(|&q| f32::from(q) * s));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn error_is_at_most_half_a_scale(
            rows in 1usize..5,
            cols in 1usize..40,
            seed in proptest::collection::vec(-50.0f32..50.0, 200),
        ) {
            let w: Vec<f32> = (0..rows * cols).map(|i| seed[i % seed.len()] * (1.0 + i as f32 * 0.01)).collect();
            let (codes, scales) = quantize_per_channel(&w, rows, cols);
            prop_assert_eq!(scales.len(), rows);
            let back = dequantize(&codes, &scales, cols).unwrap();
            for (i, (x, y)) in w.iter().zip(&back).enumerate() {
                let s = scales[i / cols];
                prop_assert!((x - y).abs() <= s * 0.5001, "{} -> {} (scale {})", x, y, s);
            }
            // Each row's largest magnitude uses the end of the range.
            for r in 0..rows {
                let row = &codes[r * cols..(r + 1) * cols];
                prop_assert!(row.iter().any(|&q| q.unsigned_abs() == 127) || w[r * cols..(r + 1) * cols].iter().all(|&v| v == 0.0));
            }
        }
    }

    #[test]
    fn a_zero_row_keeps_a_unit_scale() {
        let (codes, scales) = quantize_per_channel(&[0.0, 0.0, 1.0, -0.5], 2, 2);
        assert_eq!(scales, vec![1.0, 1.0 / 127.0]);
        assert_eq!(codes, vec![0, 0, 127, -64]);
    }
}
