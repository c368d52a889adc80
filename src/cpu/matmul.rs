//! `y[t, n] = x[t, k] . W[n, k]^T`: the projection every layer is made of, with `W` stored row-major
//! `[out = n, in = k]` in bf16, f16 or f32 and converted to f32 in registers; f32 accumulation.
//!
//! Rows of `W` are split over the rayon pool. Each row is read once per call: with one token it is
//! dotted straight from storage; with several it is converted once into a per-task f32 buffer and
//! dotted with every token. The dot products use AVX-512F or AVX2+FMA when the CPU has them (chosen
//! once per call, so results are the same run after run on one machine) and a portable loop
//! otherwise.

use crate::dtype::WeightSlice;
use half::{bf16, f16};
use rayon::prelude::*;

/// Output rows handled by one rayon task.
const ROWS_PER_TASK: usize = 32;

/// `out[t, n] = x[t, k] . w[n, k]^T`. Panics if a length disagrees with `t`, `n`, `k` (a caller bug).
pub fn matmul(x: &[f32], t: usize, w: WeightSlice<'_>, n: usize, k: usize, out: &mut [f32]) {
    assert_eq!(x.len(), t * k, "matmul: x is not [t, k]");
    assert_eq!(w.len(), n * k, "matmul: w is not [n, k]");
    assert_eq!(out.len(), t * n, "matmul: out is not [t, n]");
    let kernels = Kernels::detect();
    if t == 1 {
        out.par_chunks_mut(ROWS_PER_TASK)
            .enumerate()
            .for_each(|(chunk, out)| {
                let first = chunk * ROWS_PER_TASK;
                for (i, o) in out.iter_mut().enumerate() {
                    let row = first + i;
                    *o = kernels.dot_weight(x, w.slice(row * k..(row + 1) * k));
                }
            });
        return;
    }
    // Several tokens: compute the transpose [n, t] by row chunks, then scatter.
    let mut transposed = vec![0.0f32; n * t];
    transposed
        .par_chunks_mut(ROWS_PER_TASK * t)
        .enumerate()
        .for_each(|(chunk, block)| {
            let first = chunk * ROWS_PER_TASK;
            let mut row_f32 = vec![0.0f32; k];
            for (i, outs) in block.chunks_mut(t).enumerate() {
                let row = first + i;
                w.slice(row * k..(row + 1) * k).to_f32_into(&mut row_f32);
                for (token, o) in outs.iter_mut().enumerate() {
                    *o = kernels.dot_f32(&x[token * k..(token + 1) * k], &row_f32);
                }
            }
        });
    for (row, values) in transposed.chunks(t).enumerate() {
        for (token, &v) in values.iter().enumerate() {
            out[token * n + row] = v;
        }
    }
}

/// Dot-product kernels for the best instruction set of this CPU.
#[derive(Clone, Copy)]
enum Kernels {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Kernels {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Kernels::Avx512;
            }
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return Kernels::Avx2;
            }
        }
        Kernels::Portable
    }

    /// `x . w` with `w` in storage precision.
    fn dot_weight(self, x: &[f32], w: WeightSlice<'_>) -> f32 {
        match (self, w) {
            (_, WeightSlice::F32(w)) => self.dot_f32(x, w),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the variant is chosen only when the CPU reports the features; lengths are
            // checked inside.
            (Kernels::Avx512, WeightSlice::BF16(w)) => unsafe { x86::dot_bf16_avx512(x, w) },
            #[cfg(target_arch = "x86_64")]
            (Kernels::Avx512, WeightSlice::F16(w)) => unsafe { x86::dot_f16_avx512(x, w) },
            #[cfg(target_arch = "x86_64")]
            (Kernels::Avx2, WeightSlice::BF16(w)) => unsafe { x86::dot_bf16_avx2(x, w) },
            #[cfg(target_arch = "x86_64")]
            (Kernels::Avx2, WeightSlice::F16(w)) => unsafe { x86::dot_f16_avx2(x, w) },
            (Kernels::Portable, WeightSlice::BF16(w)) => {
                portable_dot(x, w.iter().map(|v| v.to_f32()))
            }
            (Kernels::Portable, WeightSlice::F16(w)) => {
                portable_dot(x, w.iter().map(|v| v.to_f32()))
            }
        }
    }

    /// `x . w` in f32.
    fn dot_f32(self, x: &[f32], w: &[f32]) -> f32 {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx512 => unsafe { x86::dot_f32_avx512(x, w) },
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx2 => unsafe { x86::dot_f32_avx2(x, w) },
            Kernels::Portable => portable_dot(x, w.iter().copied()),
        }
    }
}

