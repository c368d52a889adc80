//! AutoAWQ's GEMM layout (`version: gemm`, 4-bit): a layer `[out, in]` in groups of `group_size`
//! inputs, stored inputs first:
//! - `qweight` int32 `[in, out / 8]`, `qzeros` int32 `[in / group_size, out / 8]`: eight 4-bit
//!   values per word in AWQ's interleaved order: nibble `i` (bits `4i..4i+4`) of word `c` holds
//!   output column `8c + ORDER[i]`, `ORDER = [0, 2, 4, 6, 1, 3, 5, 7]`;
//! - `scales` f16 `[in / group_size, out]`;
//! - `w[n][k] = scales[g][n] * (q[k][n] - zeros[g][n])`, `g = k / group_size`, the zero stored as
//!   it is (no offset).

/// Output column (within its group of 8) held by each nibble of a word.
pub const ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// The codes `[rows, cols]` of `words` `[rows, cols / 8]` in AWQ's order; `None` when `cols` is
/// not a multiple of 8 or the length disagrees.
pub fn unpack(words: &[i32], rows: usize, cols: usize) -> Option<Vec<u8>> {
    if !cols.is_multiple_of(8) || words.len() != rows.checked_mul(cols / 8)? {
        return None;
    }
    let mut out = vec![0u8; rows * cols];
    for (at, &word) in words.iter().enumerate() {
        let (r, c) = (at / (cols / 8), at % (cols / 8));
        for (i, &o) in ORDER.iter().enumerate() {
            out[r * cols + 8 * c + o] = ((word as u32 >> (4 * i)) & 0x0F) as u8;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nibbles_are_interleaved() {
        // Nibbles 0..8 of the word hold 0x0..0x7; columns come out as 0, 4, 1, 5, 2, 6, 3, 7.
        let got = unpack(&[0x7654_3210u32 as i32], 1, 8).unwrap();
        assert_eq!(got, vec![0, 4, 1, 5, 2, 6, 3, 7]);
        // Two rows, two words per row.
        let got = unpack(&[0x1, 0x10, 0x100, 0xF000_0000u32 as i32], 2, 16).unwrap();
        assert_eq!(got[0], 1); // row 0, column 0 (nibble 0)
        assert_eq!(got[8 + 2], 1); // row 0, column 10 (nibble 1 of word 1)
        assert_eq!(got[16 + 4], 1); // row 1, column 4 (nibble 2)
        assert_eq!(got[16 + 8 + 7], 15); // row 1, column 15 (nibble 7 of word 1)
        assert_eq!(got.iter().filter(|&&v| v != 0).count(), 4);
        assert!(unpack(&[0; 3], 2, 16).is_none());
    }
}
