//! 4-bit table codes as bitsandbytes stores a `load_in_4bit` weight `[rows, cols]` (NF4 or FP4):
//! - the elements of the flattened (row-major) matrix two per byte, the **high** nibble first:
//!   element `2i` is `byte[i] >> 4`, element `2i + 1` is `byte[i] & 0xF`;
//! - one f32 `absmax` per block of `blocksize` consecutive flattened elements (the last block may
//!   be shorter); `w[i] = table[q[i]] * absmax[i / blocksize]`, an f32 product;
//! - with double quantization the absmax values are themselves stored as bytes `qabsmax` with a
//!   256-entry f32 code `nested_code`, one f32 `nested_absmax` per block of `nested_blocksize` of
//!   them and an f32 `offset`: `absmax[i] = nested_code[qabsmax[i]] * nested_absmax[i /
//!   nested_blocksize] + offset`, the product rounded to f32 before the sum.
//!
//! The 16-value tables are bitsandbytes' built-in ones (its decoders use them, not the stored
//! `quant_map`): NF4 as listed, FP4 the values `0, 0.0625, 8, 12, 4, 6, 2, 3` and their negatives
//! (sign bit 8; code 8 is +0), divided by 12 in f32. bitsandbytes finally rounds the product to the weight's
//! original dtype (`dtype` in its quant state, e.g. bf16); here it stays f32.

use super::{LayoutError, PackedMatrix};

/// NF4: normal-distribution quantiles, code order.
const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// FP4 (1 sign, 2 exponent, 1 mantissa bit) before the division by 12, code order. Code 8 (the
/// negative zero pattern) is +0, as bitsandbytes' table holds it.
const FP4_UNSCALED: [f32; 16] = [
    0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0,
];

/// Which 16-value table a matrix's codes index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lut4 {
    /// bitsandbytes NF4.
    Nf4,
    /// bitsandbytes FP4.
    Fp4,
}

impl Lut4 {
    /// From bitsandbytes' `quant_type` (`nf4`, `fp4`).
    pub fn from_name(name: &str) -> Option<Lut4> {
        match name {
            "nf4" => Some(Lut4::Nf4),
            "fp4" => Some(Lut4::Fp4),
            _ => None,
        }
    }

    /// `nf4` or `fp4`.
    pub fn name(self) -> &'static str {
        match self {
            Lut4::Nf4 => "nf4",
            Lut4::Fp4 => "fp4",
        }
    }

    /// The value of code `q` (its low 4 bits).
    pub fn value(self, q: u8) -> f32 {
        let i = usize::from(q & 0x0F);
        match self {
            Lut4::Nf4 => NF4[i],
            Lut4::Fp4 => FP4_UNSCALED[i] / 12.0,
        }
    }

    /// The 16 values in code order.
    pub fn values(self) -> [f32; 16] {
        std::array::from_fn(|i| self.value(i as u8))
    }
}

/// The `n` codes of `bytes`, high nibble first; `None` when `bytes` is not `ceil(n / 2)` long.
pub fn unpack_high_first(bytes: &[u8], n: usize) -> Option<Vec<u8>> {
    if bytes.len() != n.div_ceil(2) {
        return None;
    }
    let mut out: Vec<u8> = bytes.iter().flat_map(|&b| [b >> 4, b & 0x0F]).collect();
    out.truncate(n);
    Some(out)
}

/// The f32 absmax of each block from its double-quantized form (see the module documentation);
/// `None` when the lengths disagree.
pub fn nested_absmax(
    qabsmax: &[u8],
    nested_code: &[f32],
    nested_absmax: &[f32],
    nested_blocksize: usize,
    offset: f32,
) -> Option<Vec<f32>> {
    let ok = nested_code.len() == 256
        && nested_blocksize > 0
        && nested_absmax.len() == qabsmax.len().div_ceil(nested_blocksize);
    ok.then(|| {
        qabsmax
            .iter()
            .enumerate()
            .map(|(i, &q)| {
                let product = nested_code[usize::from(q)] * nested_absmax[i / nested_blocksize];
                product + offset
            })
            .collect()
    })
}

/// `table[q[i]] * absmax[i / blocksize]` for the `q.len()` flattened elements; `None` when
/// `absmax` does not have one value per block.
pub fn dequantize(table: Lut4, q: &[u8], absmax: &[f32], blocksize: usize) -> Option<Vec<f32>> {
    if blocksize == 0 || absmax.len() != q.len().div_ceil(blocksize) {
        return None;
    }
    Some(
        q.iter()
            .enumerate()
            .map(|(i, &c)| table.value(c) * absmax[i / blocksize])
            .collect(),
    )
}

