//! Products of f32 activations with quantized weights held packed ([`PackedMatrix`]), without
//! expanding them: `y[t, n] = sum_k x[t, k] * W[n, k]` for `x: [tokens, k]` f32, `W: [n, k]` the
//! values [`PackedMatrix::dequantize`] defines, `y: [tokens, n]` f32. A decode token reads one byte
//! (8-bit) or half a byte (4-bit) per weight instead of the four of a dequantized f32 copy, which
//! is never made.
//!
//! Each row is a sum over its groups (the whole row for the 8-bit kinds, one scale each):
//! `y = sum_g scale_g * sum_{k in g} x[k] * v(k)`, where `v` is the weight before its scale: the
//! FP8 value of the code, the INT8 code, `code - zero_g` (INT4) or `table[code]` (LUT4). An
//! act-order matrix stores its columns permuted: the activations are permuted once per product
//! to match.
//!
//! With AVX2 (also used on AVX-512 CPUs), blocks of 16 stored columns are decoded in registers:
//! 8-bit codes widened (FP8 codes rebuilt as f16 and converted), 4-bit codes split into the
//! block's even columns (low nibbles) and odd columns (high nibbles) against activations paired to
//! match ([`super::matmul`]'s pairing); one vector accumulator per group, folded into a running
//! vector total by the group's scale, its lanes summed at the end. Matrices whose columns or
//! groups are not multiples of 16 use the scalar loop: each group's products added in stored
//! column order, the group sums scaled and added in group order.
//!
//! Results depend only on the matrix, `k` and the [`Kernel`] class (scalar or SIMD), never on the
//! thread count or the number of tokens.

use super::matmul::{active_kernel, matmul, pair_activations, Kernel};
use crate::dtype::WeightSlice;
use crate::packed::{fp8, PackedKind, PackedMatrix};
use crate::weights::Weight;
use rayon::prelude::*;
use std::borrow::Cow;

/// Tokens of one register tile with the SIMD loop (and rows per tile: [`simd_rows`]).
const TOKENS: usize = 4;
/// Multiply-adds per parallel task, about.
const TASK_WORK: usize = 1 << 16;
/// Columns of a SIMD block.
const BLOCK: usize = 16;

