//! Products of f32 activations with stored weights: `y[t, n] = sum_k x[t, k] * W[n, k]` for
//! `x: [tokens, k]` f32, `W: [n, k]` in bf16, f16 or f32 ([`WeightSlice`]), `y: [tokens, n]` f32,
//! accumulated in f32.
//!
//! Output rows `n` are split into chunks computed in parallel (rayon). Within a chunk, a register
//! tile of up to four tokens times a few weight rows (four with AVX-512; with AVX2 four for one
//! token, two for more) is accumulated at once, so a prefill reads each weight row from memory
//! once and each load feeds several multiply-adds. The inner loops use AVX-512F or
//! AVX2+FMA(+F16C) when the CPU has them, else a portable scalar loop. bf16 weights are loaded as
//! 32-bit pairs and become two f32 vectors by one shift and one mask (no widening shuffles),
//! against activations reordered once per product to match (`pair_activations`).
//!
//! The kernel is chosen at run time ([`active_kernel`]): the fastest this CPU has, or the one the
//! `MIXTRAL_CPU_KERNEL` environment variable names (`scalar`, `avx2`, `avx512`), or the one
//! given to [`set_active_kernel`].
//!
//! Results are deterministic: each output element is computed by one fixed sequence of operations
//! (one accumulator over the lanes, fed block by block, the lanes summed, the remaining elements
//! added in order) that depends only on `k` and the chosen [`Kernel`], never on the thread count,
//! the number of tokens or where the element falls in a tile.

use crate::dtype::WeightSlice;
use half::{bf16, f16};
use rayon::prelude::*;
use std::sync::atomic::{AtomicU8, Ordering};

/// Tokens processed together against the rows of a tile.
const TOKENS: usize = 4;
/// Most weight rows in a tile.
const ROWS: usize = 4;
/// Target multiply-adds per parallel task.
const TASK_WORK: usize = 1 << 16;
/// Bytes of weight rows per parallel task at most (kept in cache while the token tiles pass).
const TASK_BYTES: usize = 1 << 17;
/// Rows per parallel task at least (when the bytes allow).
const TASK_MIN_ROWS: usize = 64;

/// Which inner loop computes the dot products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Portable sequential f32 loop.
    Scalar,
    /// 8-lane AVX2 with FMA and F16C (x86_64).
    Avx2,
    /// 16-lane AVX-512F (x86_64).
    Avx512,
}

impl Kernel {
    /// The fastest kernel this CPU supports.
    pub fn detect() -> Kernel {
        [Kernel::Avx512, Kernel::Avx2]
            .into_iter()
            .find(|k| k.is_available())
            .unwrap_or(Kernel::Scalar)
    }

    /// Whether this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        match self {
            Kernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Weight rows per register tile of `tokens` tokens (as many as the registers hold).
    fn rows(self, tokens: usize) -> usize {
        match self {
            Kernel::Avx512 => 4,
            Kernel::Avx2 if tokens == 1 => 4,
            Kernel::Avx2 => 2,
            Kernel::Scalar => 1,
        }
    }

    /// Elements of one paired block of the SIMD kernels (bf16 weights here, 4-bit codes in
    /// [`super::packed_matmul`]): a block's even elements meet the first half of its prepared
    /// activations and its odd elements the second ([`pair_activations`]). `None` for kernels
    /// that read activations as they are.
    pub(crate) fn pair_block(self) -> Option<usize> {
        match self {
            Kernel::Avx512 => Some(32),
            Kernel::Avx2 => Some(16),
            Kernel::Scalar => None,
        }
    }

    /// Every kernel this CPU can run.
    pub fn available() -> Vec<Kernel> {
        Kernel::ALL
            .into_iter()
            .filter(|k| k.is_available())
            .collect()
    }

    /// Every kernel, slowest first.
    const ALL: [Kernel; 3] = [Kernel::Scalar, Kernel::Avx2, Kernel::Avx512];

