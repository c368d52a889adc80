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
