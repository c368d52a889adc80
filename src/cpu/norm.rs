//! RMSNorm over rows: `out[t, :] = x[t, :] * rsqrt(mean(x[t, :]^2) + eps) * w`, in f32, for
//! `x, out: [tokens, hidden]` and `w: [hidden]`; optionally fused with the residual add that
//! precedes it.

use crate::dtype::WeightSlice;

/// `out[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * w` for every row `t`.
///
/// Shapes: `x, out: [tokens, hidden]`, `w: [hidden]` (`hidden = w.len()`).
///
/// # Panics
/// When `w` is empty or the lengths do not match those shapes.
pub fn rms_norm(x: &[f32], w: WeightSlice<'_>, eps: f32, out: &mut [f32]) {
    let hidden = w.len();
    assert!(hidden > 0, "rms_norm: empty weight");
    assert_eq!(x.len() % hidden, 0, "rms_norm: x is not [tokens, {hidden}]");
    assert_eq!(out.len(), x.len(), "rms_norm: out differs from x in length");
    let w = w.to_f32_vec();
    for (xr, or) in x.chunks_exact(hidden).zip(out.chunks_exact_mut(hidden)) {
        norm_row(xr, &w, eps, or);
    }
}

/// `residual[t] += delta[t]`, then `out[t] = rms_norm(residual[t])` for every row `t`.
///
/// Shapes: `residual, delta, out: [tokens, hidden]`, `w: [hidden]`.
///
/// # Panics
/// When `w` is empty or the lengths do not match those shapes.
pub fn add_rms_norm(
    residual: &mut [f32],
    delta: &[f32],
    w: WeightSlice<'_>,
    eps: f32,
    out: &mut [f32],
) {
    assert_eq!(residual.len(), delta.len(), "add_rms_norm: delta length");
    for (r, d) in residual.iter_mut().zip(delta) {
        *r += d;
    }
    rms_norm(residual, w, eps, out);
}

/// One row. The sum of squares uses eight partial sums (element `i` goes to sum `i % 8`, the
/// sums are then added in order), which is both vectorisable and more accurate than one chain.
fn norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let mut partial = [0.0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (p, v) in partial.iter_mut().zip(c) {
            *p += v * v;
        }
    }
    for (p, v) in partial.iter_mut().zip(chunks.remainder()) {
        *p += v * v;
    }
    let sum: f32 = partial.iter().sum();
    let scale = 1.0 / (sum / x.len() as f32 + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = g * (v * scale);
    }
}