/// A matrix `[n, k]` a product reads: its stored elements, or a quantized matrix held packed.
#[derive(Debug, Clone, Copy)]
pub enum Matrix<'a> {
    /// Elements in bf16, f16 or f32.
    Dense(WeightSlice<'a>),
    /// Codes and parameters ([`packed_matmul`]).
    Packed(&'a PackedMatrix),
}

impl<'a> Matrix<'a> {
    /// The weight's packed form when it has one (so it is never dequantized), else its elements.
    pub fn of(w: &'a Weight) -> Matrix<'a> {
        match w.tensor.packed() {
            Some(packed) => Matrix::Packed(packed),
            None => Matrix::Dense(w.data()),
        }
    }

    /// `y[t, n] = sum_k x[t, k] * self[n, k]`: [`matmul`] or [`packed_matmul`].
    ///
    /// # Panics
    /// When the shapes disagree (a packed matrix must be `[n, k]`).
    pub fn product(self, x: &[f32], n: usize, k: usize, y: &mut [f32]) {
        match self {
            Matrix::Dense(w) => matmul(x, w, n, k, y),
            Matrix::Packed(w) => {
                assert_eq!((w.rows, w.cols), (n, k), "packed_matmul: not [{n}, {k}]");
                packed_matmul(x, w, y)
            }
        }
    }
}

impl<'a> From<WeightSlice<'a>> for Matrix<'a> {
    fn from(w: WeightSlice<'a>) -> Self {
        Matrix::Dense(w)
    }
}

/// `y[t, n] = sum_k x[t, k] * w[n, k]` for the packed `w: [n, k]`, with the [`active_kernel`].
///
/// # Panics
/// When `x` is not `[tokens, w.cols]`, `y` not `[tokens, w.rows]`, or `w`'s codes, parameters or
/// permutation do not have the lengths its kind and shape need.
pub fn packed_matmul(x: &[f32], w: &PackedMatrix, y: &mut [f32]) {
    packed_matmul_with(active_kernel(), x, w, y)
}

/// [`packed_matmul`] with a chosen kernel: [`Kernel::Scalar`] runs the scalar loop, the others
/// the AVX2 one where this CPU has AVX2 and the matrix's blocks allow it.
///
/// # Panics
/// As [`packed_matmul`].
pub fn packed_matmul_with(kernel: Kernel, x: &[f32], w: &PackedMatrix, y: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    assert!(k > 0, "packed_matmul: the matrix has no columns");
    assert_eq!(x.len() % k, 0, "packed_matmul: x is not [tokens, {k}]");
    let tokens = x.len() / k;
    assert_eq!(
        y.len(),
        tokens * n,
        "packed_matmul: y is not [{tokens}, {n}]"
    );
    let view = View::new(w);
    if tokens == 0 || n == 0 {
        return;
    }
    let simd = kernel != Kernel::Scalar && Kernel::Avx2.is_available() && view.simd_blocks();
    // Activations in stored column order, then (4-bit SIMD) paired within blocks.
    let mut xs = Cow::Borrowed(x);
    if let Some(perm) = &w.perm {
        xs = Cow::Owned(
            x.chunks_exact(k)
                .flat_map(|row| perm.iter().map(move |&p| row[p as usize]))
                .collect(),
        );
    }
    if simd && view.nibbles {
        xs = Cow::Owned(pair_activations(&xs, k, BLOCK));
    }
    let rows_per_task = (TASK_WORK / (k * tokens)).clamp(16, n.max(16)).min(n);
    let mut yt = vec![0.0f32; n * tokens];
    yt.par_chunks_mut(rows_per_task * tokens)
        .enumerate()
        .for_each(|(chunk, out)| {
            let first = chunk * rows_per_task;
            let rows = first..first + out.len() / tokens;
            if simd {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX2, FMA and F16C are available (checked above), the view's lengths were
                // checked against the shape in `View::new`, its blocks in `simd_blocks`, and every
                // activation row has `k` elements.
                unsafe {
                    x86::rows(&view, &xs, tokens, rows, out)
                };
            } else {
                scalar_rows(&view, &xs, tokens, rows, out);
            }
        });
    for (r, row) in yt.chunks_exact(tokens).enumerate() {
        for (t, &v) in row.iter().enumerate() {
            y[t * n + r] = v;
        }
    }
}

/// The weight before its scale of one code.
#[derive(Debug, Clone, Copy)]
enum Decode {
    /// FP8 E4M3 value.
    Fp8,
    /// Signed 8-bit code.
    Int8,
    /// `code - zero` of the group.
    Int4,
    /// `table[code]`.
    Lut4([f32; 16]),
}

/// A packed matrix as the loops read it, its lengths checked.
struct View<'a> {
    decode: Decode,
    /// 4-bit codes, two per byte (low nibble = even stored column).
    nibbles: bool,
    cols: usize,
    /// Bytes of codes per row.
    row_bytes: usize,
    /// Columns per group (all of them for the 8-bit kinds).
    group: usize,
    groups: usize,
    /// Parameters per (row, group): the scale, then INT4's zero.
    params_per_group: usize,
    codes: &'a [u8],
    params: &'a [f32],
}

