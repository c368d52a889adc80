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
//! With AVX-512 (blocks of 32 stored columns) or AVX2 (blocks of 16), each block is decoded in
//! registers: INT8 codes widened; FP8 codes moved into the high bytes of 16-bit lanes and shifted
//! into f16 bit fields (a row holding a NaN code, tracked on the way, gives NaN); 4-bit codes split
//! into the block's even columns (low nibbles) and odd columns (high nibbles), looked up in the
//! table held in registers (LUT4's; with AVX-512 also INT4's `code - zero` per group) or widened
//! (INT4 with AVX2). Where the decoded lanes do not follow the stored columns (the 4-bit kinds, FP8
//! with AVX-512) the activations are reordered to match once per product. One vector accumulator
//! per group, folded into a running vector total by the group's scale, its lanes summed at the
//! end. A matrix whose groups do not hold whole blocks of the kernel's width uses the next narrower
//! loop, down to the scalar one: each group's products added in stored column order, the group sums
//! scaled and added in group order.
//!
//! Results depend only on the matrix and the loop ([`Kernel`] and block fit), never on the thread
//! count or the number of tokens.

use super::matmul::{active_kernel, by_row_chunks, matmul, paired_columns, Kernel};
use crate::dtype::WeightSlice;
use crate::packed::{fp8, PackedKind, PackedMatrix};
use crate::weights::Weight;
use std::borrow::Cow;

/// Tokens of one register tile of the SIMD loops (a tile is four rows for one token, one row for
/// more).
const TOKENS: usize = 4;
/// Multiply-adds per parallel task, about.
const TASK_WORK: usize = 1 << 16;
/// What the SIMD loops' FP8 values are short of (they are decoded through f16, whose exponent bias
/// is 8 more than E4M3's), folded into the scales.
#[cfg(target_arch = "x86_64")]
const FP8_SHORTFALL: f32 = 256.0;

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

/// [`packed_matmul`] with a chosen kernel: its own loop where this CPU runs it and the matrix's
/// groups hold whole blocks of it, else the next narrower one (AVX-512, AVX2, scalar).
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
    let loop_kind = LoopKind::choose(kernel, &view);
    // Activations in stored column order, then (4-bit SIMD) paired within blocks.
    let mut xs = Cow::Borrowed(x);
    if let Some(perm) = &w.perm {
        xs = Cow::Owned(
            x.chunks_exact(k)
                .flat_map(|row| perm.iter().map(move |&p| row[p as usize]))
                .collect(),
        );
    }
    if let Some(order) = loop_kind.lane_columns(&view) {
        xs = Cow::Owned(
            xs.chunks_exact(order.len())
                .flat_map(|block| order.iter().map(|&c| block[c]))
                .collect(),
        );
    }
    let rows_per_task = (TASK_WORK / (k * tokens)).clamp(16, n.max(16)).min(n);
    by_row_chunks(tokens, rows_per_task, y, |first, out| {
        let rows = first..first + out.len() / tokens;
        match loop_kind {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the loop's CPU features are available and the view's blocks whole for it
            // (`LoopKind::choose`), its lengths were checked against the shape in `View::new`,
            // and every activation row has `k` elements.
            LoopKind::Avx512 => unsafe { avx512::rows(&view, &xs, tokens, rows, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            LoopKind::Avx2 => unsafe { avx2::rows(&view, &xs, tokens, rows, out) },
            _ => scalar_rows(&view, &xs, tokens, rows, out),
        }
    });
}

/// Which loop computes a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoopKind {
    /// One element at a time ([`scalar_rows`]).
    Scalar,
    /// Blocks of 16 columns in AVX2 registers.
    Avx2,
    /// Blocks of 32 columns in AVX-512 registers.
    Avx512,
}

impl LoopKind {
    /// The kernel's own loop when this CPU runs it and the matrix's groups hold whole blocks of
    /// it; else the next narrower one that fits (AVX-512, AVX2, scalar).
    fn choose(kernel: Kernel, view: &View<'_>) -> LoopKind {
        let fits = |k: Kernel| {
            kernel.is_available()
                && k.is_available()
                && k.pair_block().is_some_and(|b| view.whole_blocks(b))
        };
        match kernel {
            Kernel::Avx512 if fits(Kernel::Avx512) => LoopKind::Avx512,
            Kernel::Avx512 | Kernel::Avx2 if fits(Kernel::Avx2) => LoopKind::Avx2,
            _ => LoopKind::Scalar,
        }
    }

    /// Columns per block of a SIMD loop (its kernel's paired block).
    fn block(self) -> Option<usize> {
        match self {
            LoopKind::Scalar => None,
            LoopKind::Avx2 => Kernel::Avx2.pair_block(),
            LoopKind::Avx512 => Kernel::Avx512.pair_block(),
        }
    }