/// Eight interleaved partial sums, so the loop vectorises and rounds like the SIMD paths.
fn portable_dot(x: &[f32], w: impl Iterator<Item = f32>) -> f32 {
    let mut acc = [0.0f32; 8];
    for (i, (a, b)) in x.iter().zip(w).enumerate() {
        acc[i % 8] += a * b;
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! AVX-512F and AVX2+FMA dot products; bf16 -> f32 is a 16-bit left shift of the bits.
    use super::{bf16, f16};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_f32_avx512(x: &[f32], w: &[f32]) -> f32 {
        let n = x.len().min(w.len());
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        while i + 32 <= n {
            acc0 = _mm512_fmadd_ps(
                _mm512_loadu_ps(x.as_ptr().add(i)),
                _mm512_loadu_ps(w.as_ptr().add(i)),
                acc0,
            );
            acc1 = _mm512_fmadd_ps(
                _mm512_loadu_ps(x.as_ptr().add(i + 16)),
                _mm512_loadu_ps(w.as_ptr().add(i + 16)),
                acc1,
            );
            i += 32;
        }
        let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
        while i < n {
            sum += x[i] * w[i];
            i += 1;
        }
        sum
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn bf16x16(p: *const bf16) -> __m512 {
        let raw = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)))
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_bf16_avx512(x: &[f32], w: &[bf16]) -> f32 {
        let n = x.len().min(w.len());
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        while i + 32 <= n {
            acc0 = _mm512_fmadd_ps(
                _mm512_loadu_ps(x.as_ptr().add(i)),
                bf16x16(w.as_ptr().add(i)),
                acc0,
            );
            acc1 = _mm512_fmadd_ps(
                _mm512_loadu_ps(x.as_ptr().add(i + 16)),
                bf16x16(w.as_ptr().add(i + 16)),
                acc1,
            );
            i += 32;
        }
        let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
        while i < n {
            sum += x[i] * w[i].to_f32();
            i += 1;
        }
        sum
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_f16_avx512(x: &[f32], w: &[f16]) -> f32 {
        let n = x.len().min(w.len());
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            let raw = _mm256_loadu_si256(w.as_ptr().add(i) as *const __m256i);
            acc = _mm512_fmadd_ps(
                _mm512_loadu_ps(x.as_ptr().add(i)),
                _mm512_cvtph_ps(raw),
                acc,
            );
            i += 16;
        }
        let mut sum = _mm512_reduce_add_ps(acc);
        while i < n {
            sum += x[i] * w[i].to_f32();
            i += 1;
        }
        sum
    }

    #[target_feature(enable = "avx,fma")]
    unsafe fn hsum256(v: __m256) -> f32 {
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), v);
        lanes.iter().sum()
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32_avx2(x: &[f32], w: &[f32]) -> f32 {
        let n = x.len().min(w.len());
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            acc = _mm256_fmadd_ps(
                _mm256_loadu_ps(x.as_ptr().add(i)),
                _mm256_loadu_ps(w.as_ptr().add(i)),
                acc,
            );
            i += 8;
        }
        let mut sum = hsum256(acc);
        while i < n {
            sum += x[i] * w[i];
            i += 1;
        }
        sum
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_bf16_avx2(x: &[f32], w: &[bf16]) -> f32 {
        let n = x.len().min(w.len());
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            let raw = _mm_loadu_si128(w.as_ptr().add(i) as *const __m128i);
            let wf = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw)));
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr().add(i)), wf, acc);
            i += 8;
        }
        let mut sum = hsum256(acc);
        while i < n {
            sum += x[i] * w[i].to_f32();
            i += 1;
        }
        sum
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16_avx2(x: &[f32], w: &[f16]) -> f32 {
        let n = x.len().min(w.len());
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            let raw = _mm_loadu_si128(w.as_ptr().add(i) as *const __m128i);
            acc = _mm256_fmadd_ps(
                _mm256_loadu_ps(x.as_ptr().add(i)),
                _mm256_cvtph_ps(raw),
                acc,
            );
            i += 8;
        }
        let mut sum = hsum256(acc);
        while i < n {
            sum += x[i] * w[i].to_f32();
            i += 1;
        }
        sum
    }
}
