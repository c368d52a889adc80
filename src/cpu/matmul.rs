//! Products of f32 activations with stored weights: `y[t, n] = sum_k x[t, k] * W[n, k]` for
//! `x: [tokens, k]` f32, `W: [n, k]` in bf16, f16 or f32 ([`WeightSlice`]), `y: [tokens, n]` f32,
//! accumulated in f32.
//!
//! Output rows `n` are split into chunks computed in parallel (rayon). Within a chunk, tokens are
//! taken four at a time against each weight row, so a prefill reads each row from memory once.
//! The inner dot products use AVX-512F or AVX2+FMA(+F16C) when the CPU has them (chosen at run
//! time; bf16 becomes f32 in registers by a 16-bit left shift), else a portable scalar loop.
//!
//! Results are deterministic: each output element is computed by one fixed sequence of operations
//! that depends only on `k` and the chosen [`Kernel`], never on the thread count, the number of
//! tokens or where the element falls in a tile.

use crate::dtype::WeightSlice;
use half::{bf16, f16};
use rayon::prelude::*;

/// Tokens processed together against one weight row.
const TILE: usize = 4;
/// Target multiply-adds per parallel task.
const TASK_WORK: usize = 1 << 16;
/// Bytes of weight rows per parallel task at most (kept in cache while the token tiles pass).
const TASK_BYTES: usize = 1 << 18;

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

    /// Every kernel this CPU can run.
    pub fn available() -> Vec<Kernel> {
        [Kernel::Scalar, Kernel::Avx2, Kernel::Avx512]
            .into_iter()
            .filter(|k| k.is_available())
            .collect()
    }
}

/// `y[t, n] = sum_k x[t, k] * w[n, k]` with the fastest kernel of this CPU.
///
/// Shapes: `x: [tokens, k]`, `w: [n, k]`, `y: [tokens, n]` with `tokens = x.len() / k`.
///
/// # Panics
/// When `k == 0` or the lengths do not match those shapes.
pub fn matmul(x: &[f32], w: WeightSlice<'_>, n: usize, k: usize, y: &mut [f32]) {
    matmul_with(Kernel::detect(), x, w, n, k, y)
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
    let by_work = (TASK_WORK / (k * tokens)).max(1);
    let by_bytes = (TASK_BYTES / (k * w.dtype().size())).max(1);
    let rows_per_task = by_work.min(by_bytes).min(n);
    if tokens == 1 {
        // y is already [n, 1]: rows are contiguous.
        rows_into(kernel, x, w, k, rows_per_task, 1, y);
        return;
    }
    // Computed as yt[n, tokens], then transposed.
    let mut yt = vec![0.0f32; n * tokens];
    rows_into(kernel, x, w, k, rows_per_task, tokens, &mut yt);
    for (r, row) in yt.chunks_exact(tokens).enumerate() {
        for (t, &v) in row.iter().enumerate() {
            y[t * n + r] = v;
        }
    }
}

/// Fills `yt: [n, tokens]` in parallel chunks of `rows_per_task` rows.
fn rows_into(
    kernel: Kernel,
    x: &[f32],
    w: WeightSlice<'_>,
    k: usize,
    rows_per_task: usize,
    tokens: usize,
    yt: &mut [f32],
) {
    yt.par_chunks_mut(rows_per_task * tokens)
        .enumerate()
        .for_each(|(chunk, out)| {
            let first = chunk * rows_per_task;
            let rows = out.len() / tokens;
            let w_chunk = w.slice(first * k..(first + rows) * k);
            chunk_rows(kernel, x, w_chunk, k, tokens, out);
        });
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
    for t0 in (0..tokens).step_by(TILE) {
        let used = (tokens - t0).min(TILE);
        // A short tile repeats its last token, so every dot runs the same code.
        let xs: [&[f32]; TILE] = std::array::from_fn(|j| {
            let t = t0 + j.min(used - 1);
            &x[t * k..(t + 1) * k]
        });
        for (r, out_row) in out.chunks_exact_mut(tokens).enumerate() {
            let row = w_chunk.slice(r * k..(r + 1) * k);
            let dots = dot_tile(kernel, &xs, row);
            out_row[t0..t0 + used].copy_from_slice(&dots[..used]);
        }
    }
}

/// The dot products of four token rows with one weight row (all of the same length).
fn dot_tile(kernel: Kernel, xs: &[&[f32]; TILE], row: WeightSlice<'_>) -> [f32; TILE] {
    assert!(xs.iter().all(|x| x.len() == row.len()));
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the kernel was checked to be available on this CPU; lengths were checked.
        Kernel::Avx512 => unsafe {
            match row {
                WeightSlice::BF16(r) => x86::avx512_bf16(xs, r),
                WeightSlice::F16(r) => x86::avx512_f16(xs, r),
                WeightSlice::F32(r) => x86::avx512_f32(xs, r),
            }
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx2 => unsafe {
            match row {
                WeightSlice::BF16(r) => x86::avx2_bf16(xs, r),
                WeightSlice::F16(r) => x86::avx2_f16(xs, r),
                WeightSlice::F32(r) => x86::avx2_f32(xs, r),
            }
        },
        _ => match row {
            WeightSlice::BF16(r) => scalar_tile(xs, r, |v: &bf16| v.to_f32()),
            WeightSlice::F16(r) => scalar_tile(xs, r, |v: &f16| v.to_f32()),
            WeightSlice::F32(r) => scalar_tile(xs, r, |v: &f32| *v),
        },
    }
}

