//! FP8 E4M3 as defined by the OCP 8-bit floating point specification (the `float8_e4m3fn` of
//! torch and `F8_E4M3` of safetensors): 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits.
//!
//! - exponent field 0: subnormal, `(-1)^s * m/8 * 2^-6`;
//! - exponent field 1..=15: normal, `(-1)^s * (1 + m/8) * 2^(e-7)`, except
//! - `S.1111.111` (0x7F, 0xFF): NaN. There are no infinities; the largest finite value is 448.
//!
//! [`encode`] rounds to the nearest representable value, ties to even mantissa, and saturates
//! every value beyond ±448 (infinities included) to ±448; NaN becomes the NaN code of its sign.
//!
//! A quantized matrix `[out, in]` stores codes and a scale, per tensor or per output channel:
//! `w[o][i] = decode(code[o][i]) * scale[o]`.

/// Largest finite E4M3 value.
pub const MAX: f32 = 448.0;
/// The positive NaN code.
pub const NAN_CODE: u8 = 0x7F;
/// Code of +448.
const MAX_CODE: u8 = 0x7E;

/// The value of E4M3 `code` (exact in f32).
pub fn decode(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((code >> 3) & 0x0F);
    let man = f32::from(code & 0x07);
    if exp == 0x0F && code & 0x07 == 0x07 {
        return f32::NAN;
    }
    let magnitude = if exp == 0 {
        man / 8.0 * (2.0f32).powi(-6)
    } else {
        (1.0 + man / 8.0) * (2.0f32).powi(exp - 7)
    };
    sign * magnitude
}

/// True when `code` is one of the two NaN codes.
pub fn is_nan_code(code: u8) -> bool {
    code & 0x7F == NAN_CODE
}

/// The E4M3 code nearest to `x` (ties to even), saturating to ±448.
pub fn encode(x: f32) -> u8 {
    let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
    if x.is_nan() {
        return sign | NAN_CODE;
    }
    let a = x.abs();
    if a >= MAX {
        return sign | MAX_CODE;
    }
    // Smallest normal: 2^-6. Below it the step is 2^-9 and the code is the step count (a count of
    // 8 is the smallest normal's code, 0x08, so rounding up into the normals needs no special case).
    let min_normal = (2.0f32).powi(-6);
    if a < min_normal {
        let steps = (a * 512.0).round_ties_even();
        return sign | steps as u8;
    }
    // Normal: a = q * 2^(e-3) with q in [8, 16); dividing by a power of two is exact.
    let e = ((a.to_bits() >> 23) & 0xFF) as i32 - 127;
    let q = (a / (2.0f32).powi(e - 3)).round_ties_even() as i32;
    // q == 16 carries into the next exponent with mantissa 0, which this sum does by itself.
    let code = ((e + 7) << 3) + (q - 8);
    // `a < 448` keeps code <= 0x7E (448 itself is the largest value below the NaN code).
    sign | (code.clamp(0, i32::from(MAX_CODE)) as u8)
}

/// Per-output-channel quantization of `w` (`[rows, cols]`, row-major): scale `amax / 448` per row
/// (1 for an all-zero row), codes `encode(w / scale)`.
pub fn quantize_per_channel(w: &[f32], rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
    let mut codes = Vec::with_capacity(w.len());
    let mut scales = Vec::with_capacity(rows);
    for row in w.chunks(cols.max(1)).take(rows) {
        let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = if amax > 0.0 && amax.is_finite() {
            amax / MAX
        } else {
            1.0
        };
        codes.extend(row.iter().map(|v| encode(v / scale)));
        scales.push(scale);
    }
    (codes, scales)
}

/// `codes * scale[row]` for codes `[rows, cols]`: `scales` holds one scale per row, or one for the
/// whole tensor. `None` when the lengths disagree.
pub fn dequantize(codes: &[u8], scales: &[f32], cols: usize) -> Option<Vec<f32>> {
    let rows = rows_of(codes.len(), cols, scales.len())?;
    let mut out = Vec::with_capacity(codes.len());
    for (r, row) in codes.chunks(cols.max(1)).enumerate().take(rows) {
        let s = if scales.len() == 1 {
            scales.first()
        } else {
            scales.get(r)
        };
        let s = *s?;
        out.extend(row.iter().map(|&c| decode(c) * s));
    }
    Some(out)
}

