//! 4-bit weights: round-to-nearest (RTN) group quantization for quantize-on-load, and the GPTQ
//! packing of published 4-bit checkpoints.
//!
//! RTN, asymmetric, groups of [`GROUP_SIZE`] consecutive input features of one output row (the
//! last group of a row may be shorter): over a group, `lo = min(min w, 0)`, `hi = max(max w, 0)`,
//! `scale` the least f16 value at or above `(hi - lo) / 15` (1 when `hi == lo`; the f32 quotient
//! itself past f16's range), `zero = clamp(round(-lo / scale), 0, 15)`,
//! `q = clamp(round(w / scale) + zero, 0, 15)`, `w' = scale * (q - zero)`; rounding is ties to
//! even. Including 0 in the range makes `|w - w'| <= scale / 2` for every element; an f16 scale
//! lets the GPU hold each group's `(scale, zero)` in one 32-bit word
//! ([`super::PackedMatrix::device_params`]).
//!
//! GPTQ (AutoGPTQ layout, 4 bits): for a linear layer with `in` inputs and `out` outputs,
//! - `qweight` int32 `[in / 8, out]`: input `k` of output `n` is nibble `k % 8` (bits `4 (k % 8)`
//!   and up) of `qweight[k / 8][n]`;
//! - `qzeros` int32 `[groups, out / 8]`: the zero of group `g`, output `n` is nibble `n % 8` of
//!   `qzeros[g][n / 8]`;
//! - `scales` f16 `[groups, out]`; `g_idx` int32 `[in]`: the group of each input (`k / group_size`
//!   without act-order; a permuted assignment with act-order, `desc_act`);
//! - `w[n][k] = scales[g][n] * (q[k][n] - (stored_zero[g][n] + offset))`, `g = g_idx[k]`, where
//!   `offset` is 1 in the original format (`checkpoint_format: "gptq"`, AutoGPTQ and transformers
//!   store `zero - 1`; a symmetric 4-bit checkpoint stores 7 for zero 8) and 0 in `gptq_v2`.

/// Input features per RTN group.
pub const GROUP_SIZE: usize = 128;
/// Largest 4-bit code.
const QMAX: f32 = 15.0;

/// An RTN-quantized matrix `[rows, cols]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rtn {
    /// Rows (outputs).
    pub rows: usize,
    /// Columns (inputs).
    pub cols: usize,
    /// Input features per group (the last group of a row may be shorter).
    pub group_size: usize,
    /// Codes 0..=15, `[rows, cols]`.
    pub q: Vec<u8>,
    /// `[rows, groups]`.
    pub scales: Vec<f32>,
    /// Zero points 0..=15, `[rows, groups]`.
    pub zeros: Vec<u8>,
}

impl Rtn {
    /// Groups per row: `ceil(cols / group_size)`.
    pub fn groups(&self) -> usize {
        self.cols.div_ceil(self.group_size.max(1))
    }
}

/// The least f16 value at or above the positive `x`, as f32; `x` itself when no f16 is (past
/// 65504, or not finite).
fn f16_at_least(x: f32) -> f32 {
    let h = half::f16::from_f32(x);
    let up = if h.to_f32() < x {
        half::f16::from_bits(h.to_bits() + 1)
    } else {
        h
    };
    if up.is_finite() {
        up.to_f32()
    } else {
        x
    }
}

/// Quantizes `w` (`[rows, cols]`, row-major) in groups of `group_size` inputs (0 is taken as 1).
pub fn quantize_rtn(w: &[f32], rows: usize, cols: usize, group_size: usize) -> Rtn {
    let group_size = group_size.max(1);
    let groups = cols.div_ceil(group_size);
    let mut q = Vec::with_capacity(rows * cols);
    let mut scales = Vec::with_capacity(rows * groups);
    let mut zeros = Vec::with_capacity(rows * groups);
    for row in w.chunks(cols.max(1)).take(rows) {
        for group in row.chunks(group_size) {
            let lo = group.iter().fold(0.0f32, |m, &v| m.min(v));
            let hi = group.iter().fold(0.0f32, |m, &v| m.max(v));
            let scale = if hi > lo {
                f16_at_least((hi - lo) / QMAX)
            } else {
                1.0
            };
            let zero = (-lo / scale).round_ties_even().clamp(0.0, QMAX);
            q.extend(
                group
                    .iter()
                    .map(|&v| ((v / scale).round_ties_even() + zero).clamp(0.0, QMAX) as u8),
            );
            scales.push(scale);
            zeros.push(zero as u8);
        }
    }
    Rtn {
        rows,
        cols,
        group_size,
        q,
        scales,
        zeros,
    }
}