    /// The kernel's name: `scalar`, `avx2` or `avx512`.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512 => "avx512",
        }
    }

    /// The kernel named by the `MIXTRAL_CPU_KERNEL` environment variable; `Ok(None)` when it is
    /// unset or empty.
    ///
    /// # Errors
    /// When the variable names no kernel, or one this CPU cannot run.
    pub fn from_env() -> Result<Option<Kernel>, KernelChoiceError> {
        let value = match std::env::var(KERNEL_VAR) {
            Ok(value) if !value.trim().is_empty() => value,
            Ok(_) | Err(std::env::VarError::NotPresent) => return Ok(None),
            Err(std::env::VarError::NotUnicode(raw)) => {
                return Err(KernelChoiceError::Unknown(
                    raw.to_string_lossy().into_owned(),
                ))
            }
        };
        let name = value.trim().to_ascii_lowercase();
        let kernel = Kernel::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or(KernelChoiceError::Unknown(value))?;
        if !kernel.is_available() {
            return Err(KernelChoiceError::Unavailable(kernel));
        }
        Ok(Some(kernel))
    }
}

/// The environment variable naming the kernel [`matmul`] uses.
pub const KERNEL_VAR: &str = "MIXTRAL_CPU_KERNEL";

/// Why `MIXTRAL_CPU_KERNEL` (or [`set_active_kernel`]) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelChoiceError {
    /// The value names no kernel.
    #[error("{KERNEL_VAR}={0:?} names no CPU kernel (known: scalar, avx2, avx512)")]
    Unknown(String),
    /// The kernel needs instructions this CPU lacks.
    #[error("this CPU cannot run the {} kernel (it has: {})", .0.name(), available_names())]
    Unavailable(Kernel),
}

fn available_names() -> String {
    let names: Vec<&str> = Kernel::available().into_iter().map(Kernel::name).collect();
    names.join(", ")
}

/// The kernel [`matmul`] uses: 0 until first chosen, else `1 + ` its index in [`Kernel::ALL`].
static ACTIVE: AtomicU8 = AtomicU8::new(0);

/// The kernel [`matmul`] uses: the last one given to [`set_active_kernel`]; before any, the one
/// `MIXTRAL_CPU_KERNEL` names when it is valid ([`Kernel::from_env`]), else [`Kernel::detect`].
pub fn active_kernel() -> Kernel {
    match ACTIVE.load(Ordering::Relaxed) {
        0 => {
            let kernel = Kernel::from_env()
                .ok()
                .flatten()
                .unwrap_or_else(Kernel::detect);
            // A concurrent first call chooses the same kernel; a concurrent setter wins.
            let _ = ACTIVE.compare_exchange(0, code(kernel), Ordering::Relaxed, Ordering::Relaxed);
            active_kernel()
        }
        n => Kernel::ALL[usize::from(n) - 1],
    }
}

/// Makes [`matmul`] use `kernel` from now on, in every thread.
///
/// # Errors
/// [`KernelChoiceError::Unavailable`] when this CPU cannot run it (nothing changes).
pub fn set_active_kernel(kernel: Kernel) -> Result<(), KernelChoiceError> {
    if !kernel.is_available() {
        return Err(KernelChoiceError::Unavailable(kernel));
    }
    ACTIVE.store(code(kernel), Ordering::Relaxed);
    Ok(())
}

/// `1 + ` the kernel's index in [`Kernel::ALL`].
fn code(kernel: Kernel) -> u8 {
    match kernel {
        Kernel::Scalar => 1,
        Kernel::Avx2 => 2,
        Kernel::Avx512 => 3,
    }
}

/// `y[t, n] = sum_k x[t, k] * w[n, k]` with the [`active_kernel`].
///
/// Shapes: `x: [tokens, k]`, `w: [n, k]`, `y: [tokens, n]` with `tokens = x.len() / k`.
///
/// # Panics
/// When `k == 0` or the lengths do not match those shapes.
pub fn matmul(x: &[f32], w: WeightSlice<'_>, n: usize, k: usize, y: &mut [f32]) {
    matmul_with(active_kernel(), x, w, n, k, y)
}

