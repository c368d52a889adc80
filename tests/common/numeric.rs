//! Seeded random values, bf16 conversions and the relative L2 error the numeric tests compare with.

use half::bf16;

/// Deterministic pseudo-random values in [-scale, scale) (splitmix64), never constant.
pub fn random_values(seed: u64, len: usize, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// bf16 copies of `values` (round to nearest even).
pub fn to_bf16(values: &[f32]) -> Vec<bf16> {
    values.iter().map(|&v| bf16::from_f32(v)).collect()
}

/// f32 copies of bf16 `values` (exact).
pub fn to_f32(values: &[bf16]) -> Vec<f32> {
    values.iter().map(|v| v.to_f32()).collect()
}

/// `values` rounded through bf16 (what a device sees of a host f32 input).
pub fn round_bf16(values: &[f32]) -> Vec<f32> {
    values.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
}

/// `||out - reference|| / ||reference||` in f64; infinite when any value of either is not finite,
/// so a NaN never passes a bound.
pub fn rel_l2(out: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(out.len(), reference.len(), "length mismatch");
    let mut diff = 0.0f64;
    let mut norm = 0.0f64;
    for (&o, &r) in out.iter().zip(reference) {
        if !o.is_finite() || !r.is_finite() {
            return f64::INFINITY;
        }
        diff += (o as f64 - r as f64).powi(2);
        norm += (r as f64).powi(2);
    }
    diff.sqrt() / norm.sqrt().max(f64::MIN_POSITIVE)
}

/// The index of the largest value (the first of equal ones), as a token id.
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// The definition of a product: `y[t, n] = sum_k x[t, k] * w(n * k_len + k)` in f64, with the
/// magnitude `sum_k |x[t, k] * w(..)|` of each sum (what a rounding bound scales with); `w` gives
/// the weight at a row-major index of `[n, k]`.
pub fn product_definition(
    x: &[f32],
    w: impl Fn(usize) -> f64,
    n: usize,
    k: usize,
) -> (Vec<f64>, Vec<f64>) {
    let tokens = x.len() / k;
    let mut y = vec![0.0f64; tokens * n];
    let mut mag = vec![0.0f64; tokens * n];
    for t in 0..tokens {
        for r in 0..n {
            for i in 0..k {
                let p = x[t * k + i] as f64 * w(r * k + i);
                y[t * n + r] += p;
                mag[t * n + r] += p.abs();
            }
        }
    }
    (y, mag)
}

/// The largest `|a[i] - b[i]|` over the pairs of `a` and `b` (0 when there are none): the worst
/// per-token log-probability difference of two scorings.
pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f64, f64::max)
}