/// Quantizes `w` (`[rows, cols]`, row-major) to `table` codes in groups of `group_size` columns of
/// a row (the last group of a row may be shorter), as bitsandbytes quantizes a block: the group's
/// scale is its largest magnitude, each element's code the table value nearest to `w / scale` (the
/// lower code on a tie; every code 0 gives the value nearest 0 when the scale is 0). For tests and
/// benchmarks of the packed kernels; the loaders read published codes.
pub fn quantize(
    table: Lut4,
    w: &[f32],
    (rows, cols): (usize, usize),
    group_size: usize,
) -> Result<PackedMatrix, LayoutError> {
    if group_size == 0 || w.len() != rows.saturating_mul(cols) {
        return Err(LayoutError(format!(
            "{} values for [{rows}, {cols}] in groups of {group_size}",
            w.len()
        )));
    }
    let values = table.values();
    let nearest = |x: f32| -> u8 {
        let distance = |q: usize| (values[q] - x).abs();
        (0..16).fold(0, |best, q| {
            if distance(q) < distance(best) {
                q
            } else {
                best
            }
        }) as u8
    };
    let mut q = Vec::with_capacity(w.len());
    let mut scales = Vec::with_capacity(rows * cols.div_ceil(group_size));
    for row in w.chunks(cols.max(1)).take(rows) {
        for group in row.chunks(group_size) {
            let scale = group.iter().fold(0.0f32, |m, &v| m.max(v.abs()));
            let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            q.extend(group.iter().map(|&v| nearest(v * inverse)));
            scales.push(scale);
        }
    }
    PackedMatrix::lut4(table, &q, &scales, (rows, cols), group_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_bitsandbytes_values() {
        // FP4 codes 0..8 are 0, 0.0625, 8, 12, 4, 6, 2, 3 (over 12); 8..16 the same negated.
        assert_eq!(Lut4::Fp4.value(3), 1.0);
        assert_eq!(Lut4::Fp4.value(5), 0.5);
        assert_eq!(Lut4::Fp4.value(7), 0.25);
        assert_eq!(Lut4::Fp4.value(10), -8.0 / 12.0);
        assert_eq!(Lut4::Fp4.value(8).to_bits(), 0.0f32.to_bits());
        // NF4 runs from -1 to 1 through 0 at code 7, increasing.
        let nf4 = Lut4::Nf4.values();
        assert_eq!((nf4[0], nf4[7], nf4[15]), (-1.0, 0.0, 1.0));
        assert!(nf4.windows(2).all(|p| p[0] < p[1]));
        assert_eq!(nf4[14], 0.722_956_84);
    }

    #[test]
    fn quantizing_picks_the_nearest_value_of_each_group() {
        for table in [Lut4::Nf4, Lut4::Fp4] {
            let values = table.values();
            let gap = values
                .iter()
                .flat_map(|a| values.iter().map(move |b| (a - b).abs()))
                .filter(|&d| d > 0.0)
                .fold(0.0f32, f32::max);
            // Two rows of 40 columns in groups of 16 (the last of each row 8 long); one group zero.
            let mut w: Vec<f32> = (0..80)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.07)
                .collect();
            w[16..32].fill(0.0);
            let p = quantize(table, &w, (2, 40), 16).unwrap();
            assert_eq!(
                p.kind,
                crate::packed::PackedKind::Lut4 {
                    table,
                    group_size: 16
                }
            );
            assert_eq!(p.params.len(), 2 * 3);
            assert_eq!(p.params[1], 0.0, "the zero group's scale");
            let back = p.dequantize();
            for (i, (&x, &y)) in w.iter().zip(&back).enumerate() {
                let scale = p.params[(i / 40) * 3 + (i % 40) / 16];
                // Within half the widest gap between table values of the group's scale, and every
                // group's largest magnitude is exact (the table holds -1 or 1).
                assert!(
                    (x - y).abs() <= 0.5 * gap * scale,
                    "{table:?} element {i}: {x} -> {y}"
                );
                if x.abs() == scale && scale > 0.0 {
                    assert_eq!(x, y, "{table:?} element {i}");
                }
            }
            // Every table value (times a power-of-two scale) is its own code.
            let exact: Vec<f32> = values.iter().map(|v| v * 0.5).collect();
            let mut row = exact.clone();
            row.push(0.5); // the scale: the largest magnitude of the group is 0.5
            row.push(0.0);
            let p = quantize(table, &row, (1, 18), 18).unwrap();
            assert_eq!(&p.dequantize()[..16], &exact[..]);
        }
        assert!(quantize(Lut4::Nf4, &[0.0; 6], (2, 4), 2).is_err());
        assert!(quantize(Lut4::Nf4, &[0.0; 8], (2, 4), 0).is_err());
    }

    #[test]
    fn high_nibble_comes_first() {
        assert_eq!(
            unpack_high_first(&[0xA3, 0x5F], 4),
            Some(vec![10, 3, 5, 15])
        );
        assert_eq!(unpack_high_first(&[0xA3, 0x50], 3), Some(vec![10, 3, 5]));
        assert_eq!(unpack_high_first(&[0xA3], 3), None);
    }

    #[test]
    fn blocks_run_over_the_flattened_elements() {
        // Blocks of 3 over 5 elements: the second block is short.
        let q = [15, 0, 7, 3, 15];
        let got = dequantize(Lut4::Nf4, &q, &[2.0, 0.5], 3).unwrap();
        assert_eq!(got, vec![2.0, -2.0, 0.0, 0.5 * Lut4::Nf4.value(3), 0.5]);
        assert!(dequantize(Lut4::Nf4, &q, &[2.0], 3).is_none());
        let mut code = vec![0.0f32; 256];
        code[1] = 0.5;
        code[2] = -0.25;
        let absmax = nested_absmax(&[1, 2, 1], &code, &[4.0, 8.0], 2, 0.125).unwrap();
        assert_eq!(absmax, vec![2.125, -0.875, 4.125]);
    }
}