/// Rows of a `[rows, cols]` tensor of `len` elements with `scales` scales (1 or `rows`), or
/// `None` when they disagree.
pub(crate) fn rows_of(len: usize, cols: usize, scales: usize) -> Option<usize> {
    if cols == 0 || !len.is_multiple_of(cols) {
        return None;
    }
    let rows = len / cols;
    (scales == 1 || scales == rows).then_some(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The OCP E4M3 value of `code`, built independently of [`decode`]: normals as an f32 bit
    /// pattern (exponent rebiased from 7 to 127, mantissa moved to the top of f32's), subnormals
    /// as an exact f64 product.
    fn ocp(code: u8) -> Option<f32> {
        let (s, e, m) = (
            u32::from(code >> 7),
            u32::from((code >> 3) & 0xF),
            u32::from(code & 7),
        );
        if e == 0xF && m == 7 {
            return None;
        }
        let v = if e == 0 {
            let mag = f64::from(m) / 512.0;
            (if s == 1 { -mag } else { mag }) as f32
        } else {
            f32::from_bits((s << 31) | ((e + 120) << 23) | (m << 20))
        };
        Some(v)
    }

    #[test]
    fn every_code_decodes_as_the_ocp_definition_and_encodes_back() {
        for code in 0..=255u8 {
            match ocp(code) {
                None => {
                    assert!(decode(code).is_nan() && is_nan_code(code), "{code:#x}");
                    assert!(encode(decode(code)) & 0x7F == NAN_CODE);
                }
                Some(v) => {
                    let d = decode(code);
                    assert_eq!(d.to_bits(), v.to_bits(), "{code:#04x}: {d} vs {v}");
                    assert!(!is_nan_code(code));
                    assert_eq!(encode(d), code, "{code:#04x} ({d})");
                }
            }
        }
        assert_eq!((0..=255u8).filter(|&c| is_nan_code(c)).count(), 2);
    }

    #[test]
    fn ties_round_to_the_even_code_and_neighbours_to_the_nearest() {
        // Consecutive positive finite codes are consecutive values.
        for lo in 0..0x7Eu8 {
            let (a, b) = (decode(lo), decode(lo + 1));
            assert!(a < b);
            let mid = (a + b) / 2.0;
            let even = if lo % 2 == 0 { lo } else { lo + 1 };
            assert_eq!(encode(mid), even, "tie between {a} and {b}");
            assert_eq!(encode(-mid), 0x80 | even);
            let below = f32::from_bits(mid.to_bits() - 1);
            let above = f32::from_bits(mid.to_bits() + 1);
            assert_eq!(encode(below), lo, "just below the tie {a}..{b}");
            assert_eq!(encode(above), lo + 1, "just above the tie {a}..{b}");
        }
    }

    #[test]
    fn saturates_to_448_and_keeps_nan() {
        for x in [448.0f32, 449.0, 464.0, 480.0, 1e6, f32::MAX, f32::INFINITY] {
            assert_eq!(encode(x), 0x7E, "{x}");
            assert_eq!(encode(-x), 0xFE, "{x}");
        }
        assert!(is_nan_code(encode(f32::NAN)));
        assert_eq!(encode(1e-30), 0x00);
        assert_eq!(encode(-1e-30), 0x80);
    }

    #[test]
    fn per_channel_quantization_uses_each_rows_range() {
        let w = [0.5f32, -2.0, 1.0, 100.0, -300.0, 3.0];
        let (codes, scales) = quantize_per_channel(&w, 2, 3);
        assert_eq!(scales, vec![2.0 / 448.0, 300.0 / 448.0]);
        // The largest magnitude of each row maps to +-448 exactly.
        assert_eq!(codes[1], 0xFE);
        assert_eq!(codes[4], 0xFE);
        let back = dequantize(&codes, &scales, 3).unwrap();
        assert!(dequantize(&codes, &scales, 2).is_none());
        assert_eq!(
            dequantize(&codes, &scales[..1], 2).map(|v| v.len()),
            Some(6)
        );
        assert!(dequantize(&codes, &[1.0; 3], 3).is_none());
        for (x, y) in w.iter().zip(&back) {
            assert!((x - y).abs() <= x.abs() / 16.0 + 1e-6, "{x} -> {y}");
        }
    }

    proptest! {
        #[test]
        fn round_trip_is_within_half_a_step(x in -448.0f32..=448.0) {
            let d = decode(encode(x));
            // Half a step: 2^-10 among the subnormals, at most |x| / 16 among the normals.
            let bound = (x.abs() / 16.0).max(1.0 / 1024.0);
            prop_assert!((d - x).abs() <= bound, "{} -> {}", x, d);
            prop_assert_eq!(d.is_sign_negative() || d == 0.0, x.is_sign_negative() || d == 0.0);
        }

        #[test]
        fn encoding_is_monotone(x in -600.0f32..600.0, y in -600.0f32..600.0) {
            let (lo, hi) = if x <= y { (x, y) } else { (y, x) };
            prop_assert!(decode(encode(lo)) <= decode(encode(hi)));
        }

        #[test]
        fn nearest_of_all_codes(x in proptest::num::f32::NORMAL | proptest::num::f32::SUBNORMAL | proptest::num::f32::ZERO) {
            let x = x.clamp(-448.0, 448.0);
            let d = decode(encode(x));
            for code in 0..=255u8 {
                let v = decode(code);
                if !v.is_nan() {
                    prop_assert!((f64::from(d) - f64::from(x)).abs() <= (f64::from(v) - f64::from(x)).abs());
                }
            }
        }
    }
}