/// [`matmul`] with a chosen kernel; a kernel this CPU cannot run is replaced by
/// [`Kernel::Scalar`].
///
/// # Panics
/// As [`matmul`].
pub fn matmul_with(
    kernel: Kernel,
    x: &[f32],
    w: WeightSlice<'_>,
    n: usize,
    k: usize,
    y: &mut [f32],
) {
    assert!(k > 0, "matmul: k must be positive");
    assert_eq!(x.len() % k, 0, "matmul: x is not [tokens, {k}]");
    let tokens = x.len() / k;
    assert_eq!(w.len(), n * k, "matmul: w is not [{n}, {k}]");
    assert_eq!(y.len(), tokens * n, "matmul: y is not [{tokens}, {n}]");
    if tokens == 0 || n == 0 {
        return;
    }
    let kernel = if kernel.is_available() {
        kernel
    } else {
        Kernel::Scalar
    };
    let paired;
    let x = match (w, kernel.pair_block()) {
        (WeightSlice::BF16(_), Some(block)) => {
            paired = pair_activations(x, k, block);
            &paired[..]
        }
        _ => x,
    };
    let by_work = (TASK_WORK / (k * tokens)).max(TASK_MIN_ROWS);
    let by_bytes = (TASK_BYTES / (k * w.dtype().size())).max(1);
    let rows_per_task = by_work.min(by_bytes).min(n);
    by_row_chunks(tokens, rows_per_task, y, |first, out| {
        let rows = out.len() / tokens;
        let w_chunk = w.slice(first * k..(first + rows) * k);
        chunk_rows(kernel, x, w_chunk, k, tokens, out);
    });
}

/// Fills `y: [tokens, n]` from its transpose `[n, tokens]`, computed in parallel chunks of
/// `rows_per_task` rows: `fill(first_row, out)` writes rows `first_row..` of the transpose into
/// `out` (`[rows, tokens]`). One token writes straight into `y` (its rows are contiguous); more
/// go through a transposed copy.
pub(crate) fn by_row_chunks(
    tokens: usize,
    rows_per_task: usize,
    y: &mut [f32],
    fill: impl Fn(usize, &mut [f32]) + Sync,
) {
    let run = |yt: &mut [f32]| {
        yt.par_chunks_mut(rows_per_task * tokens)
            .enumerate()
            .for_each(|(chunk, out)| fill(chunk * rows_per_task, out));
    };
    if tokens == 1 {
        run(y);
        return;
    }
    let n = y.len() / tokens;
    let mut yt = vec![0.0f32; n * tokens];
    run(&mut yt);
    // In parallel over bands of token rows of `y`, each filled row position by row position: a
    // few write streams per task, where one task scattering each row of the transpose over all
    // token rows (a power-of-two stride apart) missed the cache at every write.
    y.par_chunks_mut(TRANSPOSE_BAND * n)
        .enumerate()
        .for_each(|(band, ys)| {
            let t0 = band * TRANSPOSE_BAND;
            for (r, row) in yt.chunks_exact(tokens).enumerate() {
                for (y_row, &v) in ys.chunks_exact_mut(n).zip(&row[t0..]) {
                    y_row[r] = v;
                }
            }
        });
}

/// Token rows of `y` one task of [`by_row_chunks`]'s transpose fills.
const TRANSPOSE_BAND: usize = 8;

/// The activations as the SIMD bf16 kernels read them: in each row of `x: [tokens, k]`, each
/// full block of `block` elements becomes its even elements followed by its odd ones; the last
/// `k % block` elements stay in place.
///
/// A bf16 weight pair `(w[2j], w[2j + 1])` loaded as one 32-bit lane becomes two f32 by a shift
/// and a mask, so the kernels multiply whole blocks without widening or shuffling the weights.
pub(crate) fn pair_activations(x: &[f32], k: usize, block: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(k) {
        let blocks = row.chunks_exact(block);
        let tail = blocks.remainder();
        for b in blocks {
            out.extend(paired_columns(block).map(|c| b[c]));
        }
        out.extend_from_slice(tail);
    }
    out
}

/// The order of a paired block's columns ([`pair_activations`]): the even ones, then the odd ones.
pub(crate) fn paired_columns(block: usize) -> impl Iterator<Item = usize> {
    (0..block).step_by(2).chain((1..block).step_by(2))
}