    /// The stored column (within its block) that each lane of the loop's decoded block holds,
    /// where that is not the identity: the activations are reordered to match once per product.
    /// 4-bit codes decode as the block's even columns, then its odd ones; FP8 codes in AVX-512
    /// registers as columns `0..8, 16..24, 8..16, 24..32` (two 256-bit byte unpacks).
    fn lane_columns(self, view: &View<'_>) -> Option<Vec<usize>> {
        let block = self.block()?;
        match view.decode {
            _ if view.nibbles => Some(paired_columns(block).collect()),
            Decode::Fp8 if self == LoopKind::Avx512 => Some(
                [0..8, 16..24, 8..16, 24..32]
                    .into_iter()
                    .flatten()
                    .collect(),
            ),
            _ => None,
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

    /// Whether every group and row holds whole blocks of `block` columns.
    fn whole_blocks(&self, block: usize) -> bool {
        self.cols.is_multiple_of(block) && self.group.is_multiple_of(block)
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

/// The SIMD loops over the blocks of one module's ISA (`avx2`, `avx512`), written once: each module
/// defines `BLOCK` (columns per block), the vector type `V` with `zero`, `splat`, `load`, `fma` and
/// `reduce`; a group's decoding registers `Lut` (`no_lut`, `group_lut::<KIND>(zero, table)`: INT4's
/// zero or its `code - zero` table, LUT4's table); an FP8 NaN-code tracker `Nan` (`no_nan`,
/// `saw_nan`); and `decode_block::<KIND>`, which gives the weights before their scale of one block
/// of one row as two vectors, in the lane order of [`LoopKind::lane_columns`]. Both decode FP8
/// through f16, [`FP8_SHORTFALL`] short of its value.
#[cfg(target_arch = "x86_64")]
macro_rules! simd_loops {
    ($feature:literal) => {
        use super::{Decode, View, FP8_SHORTFALL, TOKENS};
        use crate::cpu::matmul::x86::prefetch_rows_ahead;
        use std::ops::Range;

        /// Kinds of the SIMD loop, as a const parameter (so each kind gets its own loop).
        const FP8: u8 = 0;
        const INT8: u8 = 1;
        const INT4: u8 = 2;
        const LUT4: u8 = 3;

        /// The rows of one task, in tiles of four rows for one token or one row for up to four.
        ///
        /// # Safety
        /// The module's CPU features must be available, `view`'s lengths consistent with its shape
        /// (`View::new`) and its groups whole blocks (`View::whole_blocks(BLOCK)`), `xs`
        /// `[tokens, cols]` as the loop reads it, and `out` `[rows.len(), tokens]`.
        #[target_feature(enable = $feature)]
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
        #[target_feature(enable = $feature)]
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
        /// token) over the group's blocks, folded into the total by the group's scale; the
        /// total's lanes summed at the end. An FP8 row holding a NaN code gives NaN.
        #[inline]
        #[target_feature(enable = $feature)]
        unsafe fn tile<const KIND: u8, const T: usize, const R: usize>(
            view: &View<'_>,
            x: &[&[f32]; T],
            r0: usize,
        ) -> [[f32; T]; R] {
            let table = match &view.decode {
                Decode::Lut4(table) => table,
                _ => &[0.0; 16],
            };
            let rows: [*const u8; R] =
                std::array::from_fn(|i| view.codes.as_ptr().add((r0 + i) * view.row_bytes));
            let mut total = [[zero(); T]; R];
            let mut nan = [no_nan(); R];
            for g in 0..view.groups {
                let mut acc = [[zero(); T]; R];
                let mut scale = [zero(); R];
                let mut luts = [no_lut(); R];
                for i in 0..R {
                    let (s, z) = view.group_params(r0 + i, g);
                    scale[i] = splat(if KIND == FP8 { s * FP8_SHORTFALL } else { s });
                    luts[i] = group_lut::<KIND>(z, table);
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
                            prefetch_rows_ahead(rows[i].add(byte), R, view.row_bytes);
                        }
                        let (a, b) = decode_block::<KIND>(rows[i], j, luts[i], &mut nan[i]);
                        for t in 0..T {
                            let xa = load(x[t].as_ptr().add(j));
                            let xb = load(x[t].as_ptr().add(j + BLOCK / 2));
                            acc[i][t] = fma(xa, a, acc[i][t]);
                            acc[i][t] = fma(xb, b, acc[i][t]);
                        }
                    }
                    j += BLOCK;
                }
                for i in 0..R {
                    for t in 0..T {
                        total[i][t] = fma(acc[i][t], scale[i], total[i][t]);
                    }
                }
            }
            let mut y = [[0.0f32; T]; R];
            for i in 0..R {
                let nan_row = KIND == FP8 && saw_nan(nan[i]);
                for t in 0..T {
                    y[i][t] = if nan_row {
                        f32::NAN
                    } else {
                        reduce(total[i][t])
                    };
                }
            }
            y
        }
    };
}

/// The vector operations [`simd_loops`] uses, over one module's vector type `V`.
#[cfg(target_arch = "x86_64")]
macro_rules! vector_ops {
    ($feature:literal, $zero:ident, $splat:ident, $load:ident, $fma:ident, $reduce:ident) => {
        #[inline]
        #[target_feature(enable = $feature)]
        unsafe fn zero() -> V {
            $zero()
        }
        #[inline]
        #[target_feature(enable = $feature)]
        unsafe fn splat(v: f32) -> V {
            $splat(v)
        }
        #[inline]
        #[target_feature(enable = $feature)]
        unsafe fn load(p: *const f32) -> V {
            $load(p)
        }
        #[inline]
        #[target_feature(enable = $feature)]
        unsafe fn fma(a: V, b: V, c: V) -> V {
            $fma(a, b, c)
        }
        #[inline]
        #[target_feature(enable = $feature)]
        unsafe fn reduce(v: V) -> f32 {
            $reduce(v)
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The loop in AVX2 registers: blocks of 16 columns, 8 f32 lanes.

    use crate::cpu::matmul::x86::reduce8;
    use std::arch::x86_64::*;

    simd_loops!("avx2,fma,f16c");

    const BLOCK: usize = 16;

    type V = __m256;
    /// INT4: the group's zero in every lane (second vector unused); LUT4: the table's halves.
    type Lut = (__m256, __m256);
    /// The largest `2 * code mod 256` of each byte lane of the FP8 codes seen (`0xFE` for a NaN
    /// code, at most `0xFC` for the others).
    type Nan = __m128i;

    vector_ops!(
        "avx2,fma,f16c",
        _mm256_setzero_ps,
        _mm256_set1_ps,
        _mm256_loadu_ps,
        _mm256_fmadd_ps,
        reduce8
    );

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn no_lut() -> Lut {
        (_mm256_setzero_ps(), _mm256_setzero_ps())
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn group_lut<const KIND: u8>(zero: f32, table: &[f32; 16]) -> Lut {
        match KIND {
            INT4 => (_mm256_set1_ps(zero), _mm256_setzero_ps()),
            LUT4 => (
                _mm256_loadu_ps(table.as_ptr()),
                _mm256_loadu_ps(table.as_ptr().add(8)),
            ),
            _ => no_lut(),
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn no_nan() -> Nan {
        _mm_setzero_si128()
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn saw_nan(nan: Nan) -> bool {
        _mm_movemask_epi8(_mm_cmpeq_epi8(nan, _mm_set1_epi8(-2))) != 0
    }

    /// Tracks the FP8 NaN codes among the 16 `codes` ([`Nan`]).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn track_nan(codes: __m128i, nan: &mut Nan) {
        *nan = _mm_max_epu8(*nan, _mm_add_epi8(codes, codes));
    }

    /// The f16 bits 2^-8 times the FP8 E4M3 values ([`crate::packed::fp8::decode`]) of the codes
    /// in the high bytes of `words`, exactly (subnormals included): shifted down one bit, the
    /// code's sign lands in bits 15 and 14, its exponent and mantissa in f16's low exponent bits
    /// and high mantissa bits (f16's bias is 8 more than E4M3's); bit 14 is cleared. The NaN
    /// codes come out as ±1.875 ([`track_nan`] tells them).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn fp8_high_bytes_as_f16(words: __m256i) -> __m256i {
        _mm256_and_si256(
            _mm256_srai_epi16::<1>(words),
            _mm256_set1_epi16(0xBFFFu16 as i16),
        )
    }

    /// `table[index]` for 8 indices (the low four bits of each lane): the low and high halves of
    /// the table permuted by the index's low three bits, the half chosen by its bit 3.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn lookup(table: Lut, index: __m256i) -> V {
        let low = _mm256_permutevar8x32_ps(table.0, index);
        let high = _mm256_permutevar8x32_ps(table.1, index);
        let upper_half = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(index));
        _mm256_blendv_ps(low, high, upper_half)
    }

    /// The weights before their scale of the 16 stored columns from `j` of the row whose codes
    /// start at `row`: columns `j..j + 8` and `j + 8..j + 16` for the 8-bit kinds (FP8 divided by
    /// [`FP8_SHORTFALL`], its NaN codes tracked in `nan`); the even and the odd columns for the
    /// 4-bit ones.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode_block<const KIND: u8>(
        row: *const u8,
        j: usize,
        lut: Lut,
        nan: &mut Nan,
    ) -> (V, V) {
        if KIND == FP8 {
            let codes = _mm_loadu_si128(row.add(j) as *const __m128i);
            track_nan(codes, nan);
            let half = fp8_high_bytes_as_f16(_mm256_slli_epi16::<8>(_mm256_cvtepu8_epi16(codes)));
            return (
                _mm256_cvtph_ps(_mm256_castsi256_si128(half)),
                _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(half)),
            );
        }
        if KIND == INT8 {
            let first = _mm_loadl_epi64(row.add(j) as *const __m128i);
            let second = _mm_loadl_epi64(row.add(j + 8) as *const __m128i);
            return (
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(first)),
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(second)),
            );
        }
        let pairs = _mm256_cvtepu8_epi32(_mm_loadl_epi64(row.add(j / 2) as *const __m128i));
        let high = _mm256_srli_epi32::<4>(pairs);
        if KIND == LUT4 {
            // The lookup reads only the low four bits: the high nibble may stay.
            return (lookup(lut, pairs), lookup(lut, high));
        }
        let low = _mm256_and_si256(pairs, _mm256_set1_epi32(0x0F));
        (
            _mm256_sub_ps(_mm256_cvtepi32_ps(low), lut.0),
            _mm256_sub_ps(_mm256_cvtepi32_ps(high), lut.0),
        )
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The loop in AVX-512 registers: blocks of 32 columns, 16 f32 lanes.

    use super::avx2::{fp8_high_bytes_as_f16, saw_nan as saw_nan_in};
    use std::arch::x86_64::*;

    simd_loops!("avx512f");

    const BLOCK: usize = 32;

    type V = __m512;
    /// The group's 16 weights before their scale, by code: `code - zero` (INT4), the table (LUT4).
    type Lut = __m512;
    /// As AVX2's, over 32 byte lanes.
    type Nan = __m256i;

    vector_ops!(
        "avx512f",
        _mm512_setzero_ps,
        _mm512_set1_ps,
        _mm512_loadu_ps,
        _mm512_fmadd_ps,
        _mm512_reduce_add_ps
    );

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn no_lut() -> Lut {
        _mm512_setzero_ps()
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn group_lut<const KIND: u8>(zero: f32, table: &[f32; 16]) -> Lut {
        match KIND {
            INT4 => {
                let codes = _mm512_setr_ps(
                    0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0,
                    15.0,
                );
                _mm512_sub_ps(codes, _mm512_set1_ps(zero))
            }
            LUT4 => _mm512_loadu_ps(table.as_ptr()),
            _ => no_lut(),
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn no_nan() -> Nan {
        _mm256_setzero_si256()
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn saw_nan(nan: Nan) -> bool {
        let halves = _mm_max_epu8(
            _mm256_castsi256_si128(nan),
            _mm256_extracti128_si256::<1>(nan),
        );
        saw_nan_in(halves)
    }

    /// The weights before their scale of the 32 stored columns from `j` of the row whose codes
    /// start at `row`: columns `j..j + 16` and `j + 16..j + 32` (INT8); columns `j + 0..8,
    /// 16..24` and `j + 8..16, 24..32` (FP8, divided by [`FP8_SHORTFALL`], each 128-bit half of
    /// the codes unpacked into the high bytes of words; NaN codes tracked in `nan`); the even and the odd columns
    /// (4-bit: each code's `lut` lane, by its low four bits).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn decode_block<const KIND: u8>(
        row: *const u8,
        j: usize,
        lut: Lut,
        nan: &mut Nan,
    ) -> (V, V) {
        if KIND == FP8 {
            let codes = _mm256_loadu_si256(row.add(j) as *const __m256i);
            *nan = _mm256_max_epu8(*nan, _mm256_add_epi8(codes, codes));
            let zero = _mm256_setzero_si256();
            return (
                _mm512_cvtph_ps(fp8_high_bytes_as_f16(_mm256_unpacklo_epi8(zero, codes))),
                _mm512_cvtph_ps(fp8_high_bytes_as_f16(_mm256_unpackhi_epi8(zero, codes))),
            );
        }
        if KIND == INT8 {
            let first = _mm_loadu_si128(row.add(j) as *const __m128i);
            let second = _mm_loadu_si128(row.add(j + 16) as *const __m128i);
            return (
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(first)),
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(second)),
            );
        }
        // vpermps reads only the low four bits of each index: the high nibble may stay.
        let pairs = _mm512_cvtepu8_epi32(_mm_loadu_si128(row.add(j / 2) as *const __m128i));
        (
            _mm512_permutexvar_ps(pairs, lut),
            _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(pairs), lut),
        )
    }
}