impl<'a> View<'a> {
    fn new(w: &'a PackedMatrix) -> View<'a> {
        let (decode, group, params_per_group) = match w.kind {
            PackedKind::Fp8 => (Decode::Fp8, w.cols, 1),
            PackedKind::Int8 => (Decode::Int8, w.cols, 1),
            PackedKind::Int4 { group_size } => (Decode::Int4, group_size, 2),
            PackedKind::Lut4 { table, group_size } => (Decode::Lut4(table.values()), group_size, 1),
        };
        let nibbles = matches!(decode, Decode::Int4 | Decode::Lut4(_));
        assert!(group > 0, "packed_matmul: empty groups");
        assert!(
            !nibbles || w.cols.is_multiple_of(2),
            "packed_matmul: 4-bit rows of odd length {}",
            w.cols
        );
        let row_bytes = if nibbles { w.cols / 2 } else { w.cols };
        let groups = w.cols.div_ceil(group);
        assert_eq!(w.codes.len(), w.rows * row_bytes, "packed_matmul: codes");
        assert_eq!(
            w.params.len(),
            w.rows * groups * params_per_group,
            "packed_matmul: parameters"
        );
        if let Some(perm) = &w.perm {
            assert!(
                perm.len() == w.cols && perm.iter().all(|&p| (p as usize) < w.cols),
                "packed_matmul: permutation"
            );
        }
        View {
            decode,
            nibbles,
            cols: w.cols,
            row_bytes,
            group,
            groups,
            params_per_group,
            codes: &w.codes,
            params: &w.params,
        }
    }

    /// Whether the SIMD loop can run: whole blocks in every group and row.
    fn simd_blocks(&self) -> bool {
        self.cols.is_multiple_of(BLOCK) && self.group.is_multiple_of(BLOCK)
    }

    /// Scale and zero (0 where the kind has none) of group `g` of row `r`.
    fn group_params(&self, r: usize, g: usize) -> (f32, f32) {
        let at = (r * self.groups + g) * self.params_per_group;
        let zero = match self.decode {
            Decode::Int4 => self.params[at + 1],
            _ => 0.0,
        };
        (self.params[at], zero)
    }

    /// The weight before its scale at stored column `j` of row `r`, in group with `zero`.
    fn value(&self, r: usize, j: usize, zero: f32) -> f32 {
        let row = &self.codes[r * self.row_bytes..(r + 1) * self.row_bytes];
        let code = match self.nibbles {
            true if j.is_multiple_of(2) => row[j / 2] & 0x0F,
            true => row[j / 2] >> 4,
            false => row[j],
        };
        match self.decode {
            Decode::Fp8 => fp8::decode(code),
            Decode::Int8 => f32::from(code as i8),
            Decode::Int4 => f32::from(code) - zero,
            Decode::Lut4(table) => table[usize::from(code)],
        }
    }
}

/// `out[(r - rows.start) * tokens + t] = y[t, r]` for the rows of one task, one element at a time.
fn scalar_rows(
    view: &View<'_>,
    xs: &[f32],
    tokens: usize,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let k = view.cols;
    for (i, r) in rows.enumerate() {
        for t in 0..tokens {
            let x = &xs[t * k..(t + 1) * k];
            let mut total = 0.0f32;
            for g in 0..view.groups {
                let (scale, zero) = view.group_params(r, g);
                let mut acc = 0.0f32;
                let columns = g * view.group..((g + 1) * view.group).min(k);
                for (j, &xj) in columns.clone().zip(&x[columns]) {
                    acc += xj * view.value(r, j, zero);
                }
                total += acc * scale;
            }
            out[i * tokens + t] = total;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The AVX2 loop: register tiles of `T` tokens times `R` rows over blocks of 16 stored
    //! columns.

    use super::{Decode, View, BLOCK, TOKENS};
    use crate::cpu::matmul::x86::{prefetch_ahead, reduce8};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// What the SIMD FP8 values are short of: 2^8 (folded into the scales).
    const FP8_SHORTFALL: f32 = 256.0;

    /// The FP8 E4M3 values ([`crate::packed::fp8::decode`]) divided by [`FP8_SHORTFALL`] of the
    /// 16 codes at `p`, exactly: each code's sign, exponent and mantissa moved into an f16, whose
    /// exponent bias is 8 more than E4M3's (so the f16 value is 2^-8 times the FP8 one,
    /// subnormals included), the NaN codes made NaN, then converted to f32. Codes 0..8, then 8..16.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn fp8_values(p: *const u8) -> (__m256, __m256) {
        let b = _mm256_cvtepu8_epi16(_mm_loadu_si128(p as *const __m128i));
        let magnitude = _mm256_and_si256(b, _mm256_set1_epi16(0x7F));
        let sign = _mm256_and_si256(_mm256_slli_epi16::<8>(b), _mm256_set1_epi16(i16::MIN));
        let half = _mm256_or_si256(_mm256_slli_epi16::<7>(magnitude), sign);
        let is_nan = _mm256_cmpeq_epi16(magnitude, _mm256_set1_epi16(0x7F));
        let half = _mm256_or_si256(half, _mm256_and_si256(is_nan, _mm256_set1_epi16(0x7E00)));
        (
            _mm256_cvtph_ps(_mm256_castsi256_si128(half)),
            _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(half)),
        )
    }

    /// Kinds of the SIMD loop, as a const parameter (so each kind gets its own loop).
    const FP8: u8 = 0;
    const INT8: u8 = 1;
    const INT4: u8 = 2;
    const LUT4: u8 = 3;

    /// The rows of one task, in tiles of four rows for one token or one row for up to four.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available, `view`'s lengths consistent with its shape
    /// (`View::new`) and its blocks whole (`View::simd_blocks`), `xs` `[tokens, cols]` as the loop
    /// reads it, and `out` `[rows.len(), tokens]`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows(
        view: &View<'_>,
        xs: &[f32],
        tokens: usize,
        rows: Range<usize>,
        out: &mut [f32],
    ) {
        match view.decode {
            Decode::Fp8 => rows_of::<FP8>(view, xs, tokens, rows, out),
            Decode::Int8 => rows_of::<INT8>(view, xs, tokens, rows, out),
            Decode::Int4 => rows_of::<INT4>(view, xs, tokens, rows, out),
            Decode::Lut4(_) => rows_of::<LUT4>(view, xs, tokens, rows, out),
        }
    }

