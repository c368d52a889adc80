//! The f32 exponential of the CPU attention's softmax, `exp(x)` for `x <= 0` (the scores less
//! their maximum), in plain multiplies and adds so that it vectorizes and gives the same bits in
//! scalar code and in every SIMD compilation.
//!
//! `x = n ln 2 + r` with `n` the nearest integer to `x / ln 2` and `|r| <= ln 2 / 2` (`n ln 2` in
//! two parts, the first exact for every `n` used); `exp(r)` by its Taylor series to `r^7 / 7!`
//! (truncation below 0.1 u); the result scaled by `2^n` in two exact steps so that results below
//! 2^-126 round once. Inputs below -104 give 0 (as `exp` rounds them); NaN gives NaN.
//!
//! Its relative error, measured over every f32 `x` in [-104, 0] with a normal result, is at most
//! 1.45 u (u = 2^-24, one ulp is up to 2 u); the test below checks a spread sample of them, and
//! `exhaustive` (ignored; `cargo test --release --lib exp::tests -- --ignored`) checks all.

/// `log2(e)`.
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// `1.5 * 2^23`: added and taken away, it rounds an f32 below 2^22 in magnitude to an integer.
const ROUND: f32 = 12_582_912.0;
/// `ln 2` to 9 bits (355 / 512, exactly): `n * LN2_HI` is exact for `|n| < 2^15`.
const LN2_HI: f32 = 355.0 / 512.0;
/// `ln 2 - LN2_HI`.
const LN2_LO: f32 = -2.121_944_4e-4;
/// Below this every result rounds to 0.
const LOWEST: f32 = -104.0;
/// `1 / k!` for `k` = 2..=7, the series' coefficients past `1 + r`.
const INVERSE_FACTORIALS: [f32; 6] = [
    1.0 / 2.0,
    1.0 / 6.0,
    1.0 / 24.0,
    1.0 / 120.0,
    1.0 / 720.0,
    1.0 / 5040.0,
];

/// `exp(x)` for `x` in [-104, 0] within 1.45 u relative (see the module docs); below -104 gives 0,
/// above 0 (never passed by the softmax) gives 1.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // NaN stays NaN.
    let x = x.clamp(LOWEST, 0.0);
    let (n, n_int) = nearest_power(x);
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut q = INVERSE_FACTORIALS[5];
    for &c in INVERSE_FACTORIALS[..5].iter().rev() {
        q = q * r + c;
    }
    let p = (q * (r * r) + r) + 1.0;
    // n in [-150, 0]: 2^n as 2^(n/2) 2^(n - n/2), both normal; the first product is exact.
    let half = n_int >> 1;
    p * power_of_two(half) * power_of_two(n_int - half)
}

/// `n`, the integer nearest `x / ln 2` for `x` in [-104, 0], as an f32 and as an integer. The
/// integer is read from the bits of `n + ROUND` (one unit a step there): an integer subtraction
/// vectorizes, where a float-to-integer cast's saturation does not. For NaN the integer is
/// meaningless and the result NaN anyway.
#[inline(always)]
fn nearest_power(x: f32) -> (f32, i32) {
    let shifted = x * LOG2E + ROUND;
    let n_int = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    (shifted - ROUND, n_int)
}

/// `2^k` for `k` in [-126, 127].
#[inline(always)]
fn power_of_two(k: i32) -> f32 {
    f32::from_bits(((k + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Worst relative error of [`exp`] over the f32 in [-104, 0] whose bit patterns are
    /// `0x8000_0000 + i * step`, in units of u, where the true value is normal.
    fn worst_error(step: usize) -> f64 {
        let last = LOWEST.to_bits();
        (0x8000_0000u32..=last)
            .step_by(step)
            .map(f32::from_bits)
            .filter_map(|x| {
                let truth = (x as f64).exp();
                (truth >= f64::from(f32::MIN_POSITIVE))
                    .then(|| ((exp(x) as f64 - truth) / truth).abs() / 2f64.powi(-24))
            })
            .fold(0.0, f64::max)
    }

    #[test]
    fn within_its_documented_error_on_a_spread_sample() {
        // About 1.1 million inputs spread over the whole range, every binade included.
        assert!(worst_error(997) <= 1.45);
    }

    #[test]
    #[ignore = "every f32 in [-104, 0]: about a minute in release"]
    fn exhaustive() {
        assert!(worst_error(1) <= 1.45);
    }

    /// The integer read from the bits is the float's value, for every f32 in [-104, 0].
    #[test]
    fn the_integer_power_is_the_float_one() {
        for x in (0x8000_0000u32..=LOWEST.to_bits()).map(f32::from_bits) {
            let (n, n_int) = nearest_power(x);
            assert_eq!(n_int, n as i32, "x = {x:e}");
        }
    }

    #[test]
    fn edges() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-0.0), 1.0);
        assert_eq!(exp(-104.0), 0.0);
        assert_eq!(exp(-1e30), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(f32::NAN).is_nan());
        // The smallest results round once, as the true value does.
        for x in [-87.0f32, -88.0, -95.0, -100.0, -103.0] {
            let truth = (x as f64).exp() as f32;
            let got = exp(x);
            assert!(
                (got - truth).abs() <= f32::from_bits(1),
                "exp({x}) = {got:e}, true {truth:e}"
            );
        }
    }
}