/// Sequential dot products: `sum_i x[i] * w[i]`, accumulated from 0 in index order.
fn scalar_tile<T>(xs: &[&[f32]; TILE], w: &[T], to_f32: impl Fn(&T) -> f32) -> [f32; TILE] {
    let mut acc = [0.0f32; TILE];
    for (i, wv) in w.iter().enumerate() {
        let wv = to_f32(wv);
        for (a, x) in acc.iter_mut().zip(xs) {
            *a += x[i] * wv;
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The SIMD dot-product tiles. Each takes four f32 rows and one weight row of the same
    //! length (checked by the caller) and returns the four dot products.

    use super::TILE;
    use half::{bf16, f16};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16_bf16(p: *const bf16) -> __m512 {
        let raw = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)))
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

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8_bf16(p: *const bf16) -> __m256 {
        let raw = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw)))
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

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn reduce8(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// Defines a 16-lane tile: two accumulators per token over 32 elements per step, one more
    /// 16-element step, the lanes summed, then the remaining elements in order.
    macro_rules! avx512_tile {
        ($name:ident, $t:ty, $load:ident, $conv:expr) => {
            /// # Safety
            /// AVX-512F must be available and every `xs[j]` as long as `w`.
            #[target_feature(enable = "avx512f")]
            pub(super) unsafe fn $name(xs: &[&[f32]; TILE], w: &[$t]) -> [f32; TILE] {
                let k = w.len();
                let wp = w.as_ptr();
                let xp: [*const f32; TILE] = std::array::from_fn(|j| xs[j].as_ptr());
                let mut a0 = [_mm512_setzero_ps(); TILE];
                let mut a1 = [_mm512_setzero_ps(); TILE];
                let mut i = 0;
                while i + 32 <= k {
                    let w0 = $load(wp.add(i));
                    let w1 = $load(wp.add(i + 16));
                    for j in 0..TILE {
                        a0[j] = _mm512_fmadd_ps(_mm512_loadu_ps(xp[j].add(i)), w0, a0[j]);
                        a1[j] = _mm512_fmadd_ps(_mm512_loadu_ps(xp[j].add(i + 16)), w1, a1[j]);
                    }
                    i += 32;
                }
                if i + 16 <= k {
                    let w0 = $load(wp.add(i));
                    for j in 0..TILE {
                        a0[j] = _mm512_fmadd_ps(_mm512_loadu_ps(xp[j].add(i)), w0, a0[j]);
                    }
                    i += 16;
                }
                let conv = $conv;
                std::array::from_fn(|j| {
                    let mut s = _mm512_reduce_add_ps(_mm512_add_ps(a0[j], a1[j]));
                    for e in i..k {
                        s += xs[j][e] * conv(&w[e]);
                    }
                    s
                })
            }
        };
    }

    /// Defines an 8-lane tile, laid out like the 16-lane one.
    macro_rules! avx2_tile {
        ($name:ident, $t:ty, $load:ident, $conv:expr) => {
            /// # Safety
            /// AVX2, FMA and F16C must be available and every `xs[j]` as long as `w`.
            #[target_feature(enable = "avx2,fma,f16c")]
            pub(super) unsafe fn $name(xs: &[&[f32]; TILE], w: &[$t]) -> [f32; TILE] {
                let k = w.len();
                let wp = w.as_ptr();
                let xp: [*const f32; TILE] = std::array::from_fn(|j| xs[j].as_ptr());
                let mut a0 = [_mm256_setzero_ps(); TILE];
                let mut a1 = [_mm256_setzero_ps(); TILE];
                let mut i = 0;
                while i + 16 <= k {
                    let w0 = $load(wp.add(i));
                    let w1 = $load(wp.add(i + 8));
                    for j in 0..TILE {
                        a0[j] = _mm256_fmadd_ps(_mm256_loadu_ps(xp[j].add(i)), w0, a0[j]);
                        a1[j] = _mm256_fmadd_ps(_mm256_loadu_ps(xp[j].add(i + 8)), w1, a1[j]);
                    }
                    i += 16;
                }
                if i + 8 <= k {
                    let w0 = $load(wp.add(i));
                    for j in 0..TILE {
                        a0[j] = _mm256_fmadd_ps(_mm256_loadu_ps(xp[j].add(i)), w0, a0[j]);
                    }
                    i += 8;
                }
                let conv = $conv;
                std::array::from_fn(|j| {
                    let mut s = reduce8(_mm256_add_ps(a0[j], a1[j]));
                    for e in i..k {
                        s += xs[j][e] * conv(&w[e]);
                    }
                    s
                })
            }
        };
    }

    avx512_tile!(avx512_bf16, bf16, load16_bf16, |v: &bf16| v.to_f32());
    avx512_tile!(avx512_f16, f16, load16_f16, |v: &f16| v.to_f32());
    avx512_tile!(avx512_f32, f32, load16_f32, |v: &f32| *v);
    avx2_tile!(avx2_bf16, bf16, load8_bf16, |v: &bf16| v.to_f32());
    avx2_tile!(avx2_f16, f16, load8_f16, |v: &f16| v.to_f32());
    avx2_tile!(avx2_f32, f32, load8_f32, |v: &f32| *v);
}