/// `scale * (q - zero)` of every element, `[rows, cols]`; `None` when the lengths of `r`'s
/// vectors disagree with its shape.
pub fn dequantize_rtn(r: &Rtn) -> Option<Vec<f32>> {
    let groups = r.groups();
    let per_group = r.rows.checked_mul(groups)?;
    let ok = r.cols > 0
        && r.q.len() == r.rows.checked_mul(r.cols)?
        && r.scales.len() == per_group
        && r.zeros.len() == per_group;
    if !ok {
        return None;
    }
    let mut out = Vec::with_capacity(r.q.len());
    for (row, codes) in r.q.chunks(r.cols).enumerate() {
        for (k, &c) in codes.iter().enumerate() {
            let at = row * groups + k / r.group_size.max(1);
            let (s, z) = (r.scales[at], r.zeros[at]);
            out.push(s * (f32::from(c) - f32::from(z)));
        }
    }
    Some(out)
}

/// Packs 4-bit codes `q` `[k, n]` (`k` a multiple of 8) along the rows: `[k / 8, n]` words, row
/// `8r + j` in nibble `j` of word row `r` (the layout of GPTQ's `qweight`). Rows past the last
/// multiple of 8 are dropped.
pub fn pack_rows(q: &[u8], k: usize, n: usize) -> Vec<i32> {
    let mut out = vec![0u32; k / 8 * n];
    for (i, &c) in q.iter().enumerate().take(k / 8 * 8 * n) {
        let (row, col) = (i / n, i % n);
        out[row / 8 * n + col] |= u32::from(c & 0x0F) << (4 * (row % 8));
    }
    out.into_iter().map(|w| w as i32).collect()
}

/// Packs 4-bit codes `z` `[g, n]` (`n` a multiple of 8) along the columns: `[g, n / 8]` words,
/// column `8c + j` in nibble `j` of word column `c` (the layout of GPTQ's `qzeros`). Columns past
/// the last multiple of 8 are dropped.
pub fn pack_cols(z: &[u8], g: usize, n: usize) -> Vec<i32> {
    let words = n / 8;
    let mut out = vec![0u32; g * words];
    for (i, &c) in z.iter().enumerate().take(g * n) {
        let (row, col) = (i / n, i % n);
        if col < words * 8 {
            out[row * words + col / 8] |= u32::from(c & 0x0F) << (4 * (col % 8));
        }
    }
    out.into_iter().map(|w| w as i32).collect()
}

/// Nibble `j` (0..8) of `word`.
pub fn nibble(word: i32, j: usize) -> u8 {
    ((word as u32 >> (4 * (j % 8))) & 0x0F) as u8
}

/// The shapes of one GPTQ layer, checked by the caller against its tensors.
#[derive(Debug, Clone, Copy)]
pub struct GptqShape {
    /// Inputs (`k`); a multiple of 8.
    pub inputs: usize,
    /// Outputs (`n`); a multiple of 8.
    pub outputs: usize,
    /// Groups.
    pub groups: usize,
}

/// Dequantizes a GPTQ layer to `[outputs, inputs]` f32. `qweight` `[inputs / 8, outputs]`,
/// `qzeros` `[groups, outputs / 8]`, `scales` `[groups, outputs]` (as f32), `g_idx` `[inputs]` with
/// every value `< groups`; `zero_offset` is 1 for the original GPTQ format, 0 for `gptq_v2`.
/// Returns `None` when a length or a group index disagrees with `shape`.
pub fn dequantize_gptq(
    shape: GptqShape,
    qweight: &[i32],
    qzeros: &[i32],
    scales: &[f32],
    g_idx: &[usize],
    zero_offset: i32,
) -> Option<Vec<f32>> {
    let GptqShape {
        inputs,
        outputs,
        groups,
    } = shape;
    let ok = inputs.is_multiple_of(8)
        && outputs.is_multiple_of(8)
        && qweight.len() == inputs / 8 * outputs
        && qzeros.len() == groups * (outputs / 8)
        && scales.len() == groups * outputs
        && g_idx.len() == inputs
        && g_idx.iter().all(|&g| g < groups);
    if !ok {
        return None;
    }
    let mut out = vec![0.0f32; outputs * inputs];
    for (k, &g) in g_idx.iter().enumerate() {
        for n in 0..outputs {
            let q = i32::from(nibble(qweight[k / 8 * outputs + n], k % 8));
            let z = i32::from(nibble(qzeros[g * (outputs / 8) + n / 8], n % 8)) + zero_offset;
            out[n * inputs + k] = scales[g * outputs + n] * (q - z) as f32;
        }
    }
    Some(out)
}

