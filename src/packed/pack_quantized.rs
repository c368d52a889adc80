//! compressed-tensors `pack-quantized`: integer codes of `bits` (4 or 8) bits packed into int32
//! words, `32 / bits` per word, value `i` of a word in bits `[bits * i, bits * (i + 1))` (the
//! first value in the lowest bits). Each code is stored unsigned, as the signed value plus
//! `2^(bits - 1)` (8 for 4-bit, 128 for 8-bit).
//! - `weight_packed` `[rows, ceil(cols / per_word)]`: packed along each row (the input axis), a
//!   row's last word padded with zero bits;
//! - `weight_zero_point` (asymmetric only) `[ceil(rows / per_word), groups]`: packed along the
//!   output axis, word `[i][g]` holding the zero points of rows `per_word * i ..` of group `g`;
//! - `w[r][k] = scale[r][g] * (q[r][k] - zero[r][g])` with `g = g_idx[k]` (`k / group_size`
//!   without act-order); the offsets cancel, so with unsigned codes `u` and `uz`,
//!   `w = scale * (u - uz)`, and a symmetric matrix (no zero points) has `uz = 2^(bits - 1)`.

/// Codes per int32 word for `bits` (4 or 8); `None` for other widths.
pub fn per_word(bits: u32) -> Option<usize> {
    matches!(bits, 4 | 8).then_some(32 / bits as usize)
}

/// The unsigned codes `[rows, cols]` of `words` packed along each row
/// (`[rows, ceil(cols / per_word)]`); `None` when the length disagrees or `bits` is not 4 or 8.
pub fn unpack_rows(words: &[i32], bits: u32, rows: usize, cols: usize) -> Option<Vec<u8>> {
    let per = per_word(bits)?;
    let stride = cols.div_ceil(per);
    if words.len() != rows.checked_mul(stride)? {
        return None;
    }
    let mask = (1u32 << bits) - 1;
    let mut out = Vec::with_capacity(rows * cols);
    for row in words.chunks(stride.max(1)).take(rows) {
        for k in 0..cols {
            let word = row[k / per] as u32;
            out.push(((word >> (bits as usize * (k % per))) & mask) as u8);
        }
    }
    Some(out)
}

/// The unsigned codes `[rows, cols]` of `words` packed along the rows
/// (`[ceil(rows / per_word), cols]`, the layout of `weight_zero_point`); `None` when the length
/// disagrees or `bits` is not 4 or 8.
pub fn unpack_cols(words: &[i32], bits: u32, rows: usize, cols: usize) -> Option<Vec<u8>> {
    let per = per_word(bits)?;
    if words.len() != rows.div_ceil(per).checked_mul(cols)? {
        return None;
    }
    let mask = (1u32 << bits) - 1;
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            let word = words[(r / per) * cols + c] as u32;
            out.push(((word >> (bits as usize * (r % per))) & mask) as u8);
        }
    }
    Some(out)
}

/// The unsigned zero point of a symmetric matrix: `2^(bits - 1)`.
pub fn symmetric_zero(bits: u32) -> i32 {
    1 << (bits - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_fill_each_word_from_the_lowest_bits() {
        // 4-bit, one row of 10 columns: two words, the second padded.
        let words = [0x7654_3210u32 as i32, 0x0000_00FEu32 as i32];
        let got = unpack_rows(&words, 4, 1, 10).unwrap();
        assert_eq!(got, vec![0, 1, 2, 3, 4, 5, 6, 7, 14, 15]);
        // 8-bit: four bytes per word, the lowest first.
        let got = unpack_rows(&[0x8180_7FFEu32 as i32], 8, 1, 4).unwrap();
        assert_eq!(got, vec![0xFE, 0x7F, 0x80, 0x81]);
        assert!(unpack_rows(&words, 4, 1, 17).is_none());
        assert!(unpack_rows(&words, 3, 1, 10).is_none());
    }

    #[test]
    fn zero_points_pack_down_the_rows() {
        // 10 rows, 2 groups: word [i][g] holds rows 8i.. of group g.
        let words = [
            0x7654_3210u32 as i32,
            0x89AB_CDEFu32 as i32,
            0x0000_0098u32 as i32,
            0x0000_0010u32 as i32,
        ];
        let got = unpack_cols(&words, 4, 10, 2).unwrap();
        let col0: Vec<u8> = got.iter().step_by(2).copied().collect();
        let col1: Vec<u8> = got.iter().skip(1).step_by(2).copied().collect();
        assert_eq!(col0, vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(col1, vec![15, 14, 13, 12, 11, 10, 9, 8, 0, 1]);
        assert_eq!(symmetric_zero(4), 8);
        assert_eq!(symmetric_zero(8), 128);
    }
}
