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

/// `codes * scale[row]` (`scales` has one entry per row, or one for the whole tensor).
pub fn dequantize(codes: &[u8], scales: &[f32], cols: usize) -> Vec<f32> {
    codes
        .chunks(cols.max(1))
        .enumerate()
        .flat_map(|(r, row)| {
            let s = if scales.len() == 1 {
                scales[0]
            } else {
                scales[r]
            };
            row.iter().map(move |&c| decode(c) * s)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        assert_eq!(decode(0x00), 0.0);
        assert_eq!(decode(0x01), 2f32.powi(-9));
        assert_eq!(decode(0x08), 2f32.powi(-6));
        assert_eq!(decode(0x38), 1.0);
        assert_eq!(decode(0x7E), 448.0);
        assert_eq!(decode(0xFE), -448.0);
        assert!(decode(0x7F).is_nan() && decode(0xFF).is_nan());
        assert_eq!(encode(1000.0), 0x7E);
        assert_eq!(encode(f32::NEG_INFINITY), 0xFE);
    }
}