/// `out[r, t] = x[t] . w_chunk[r]` for the rows of one chunk.
fn chunk_rows(
    kernel: Kernel,
    x: &[f32],
    w_chunk: WeightSlice<'_>,
    k: usize,
    tokens: usize,
    out: &mut [f32],
) {
    match w_chunk {
        WeightSlice::BF16(w) => typed_rows(kernel, x, w, k, tokens, out),
        WeightSlice::F16(w) => typed_rows(kernel, x, w, k, tokens, out),
        WeightSlice::F32(w) => typed_rows(kernel, x, w, k, tokens, out),
    }
}

/// [`chunk_rows`] for one weight type: token tiles outside, row tiles inside. A short tile
/// repeats its last token or row; the repeats are computed and dropped.
fn typed_rows<W: Element>(
    kernel: Kernel,
    x: &[f32],
    w: &[W],
    k: usize,
    tokens: usize,
    out: &mut [f32],
) {
    let rows = out.len() / tokens;
    for t0 in (0..tokens).step_by(TOKENS) {
        let used = (tokens - t0).min(TOKENS);
        let row_tile = kernel.rows(used);
        let xs: [&[f32]; TOKENS] = std::array::from_fn(|j| {
            let t = t0 + j.min(used - 1);
            &x[t * k..(t + 1) * k]
        });
        for r0 in (0..rows).step_by(row_tile) {
            let rused = (rows - r0).min(row_tile);
            let ws: [&[W]; ROWS] = std::array::from_fn(|j| {
                let r = r0 + j.min(rused - 1);
                &w[r * k..(r + 1) * k]
            });
            let dots = W::tile(kernel, &xs, used, &ws);
            for (r, d) in dots.iter().enumerate().take(rused) {
                let at = (r0 + r) * tokens + t0;
                out[at..at + used].copy_from_slice(&d[..used]);
            }
        }
    }
}

/// A weight element type with its dot-product tiles.
trait Element: Copy + Send + Sync {
    /// As f32.
    fn to_f32(self) -> f32;

    /// `out[r][t] = xs[t] . ws[r]` for `t < tokens` (1 or more; the rest are repeats) and
    /// `r < kernel.rows(tokens)`; all slices of one length. For bf16 weights and a kernel with a
    /// [`Kernel::pair_block`], `xs` are the [`pair_activations`] of the token rows.
    fn tile(
        kernel: Kernel,
        xs: &[&[f32]; TOKENS],
        tokens: usize,
        ws: &[&[Self]; ROWS],
    ) -> [[f32; TOKENS]; ROWS];
}