    /// [`rows`] for one kind.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_of<const KIND: u8>(
        view: &View<'_>,
        xs: &[f32],
        tokens: usize,
        rows: Range<usize>,
        out: &mut [f32],
    ) {
        let k = view.cols;
        let start = rows.start;
        if tokens == 1 {
            let x = [&xs[..k]];
            let mut r = rows.start;
            while r + 4 <= rows.end {
                let y = tile::<KIND, 1, 4>(view, &x, r);
                for (i, v) in y.iter().enumerate() {
                    out[r - start + i] = v[0];
                }
                r += 4;
            }
            for r in r..rows.end {
                out[r - start] = tile::<KIND, 1, 1>(view, &x, r)[0][0];
            }
            return;
        }
        for t0 in (0..tokens).step_by(TOKENS) {
            let used = (tokens - t0).min(TOKENS);
            let x: [&[f32]; TOKENS] = std::array::from_fn(|j| {
                let t = t0 + j.min(used - 1);
                &xs[t * k..(t + 1) * k]
            });
            for r in rows.clone() {
                let y = if used == 1 {
                    [tile::<KIND, 1, 1>(view, &[x[0]], r)[0][0]; TOKENS]
                } else {
                    tile::<KIND, TOKENS, 1>(view, &x, r)[0]
                };
                let at = (r - start) * tokens + t0;
                out[at..at + used].copy_from_slice(&y[..used]);
            }
        }
    }

    /// `y[i][t]` = row `r0 + i` times token row `x[t]`: per group, one accumulator per (row,
    /// token) over the group's blocks, folded into the total by the group's scale; the total's
    /// lanes summed at the end.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const KIND: u8, const T: usize, const R: usize>(
        view: &View<'_>,
        x: &[&[f32]; T],
        r0: usize,
    ) -> [[f32; T]; R] {
        let table = match view.decode {
            Decode::Lut4(table) => table,
            _ => [0.0; 16],
        };
        let table = (
            _mm256_loadu_ps(table.as_ptr()),
            _mm256_loadu_ps(table.as_ptr().add(8)),
        );
        let rows: [*const u8; R] =
            std::array::from_fn(|i| view.codes.as_ptr().add((r0 + i) * view.row_bytes));
        let mut total = [[_mm256_setzero_ps(); T]; R];
        for g in 0..view.groups {
            let mut acc = [[_mm256_setzero_ps(); T]; R];
            let mut scale = [_mm256_setzero_ps(); R];
            let mut zero = [_mm256_setzero_ps(); R];
            for i in 0..R {
                let (s, z) = view.group_params(r0 + i, g);
                let s = if KIND == FP8 { s * FP8_SHORTFALL } else { s };
                scale[i] = _mm256_set1_ps(s);
                zero[i] = _mm256_set1_ps(z);
            }
            let mut j = g * view.group;
            let end = (j + view.group).min(view.cols);
            while j < end {
                let byte = if KIND == INT4 || KIND == LUT4 {
                    j / 2
                } else {
                    j
                };
                for i in 0..R {
                    if byte % 64 == 0 {
                        prefetch_ahead(rows[i].add(byte));
                    }
                    let (a, b) = decode_block::<KIND>(rows[i], j, zero[i], table);
                    for t in 0..T {
                        let xa = _mm256_loadu_ps(x[t].as_ptr().add(j));
                        let xb = _mm256_loadu_ps(x[t].as_ptr().add(j + BLOCK / 2));
                        acc[i][t] = _mm256_fmadd_ps(xa, a, acc[i][t]);
                        acc[i][t] = _mm256_fmadd_ps(xb, b, acc[i][t]);
                    }
                }
                j += BLOCK;
            }
            for i in 0..R {
                for t in 0..T {
                    total[i][t] = _mm256_fmadd_ps(acc[i][t], scale[i], total[i][t]);
                }
            }
        }
        let mut y = [[0.0f32; T]; R];
        for i in 0..R {
            for t in 0..T {
                y[i][t] = reduce8(total[i][t]);
            }
        }
        y
    }

    /// The weights before their scale of the 16 stored columns from `j` of the row whose codes
    /// start at `row`: columns `j..j + 8` and `j + 8..j + 16` for the 8-bit kinds; the even and
    /// the odd columns for the 4-bit ones (`zero`: INT4's zero; `table`: LUT4's two halves).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode_block<const KIND: u8>(
        row: *const u8,
        j: usize,
        zero: __m256,
        table: (__m256, __m256),
    ) -> (__m256, __m256) {
        if KIND == FP8 {
            return fp8_values(row.add(j));
        }
        if KIND == INT8 {
            let first = _mm_loadl_epi64(row.add(j) as *const __m128i);
            let second = _mm_loadl_epi64(row.add(j + 8) as *const __m128i);
            return (
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(first)),
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(second)),
            );
        }
        let bytes = _mm_loadl_epi64(row.add(j / 2) as *const __m128i);
        let pairs = _mm256_cvtepu8_epi32(bytes);
        let low = _mm256_and_si256(pairs, _mm256_set1_epi32(0x0F));
        let high = _mm256_srli_epi32::<4>(pairs);
        if KIND == LUT4 {
            return (lookup(table, low), lookup(table, high));
        }
        (
            _mm256_sub_ps(_mm256_cvtepi32_ps(low), zero),
            _mm256_sub_ps(_mm256_cvtepi32_ps(high), zero),
        )
    }

    /// `table[index]` for 8 indices in 0..16: the low and high halves of the table permuted by
    /// the index's low three bits, the half chosen by its bit 3.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn lookup(table: (__m256, __m256), index: __m256i) -> __m256 {
        let low = _mm256_permutevar8x32_ps(table.0, index);
        let high = _mm256_permutevar8x32_ps(table.1, index);
        let upper_half = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(index));
        _mm256_blendv_ps(low, high, upper_half)
    }
}
