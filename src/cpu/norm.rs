//! RMSNorm over rows: `out[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * w`, in f32.
//! `x`, `out`: `[rows, n]`; `w`: `[n]`.

use crate::dtype::WeightSlice;

/// Normalises each row of `x` (`[rows, n]`, `n = w.len()`) into `out`.
pub fn rms_norm(x: &[f32], w: WeightSlice<'_>, eps: f32, out: &mut [f32]) {
    let n = w.len();
    assert!(
        n > 0 && x.len().is_multiple_of(n) && out.len() == x.len(),
        "rms_norm: shape mismatch"
    );
    let weight = w.to_f32_vec();
    for (row, out_row) in x.chunks(n).zip(out.chunks_mut(n)) {
        let mean_square = row.iter().map(|v| v * v).sum::<f32>() / n as f32;
        let scale = 1.0 / (mean_square + eps).sqrt();
        for ((o, &v), &g) in out_row.iter_mut().zip(row).zip(&weight) {
            *o = g * (v * scale);
        }
    }
}