/// Implements [`Element`] for a type with its SIMD tiles from [`x86`].
macro_rules! element {
    ($t:ty, $to_f32:expr, $avx512:ident, $avx2:ident) => {
        impl Element for $t {
            fn to_f32(self) -> f32 {
                $to_f32(self)
            }

            fn tile(
                kernel: Kernel,
                xs: &[&[f32]; TOKENS],
                tokens: usize,
                ws: &[&[Self]; ROWS],
            ) -> [[f32; TOKENS]; ROWS] {
                let k = ws[0].len();
                assert!(xs.iter().all(|x| x.len() == k) && ws.iter().all(|w| w.len() == k));
                match kernel {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the kernel was checked to be available on this CPU (`matmul_with`
                    // only keeps an available one) and every slice has length `k` (checked).
                    Kernel::Avx512 => unsafe {
                        if tokens == 1 {
                            widen(x86::$avx512::<1, 4>(&[xs[0]], ws))
                        } else {
                            x86::$avx512::<TOKENS, 4>(xs, ws)
                        }
                    },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above.
                    Kernel::Avx2 => unsafe {
                        if tokens == 1 {
                            widen(x86::$avx2::<1, 4>(&[xs[0]], ws))
                        } else {
                            x86::$avx2::<TOKENS, 2>(xs, ws)
                        }
                    },
                    _ => scalar_tile(xs, tokens, ws),
                }
            }
        }
    };
}

element!(bf16, |v: bf16| v.to_f32(), avx512_bf16, avx2_bf16);
element!(f16, |v: f16| v.to_f32(), avx512_f16, avx2_f16);
element!(f32, |v: f32| v, avx512_f32, avx2_f32);

/// A one-token tile result in the layout of a full one.
#[cfg(target_arch = "x86_64")]
fn widen(one: [[f32; 1]; ROWS]) -> [[f32; TOKENS]; ROWS] {
    std::array::from_fn(|r| [one[r][0]; TOKENS])
}

/// Sequential dot products of the first row: `sum_i x[i] * w[i]`, accumulated from 0 in index
/// order.
fn scalar_tile<W: Element>(
    xs: &[&[f32]; TOKENS],
    tokens: usize,
    ws: &[&[W]; ROWS],
) -> [[f32; TOKENS]; ROWS] {
    let mut out = [[0.0f32; TOKENS]; ROWS];
    for (o, x) in out[0].iter_mut().zip(xs).take(tokens) {
        for (&a, &b) in x.iter().zip(ws[0]) {
            *o += a * b.to_f32();
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    //! The SIMD dot-product tiles: `T` f32 token rows times `R` weight rows of one length
    //! (checked by the caller), all their dot products. f16 and f32 weights are widened lane by
    //! lane against the activations as they are; bf16 weights are read as 32-bit pairs against
    //! paired activations (`pair_activations`).

    use super::{Element, ROWS};
    use half::{bf16, f16};
    use std::arch::x86_64::*;

    /// Asks for the cache line of the element `rows_ahead` rows of `row_len` elements after `p`
    /// (never faults, even past the end of the matrix).
    ///
    /// The tiles call it with the rows of one tile (consecutive rows of the matrix) ahead, so the
    /// next tile's rows are in flight while this one is multiplied: a tile's rows are short
    /// streams (2 KiB of bf16 in the mid-size model), too short for the hardware prefetcher,
    /// and a fixed 1 KiB ahead within each row left every tile's first kilobytes to wait. Mid-size
    /// bf16 decode measured 9.9-10.1 ms against 12.2-12.6 ms with AVX-512 and 9.1-9.5 against
    /// 13.9-14.0 with AVX2 (AMD EPYC VM, 2 threads).
    #[inline(always)]
    pub(in crate::cpu) unsafe fn prefetch_rows_ahead<T>(
        p: *const T,
        rows_ahead: usize,
        row_len: usize,
    ) {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(rows_ahead * row_len) as *const i8);
    }

    /// The even (shifted up) and odd (masked) elements of 32 bf16 at `p`, as f32.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn pairs16_bf16(p: *const bf16) -> (__m512, __m512) {
        let raw = _mm512_loadu_si512(p as *const __m512i);
        let even = _mm512_slli_epi32::<16>(raw);
        let odd = _mm512_and_si512(raw, _mm512_set1_epi32(0xffff_0000u32 as i32));
        (_mm512_castsi512_ps(even), _mm512_castsi512_ps(odd))
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16_f16(p: *const f16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16_f32(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }

    /// The even (shifted up) and odd (masked) elements of 16 bf16 at `p`, as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn pairs8_bf16(p: *const bf16) -> (__m256, __m256) {
        let raw = _mm256_loadu_si256(p as *const __m256i);
        let even = _mm256_slli_epi32::<16>(raw);
        let odd = _mm256_and_si256(raw, _mm256_set1_epi32(0xffff_0000u32 as i32));
        (_mm256_castsi256_ps(even), _mm256_castsi256_ps(odd))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8_f16(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8_f32(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }

    /// The sum of the eight lanes: (low half + high half), then pairwise.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::cpu) unsafe fn reduce8(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// Sums the lanes of each accumulator, then adds the elements from `i` on in order.
    #[inline(always)]
    fn finish<W: Element, V: Copy, const T: usize, const R: usize>(
        acc: &[[V; T]; R],
        reduce: impl Fn(V) -> f32,
        xs: &[&[f32]; T],
        ws: &[&[W]; ROWS],
        i: usize,
    ) -> [[f32; T]; ROWS] {
        let mut out = [[0.0f32; T]; ROWS];
        for r in 0..R {
            for t in 0..T {
                let mut s = reduce(acc[r][t]);
                for e in i..ws[r].len() {
                    s += xs[t][e] * ws[r][e].to_f32();
                }
                out[r][t] = s;
            }
        }
        out
    }

    /// Defines a SIMD tile of widened weights: one accumulator per (row, token) pair over
    /// `$lanes`-element steps, then [`finish`].
    macro_rules! simd_tile {
        ($name:ident, $feature:literal, $t:ty, $lanes:literal, $vec:ty,
         $zero:ident, $loadx:ident, $load:ident, $fma:ident, $reduce:ident) => {
            /// # Safety
            /// The target features must be available, `R <= ROWS`, and every `xs[t]` and
            /// `ws[r]` as long as `ws[0]`.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $name<const T: usize, const R: usize>(
                xs: &[&[f32]; T],
                ws: &[&[$t]; ROWS],
            ) -> [[f32; T]; ROWS] {
                let k = ws[0].len();
                let mut acc: [[$vec; T]; R] = [[$zero(); T]; R];
                let mut wv: [$vec; R] = [$zero(); R];
                let mut i = 0;
                while i + $lanes <= k {
                    for r in 0..R {
                        prefetch_rows_ahead(ws[r].as_ptr().add(i), R, k);
                        wv[r] = $load(ws[r].as_ptr().add(i));
                    }
                    for t in 0..T {
                        let xv = $loadx(xs[t].as_ptr().add(i));
                        for r in 0..R {
                            acc[r][t] = $fma(xv, wv[r], acc[r][t]);
                        }
                    }
                    i += $lanes;
                }
                finish(&acc, |v| $reduce(v), xs, ws, i)
            }
        };
    }

    /// Defines a SIMD tile of bf16 weight pairs: per block of `2 * $lanes` elements, the even
    /// weights times the block's first `$lanes` paired activations, then the odd weights times
    /// the rest, into one accumulator per (row, token) pair; then [`finish`].
    macro_rules! pair_tile {
        ($name:ident, $feature:literal, $lanes:literal, $vec:ty,
         $zero:ident, $loadx:ident, $pairs:ident, $fma:ident, $reduce:ident) => {
            /// # Safety
            /// The target features must be available, `R <= ROWS`, and every `xs[t]` and
            /// `ws[r]` as long as `ws[0]`.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $name<const T: usize, const R: usize>(
                xs: &[&[f32]; T],
                ws: &[&[bf16]; ROWS],
            ) -> [[f32; T]; ROWS] {
                let k = ws[0].len();
                let mut acc: [[$vec; T]; R] = [[$zero(); T]; R];
                let mut even: [$vec; R] = [$zero(); R];
                let mut odd: [$vec; R] = [$zero(); R];
                let mut i = 0;
                while i + 2 * $lanes <= k {
                    for r in 0..R {
                        prefetch_rows_ahead(ws[r].as_ptr().add(i), R, k);
                        (even[r], odd[r]) = $pairs(ws[r].as_ptr().add(i));
                    }
                    for t in 0..T {
                        let xe = $loadx(xs[t].as_ptr().add(i));
                        let xo = $loadx(xs[t].as_ptr().add(i + $lanes));
                        for r in 0..R {
                            acc[r][t] = $fma(xe, even[r], acc[r][t]);
                            acc[r][t] = $fma(xo, odd[r], acc[r][t]);
                        }
                    }
                    i += 2 * $lanes;
                }
                finish(&acc, |v| $reduce(v), xs, ws, i)
            }
        };
    }

    pair_tile!(
        avx512_bf16,
        "avx512f",
        16,
        __m512,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        pairs16_bf16,
        _mm512_fmadd_ps,
        _mm512_reduce_add_ps
    );
    simd_tile!(
        avx512_f16,
        "avx512f",
        f16,
        16,
        __m512,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        load16_f16,
        _mm512_fmadd_ps,
        _mm512_reduce_add_ps
    );
    simd_tile!(
        avx512_f32,
        "avx512f",
        f32,
        16,
        __m512,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        load16_f32,
        _mm512_fmadd_ps,
        _mm512_reduce_add_ps
    );
    pair_tile!(
        avx2_bf16,
        "avx2,fma,f16c",
        8,
        __m256,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        pairs8_bf16,
        _mm256_fmadd_ps,
        reduce8
    );
    simd_tile!(
        avx2_f16,
        "avx2,fma,f16c",
        f16,
        8,
        __m256,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        load8_f16,
        _mm256_fmadd_ps,
        reduce8
    );
    simd_tile!(
        avx2_f32,
        "avx2,fma,f16c",
        f32,
        8,
        __m256,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        load8_f32,
        _mm256_fmadd_ps,
        reduce8
    );
}