/// `g_idx` without act-order: input `k` is in group `k / group_size`.
pub fn sequential_g_idx(inputs: usize, group_size: usize) -> Vec<usize> {
    (0..inputs).map(|k| k / group_size.max(1)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn matrix(rows: usize, cols: usize, seed: &[f32]) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| seed[i % seed.len()] * (1.0 + (i % 7) as f32 * 0.3))
            .collect()
    }

    /// Transposes `[rows, cols]` codes to `[cols, rows]` (GPTQ stores inputs first).
    fn transpose(q: &[u8], rows: usize, cols: usize) -> Vec<u8> {
        (0..cols * rows)
            .map(|i| q[(i % rows) * cols + i / rows])
            .collect()
    }

    #[test]
    fn nibbles_pack_in_gptq_order() {
        // q[k][n] for k in 0..8, n in 0..8 = (k + 2n) % 16.
        let q: Vec<u8> = (0..64)
            .map(|i| ((i / 8 + 2 * (i % 8)) % 16) as u8)
            .collect();
        let rows = pack_rows(&q, 8, 8);
        assert_eq!(rows.len(), 8);
        // Column 0 holds 0,1,...,7 from nibble 0 up.
        assert_eq!(rows[0] as u32, 0x7654_3210);
        let cols = pack_cols(&q, 8, 8);
        // Row 0 holds 0,2,4,...,14 from nibble 0 up.
        assert_eq!(cols[0] as u32, 0xECA8_6420);
        for k in 0..8 {
            for n in 0..8 {
                assert_eq!(nibble(rows[n], k), q[k * 8 + n]);
                assert_eq!(nibble(cols[k], n), q[k * 8 + n]);
            }
        }
    }

    proptest! {
        #[test]
        fn rtn_error_is_at_most_half_a_scale(
            rows in 1usize..4,
            cols in 1usize..300,
            group in prop_oneof![Just(128usize), Just(32), Just(7)],
            seed in proptest::collection::vec(-4.0f32..4.0, 64),
        ) {
            let w = matrix(rows, cols, &seed);
            let r = quantize_rtn(&w, rows, cols, group);
            prop_assert_eq!(r.scales.len(), rows * cols.div_ceil(group));
            prop_assert!(r.q.iter().chain(&r.zeros).all(|&c| c <= 15));
            let back = dequantize_rtn(&r).unwrap();
            let groups = r.groups();
            for (i, (x, y)) in w.iter().zip(&back).enumerate() {
                let s = r.scales[(i / cols) * groups + (i % cols) / group];
                prop_assert!((x - y).abs() <= s * 0.5001, "{} -> {} (scale {})", x, y, s);
            }
        }

        #[test]
        fn gptq_layout_dequantizes_like_rtn_with_and_without_act_order(
            out8 in 1usize..4,
            groups in 1usize..4,
            act_order: bool,
            perm_seed: u64,
            seed in proptest::collection::vec(-3.0f32..3.0, 64),
        ) {
            let (outputs, group) = (out8 * 8, 16);
            let inputs = groups * group;
            let w = matrix(outputs, inputs, &seed);
            // Act-order: inputs visited in a permuted order, groups of consecutive visited inputs.
            let mut perm: Vec<usize> = (0..inputs).collect();
            if act_order {
                let mut state = perm_seed | 1;
                for i in (1..inputs).rev() {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    perm.swap(i, (state >> 33) as usize % (i + 1));
                }
            }
            let permuted: Vec<f32> = (0..outputs * inputs)
                .map(|i| w[(i / inputs) * inputs + perm[i % inputs]])
                .collect();
            let r = quantize_rtn(&permuted, outputs, inputs, group);
            let want_permuted = dequantize_rtn(&r).unwrap();
            // Back to the original input order, in the GPTQ layout.
            let mut q = vec![0u8; outputs * inputs];
            let mut g_idx = vec![0usize; inputs];
            for (j, &k) in perm.iter().enumerate() {
                g_idx[k] = j / group;
                for n in 0..outputs {
                    q[n * inputs + k] = r.q[n * inputs + j];
                }
            }
            let qweight = pack_rows(&transpose(&q, outputs, inputs), inputs, outputs);
            let scales = transpose_f32(&r.scales, outputs, groups);
            let zeros = transpose(&r.zeros, outputs, groups);
            let shape = GptqShape { inputs, outputs, groups };
            // gptq_v2: zeros stored as they are.
            let got = dequantize_gptq(shape, &qweight, &pack_cols(&zeros, groups, outputs), &scales, &g_idx, 0).unwrap();
            // The original format: zero - 1 stored, 1 added back (nibble arithmetic wraps 0 to 15,
            // so only zeros >= 1 survive the round trip, as in every such checkpoint).
            let minus_one: Vec<u8> = zeros.iter().map(|z| z.wrapping_sub(1) & 0x0F).collect();
            let v1 = dequantize_gptq(shape, &qweight, &pack_cols(&minus_one, groups, outputs), &scales, &g_idx, 1).unwrap();
            for n in 0..outputs {
                for (j, &k) in perm.iter().enumerate() {
                    prop_assert_eq!(got[n * inputs + k], want_permuted[n * inputs + j]);
                    if r.zeros[n * groups + j / group] >= 1 {
                        prop_assert_eq!(v1[n * inputs + k], want_permuted[n * inputs + j]);
                    }
                }
            }
            // A group index out of range is refused, not read.
            let mut bad = g_idx.clone();
            bad[0] = groups;
            prop_assert!(dequantize_gptq(shape, &qweight, &pack_cols(&zeros, groups, outputs), &scales, &bad, 0).is_none());
        }
    }

    fn transpose_f32(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        (0..cols * rows)
            .map(|i| x[(i % rows) * cols + i / rows])
            .collect()
    }
}
