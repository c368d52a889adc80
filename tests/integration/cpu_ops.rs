//! The CPU reference ops against their definitions, written here in the obvious way (in f64 where
//! it matters), on random inputs: matmul (every SIMD kernel, every weight type, odd sizes,
//! determinism), RMSNorm, RoPE, sliding-window GQA attention over a paged cache, routing and
//! grouping, the MoE block, embedding, and the paged-KV bookkeeping.

use crate::common;

use common::numeric::product_definition;
use half::{bf16, f16};
use mixtral::cpu::attention::{attention, AttentionShape, SequenceCache};
use mixtral::cpu::embedding::embed;
use mixtral::cpu::matmul::{matmul, matmul_with, Kernel};
use mixtral::cpu::moe::{expert_mlp, moe_block, Expert};
use mixtral::cpu::norm::{add_rms_norm, rms_norm};
use mixtral::cpu::rope::Rope;
use mixtral::cpu::router::{group_by_expert, route, softmax};
use mixtral::dtype::WeightSlice;
use mixtral::kv::{KvLimits, PagedKv, Slot};
use mixtral::{EngineError, LogitsFor, SeqId, SeqStep};
use proptest::prelude::*;

/// Deterministic random numbers for test inputs.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform()).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Relative L2 error of `out` against `reference`; fails on any non-finite output.
fn rel_l2(out: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len());
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&o, &r) in out.iter().zip(reference) {
        assert!(o.is_finite(), "non-finite output {o}");
        diff += (o as f64 - r).powi(2);
        norm += r * r;
    }
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
}

/// A weight matrix in one storage type, with its exact f64 values.
struct TypedWeights {
    bf16: Vec<bf16>,
    f16: Vec<f16>,
    f32: Vec<f32>,
}

impl TypedWeights {
    fn new(values: &[f32]) -> Self {
        TypedWeights {
            bf16: values.iter().map(|&v| bf16::from_f32(v)).collect(),
            f16: values.iter().map(|&v| f16::from_f32(v)).collect(),
            f32: values.to_vec(),
        }
    }
    fn slices(&self) -> [WeightSlice<'_>; 3] {
        [
            WeightSlice::BF16(&self.bf16),
            WeightSlice::F16(&self.f16),
            WeightSlice::F32(&self.f32),
        ]
    }
}

/// The definition: `y[t, n] = sum_k x[t, k] * w[n, k]`, in f64, with the magnitude of each sum.
fn matmul_definition(x: &[f32], w: WeightSlice<'_>, n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
    product_definition(x, |i| w.get(i) as f64, n, k)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn matmul_equals_the_triple_loop(
        tokens in 1usize..10, n in 1usize..40, k in 1usize..300, seed in any::<u64>()
    ) {
        let mut rng = Rng(seed);
        let x = rng.vec(tokens * k);
        let weights = TypedWeights::new(&rng.vec(n * k));
        for w in weights.slices() {
            let (reference, magnitude) = matmul_definition(&x, w, n, k);
            for kernel in Kernel::available() {
                let mut y = vec![f32::NAN; tokens * n];
                matmul_with(kernel, &x, w, n, k, &mut y);
                for (i, (&got, &want)) in y.iter().zip(&reference).enumerate() {
                    let bound = 1e-6 * magnitude[i] * (k as f64).sqrt() + 1e-30;
                    prop_assert!(
                        got.is_finite() && (got as f64 - want).abs() <= bound,
                        "{kernel:?} {:?} element {i}: {got} vs {want}", w.dtype()
                    );
                }
            }
        }
    }

    #[test]
    fn matmul_rows_do_not_depend_on_the_batch(
        tokens in 2usize..11, n in 1usize..70, k in 1usize..200, seed in any::<u64>()
    ) {
        let mut rng = Rng(seed);
        let x = rng.vec(tokens * k);
        let weights = TypedWeights::new(&rng.vec(n * k));
        for (w, kernel) in weights.slices().into_iter().flat_map(|w| {
            Kernel::available().into_iter().map(move |kernel| (w, kernel))
        }) {
            let mut all = vec![0.0f32; tokens * n];
            matmul_with(kernel, &x, w, n, k, &mut all);
            for t in 0..tokens {
                let mut one = vec![0.0f32; n];
                matmul_with(kernel, &x[t * k..(t + 1) * k], w, n, k, &mut one);
                prop_assert_eq!(&all[t * n..(t + 1) * n], &one[..], "{:?} {:?}", kernel, w.dtype());
            }
        }
    }
}

#[test]
fn matmul_is_identical_for_any_thread_count() {
    let mut rng = Rng(11);
    let (tokens, n, k) = (7, 1031, 517);
    let x = rng.vec(tokens * k);
    let weights = TypedWeights::new(&rng.vec(n * k));
    for w in weights.slices() {
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut y = vec![0.0f32; tokens * n];
            pool.install(|| matmul(&x, w, n, k, &mut y));
            y
        };
        let one = run(1);
        assert_eq!(one, run(2));
        assert_eq!(one, run(5));
    }
}

#[test]
fn every_kernel_agrees_on_a_large_product() {
    let mut rng = Rng(5);
    let (tokens, n, k) = (5, 300, 4099);
    let x = rng.vec(tokens * k);
    let weights = TypedWeights::new(&rng.vec(n * k));
    for w in weights.slices() {
        let (reference, _) = matmul_definition(&x, w, n, k);
        for kernel in Kernel::available() {
            let mut y = vec![0.0f32; tokens * n];
            matmul_with(kernel, &x, w, n, k, &mut y);
            let err = rel_l2(&y, &reference);
            assert!(err < 1e-5, "{kernel:?} {:?}: {err:e}", w.dtype());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn rms_norm_matches_its_definition(
        tokens in 1usize..6, hidden in 1usize..130, eps in 1e-6f32..1e-2, seed in any::<u64>()
    ) {
        let mut rng = Rng(seed);
        let x: Vec<f32> = rng.vec(tokens * hidden).iter().map(|v| 3.0 * v).collect();
        let w: Vec<f32> = rng.vec(hidden).iter().map(|v| 1.0 + 0.5 * v).collect();
        let mut out = vec![f32::NAN; x.len()];
        rms_norm(&x, WeightSlice::F32(&w), eps, &mut out);
        let mut reference = Vec::new();
        for row in x.chunks(hidden) {
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / hidden as f64;
            let r = 1.0 / (ms + eps as f64).sqrt();
            reference.extend(row.iter().zip(&w).map(|(&v, &g)| v as f64 * r * g as f64));
        }
        prop_assert!(rel_l2(&out, &reference) < 1e-6);

        // The fused form is the residual add followed by the norm.
        let delta = rng.vec(x.len());
        let mut residual = x.clone();
        let mut fused = vec![f32::NAN; x.len()];
        add_rms_norm(&mut residual, &delta, WeightSlice::F32(&w), eps, &mut fused);
        let summed: Vec<f32> = x.iter().zip(&delta).map(|(a, b)| a + b).collect();
        prop_assert_eq!(&residual, &summed);
        let mut separate = vec![f32::NAN; x.len()];
        rms_norm(&summed, WeightSlice::F32(&w), eps, &mut separate);
        prop_assert_eq!(fused, separate);
    }
}

#[test]
fn rope_frequencies_follow_the_definition() {
    for (d, theta) in [(8usize, 10000.0f32), (64, 1e6), (128, 5e5)] {
        let rope = Rope::new(d, theta);
        assert_eq!(rope.inv_freq().len(), d / 2);
        for (i, &f) in rope.inv_freq().iter().enumerate() {
            let want = (theta as f64).powf(-2.0 * i as f64 / d as f64);
            assert!(
                (f as f64 - want).abs() <= 1e-6 * want,
                "d {d} i {i}: {f} vs {want}"
            );
        }
        // Position 0 is the identity; position 1 rotates pair (i, i + d/2) by inv_freq[i].
        let mut rng = Rng(d as u64);
        let x = rng.vec(d);
        let mut y = [x.clone(), x.clone()].concat();
        rope.apply(&mut y, 1, &[0, 1]);
        assert_eq!(&y[..d], &x[..]);
        for i in 0..d / 2 {
            let a = rope.inv_freq()[i] as f64;
            let (x1, x2) = (x[i] as f64, x[i + d / 2] as f64);
            let want = (x1 * a.cos() - x2 * a.sin(), x2 * a.cos() + x1 * a.sin());
            assert!((y[d + i] as f64 - want.0).abs() < 1e-6);
            assert!((y[d + i + d / 2] as f64 - want.1).abs() < 1e-6);
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

fn norm(a: &[f32]) -> f64 {
    dot(a, a).sqrt()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn rope_keeps_norms_and_depends_on_relative_position_only(
        half in 1usize..33, heads in 1usize..4, p in 0usize..2000, r in 0usize..2000,
        shift in 0usize..2000, theta in prop::sample::select(vec![1e4f32, 1e6]), seed in any::<u64>()
    ) {
        let d = 2 * half;
        let rope = Rope::new(d, theta);
        let mut rng = Rng(seed);
        let q = rng.vec(heads * d);
        let k = rng.vec(heads * d);
        let rotate = |x: &[f32], pos: usize| {
            let mut y = x.to_vec();
            rope.apply(&mut y, heads, &[pos]);
            y
        };
        let (q0, k0) = (rotate(&q, p), rotate(&k, r));
        let (q1, k1) = (rotate(&q, p + shift), rotate(&k, r + shift));
        for h in 0..heads {
            let s = h * d..(h + 1) * d;
            let (n0, n1) = (norm(&q[s.clone()]), norm(&q0[s.clone()]));
            prop_assert!((n0 - n1).abs() <= 1e-5 * n0, "norm {n0} -> {n1}");
            let scale = norm(&q[s.clone()]) * norm(&k[s.clone()]);
            let (a, b) = (dot(&q0[s.clone()], &k0[s.clone()]), dot(&q1[s.clone()], &k1[s]));
            // f32 angles at positions below 4000 are exact to about 4000 * 2^-24 rad.
            prop_assert!((a - b).abs() <= 1e-3 * scale, "q.k {a} vs {b}");
        }
    }
}

/// The definition of causal (optionally windowed) GQA attention over a contiguous cache, in f64:
/// `softmax(q k^T / sqrt(d)) v` over the keys `i - W < j <= i` of query position i (query head h
/// uses KV head h / (heads / kv_heads)), `k, v: [len, kv_heads, d]`, queries at positions
/// `start .. len`; with a worst-case bound on each output element of the CPU's f32 computation
/// (`cpu::attention`): `(value, bound)`.
///
/// Bound, first order in u, per query and head over its n visible keys j:
/// - a score s_j = (q . k_j) * scale is within gamma(d) * scale * sum_t |q_t k_jt| (the dot
///   product, any order) + 3 u |s_j| (the rounded scale and the product);
/// - exp(s_j - max) is then within (that + u |s_j - max| + 2 u) of itself, relatively (the
///   subtraction; the CPU's softmax exp, at most 1.45 u over every input, its own test in
///   `cpu::exp`); the common max cancels in the normalisation;
/// - p_j = e_j / sum: twice the largest such error, plus gamma(n) for the sum and u for the
///   division;
/// - an output sum_j p_j v_jc is within (that + gamma(n) + u) * sum_j p_j |v_jc|;
///
/// doubled for the second-order terms. A weighted average of random values that nearly cancels
/// gets the error the cancellation allows; a fixed relative bound would fail it by chance.
fn attention_definition(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
    start: usize,
    len: usize,
    window: Option<usize>,
) -> (Vec<f64>, Vec<f64>) {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim: d,
    } = shape;
    let scale = 1.0 / (d as f64).sqrt();
    let (mut out, mut bound) = (Vec::new(), Vec::new());
    for i in start..len {
        let visible: Vec<usize> = (0..len)
            .filter(|&j| j <= i && window.is_none_or(|w| i < j + w))
            .collect();
        for h in 0..heads {
            let g = h / (heads / kv_heads);
            let qh = &q[((i - start) * heads + h) * d..][..d];
            let key = |j: usize| &k[(j * kv_heads + g) * d..][..d];
            let scores: Vec<f64> = visible.iter().map(|&j| dot(qh, key(j)) * scale).collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            let worst_e = visible
                .iter()
                .zip(&scores)
                .map(|(&j, &s)| {
                    let magnitude: f64 = qh
                        .iter()
                        .zip(key(j))
                        .map(|(&a, &b)| (a as f64 * b as f64).abs())
                        .sum();
                    let ds = gamma(d) * scale * magnitude + 3.0 * F32_U * s.abs();
                    ds + F32_U * (s - max).abs() + 2.0 * F32_U
                })
                .fold(0.0, f64::max);
            let n = visible.len();
            let relative = 2.0 * (2.0 * worst_e + 2.0 * gamma(n) + 2.0 * F32_U);
            for c in 0..d {
                let value = |j: usize| v[(j * kv_heads + g) * d + c] as f64;
                let terms = visible.iter().zip(&e).map(|(&j, &ej)| (ej / sum, value(j)));
                out.push(terms.clone().map(|(p, x)| p * x).sum());
                bound.push(relative * terms.map(|(p, x)| p * x.abs()).sum::<f64>());
            }
        }
    }
    (out, bound)
}

/// Splits a contiguous cache `[len, width]` into blocks of `block_size` rows (the last one
/// padded with garbage that must never be read).
fn to_blocks(x: &[f32], width: usize, block_size: usize) -> Vec<Vec<f32>> {
    x.chunks(block_size * width)
        .map(|c| {
            let mut b = c.to_vec();
            b.resize(block_size * width, 1e30);
            b
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn windowed_attention_equals_the_masked_definition(
        kv_heads in 1usize..4, group in 1usize..5, half in 1usize..41, len in 1usize..40,
        start_frac in 0.0f64..1.0, window in prop::option::of(1usize..60),
        block_size in 1usize..9, threads in 1usize..9, seed in any::<u64>()
    ) {
        let shape = AttentionShape { heads: kv_heads * group, kv_heads, head_dim: 2 * half };
        let start = ((len as f64 * start_frac) as usize).min(len - 1);
        let mut rng = Rng(seed);
        let width = kv_heads * shape.head_dim;
        // Large enough scores that the softmax is peaked and the mask matters.
        let q: Vec<f32> = rng.vec((len - start) * shape.heads * shape.head_dim)
            .iter().map(|x| 4.0 * x).collect();
        let k = rng.vec(len * width);
        let v = rng.vec(len * width);
        let (reference, bound) = attention_definition(&q, &k, &v, shape, start, len, window);
        let kb = to_blocks(&k, width, block_size);
        let vb = to_blocks(&v, width, block_size);
        let kr: Vec<&[f32]> = kb.iter().map(|b| b.as_slice()).collect();
        let vr: Vec<&[f32]> = vb.iter().map(|b| b.as_slice()).collect();
        let cache = SequenceCache { k: &kr, v: &vr, block_size };
        let run = |kernel: Kernel| {
            let mut out = vec![f32::NAN; q.len()];
            attention(kernel, &q, shape, start, cache, window, &mut out);
            out.iter().map(|x| x.to_bits()).collect::<Vec<u32>>()
        };
        let scalar = run(Kernel::Scalar);
        let values: Vec<f32> = scalar.iter().map(|&b| f32::from_bits(b)).collect();
        within_bounds("attention", &values, &reference, &bound)?;
        // Every kernel, with any number of threads (heads are split over more tasks when there
        // are more threads than (query, KV head) pairs), runs each head's operations in the same
        // order: the same bits.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        for kernel in Kernel::available() {
            prop_assert_eq!(&pool.install(|| run(kernel)), &scalar, "kernel {}", kernel.name());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn routing_invariants_hold(
        tokens in 1usize..12, experts in 1usize..10, k_frac in 0.0f64..1.0,
        levels in 1usize..4, seed in any::<u64>()
    ) {
        let top_k = 1 + ((experts - 1) as f64 * k_frac) as usize;
        let mut rng = Rng(seed);
        // Logits drawn from a few levels, so exact ties are frequent.
        let level_values = rng.vec(levels);
        let logits: Vec<f32> = (0..tokens * experts)
            .map(|_| 3.0 * level_values[rng.below(levels)])
            .collect();
        let routing = route(&logits, experts, top_k);
        prop_assert_eq!(routing.tokens(), tokens);
        for t in 0..tokens {
            let row = &logits[t * experts..(t + 1) * experts];
            let chosen = &routing.experts[t * top_k..(t + 1) * top_k];
            let weights = &routing.weights[t * top_k..(t + 1) * top_k];
            let mut distinct = chosen.to_vec();
            distinct.sort();
            distinct.dedup();
            prop_assert_eq!(distinct.len(), top_k);
            prop_assert!(chosen.iter().all(|&e| e < experts));
            let sum: f64 = weights.iter().map(|&w| w as f64).sum();
            prop_assert!((sum - 1.0).abs() < 1e-6, "weights sum to {sum}");
            // Ranked by logit, ties by index: the chosen ones are exactly the first k.
            let mut ranked: Vec<usize> = (0..experts).collect();
            ranked.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap().then(a.cmp(&b)));
            prop_assert_eq!(chosen, &ranked[..top_k]);
            // Weights are the renormalised softmax probabilities.
            let p: Vec<f64> = {
                let m = row.iter().copied().fold(f32::MIN, f32::max) as f64;
                let e: Vec<f64> = row.iter().map(|&l| (l as f64 - m).exp()).collect();
                let s: f64 = e.iter().sum();
                e.iter().map(|x| x / s).collect()
            };
            let chosen_sum: f64 = chosen.iter().map(|&e| p[e]).sum();
            for (&e, &w) in chosen.iter().zip(weights) {
                prop_assert!((w as f64 - p[e] / chosen_sum).abs() < 1e-6);
            }
        }

        let groups = group_by_expert(&routing, experts);
        prop_assert_eq!(groups.counts.len(), experts);
        prop_assert_eq!(groups.offsets.len(), experts + 1);
        prop_assert_eq!(groups.offsets[0], 0);
        prop_assert_eq!(groups.offsets[experts], tokens * top_k);
        let mut all = groups.assignments.clone();
        all.sort();
        prop_assert_eq!(all, (0..tokens * top_k).collect::<Vec<_>>());
        for e in 0..experts {
            prop_assert_eq!(groups.offsets[e + 1] - groups.offsets[e], groups.counts[e]);
            let mine = groups.of(e);
            prop_assert!(mine.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(mine.iter().all(|&a| routing.experts[a] == e));
            prop_assert_eq!(
                groups.counts[e],
                routing.experts.iter().filter(|&&x| x == e).count()
            );
            prop_assert!(mine.iter().all(|&a| groups.token(a) == a / top_k));
        }
    }
}

#[test]
fn exact_ties_go_to_the_lower_expert() {
    // Every expert tied: the first k win, in index order, with equal weights.
    let logits = [0.75f32; 8];
    let r = route(&logits, 8, 2);
    assert_eq!(r.experts, vec![0, 1]);
    assert_eq!(r.weights, vec![0.5, 0.5]);
    // A tie for second place between experts 5 and 2; expert 6 is first.
    let logits = [-1.0f32, 0.1, 0.4, -0.3, 0.2, 0.4, 0.9, -2.0];
    let r = route(&logits, 8, 2);
    assert_eq!(r.experts, vec![6, 2]);
    let r = route(&logits, 8, 3);
    assert_eq!(r.experts, vec![6, 2, 5]);
    // A softmax rounding its tied inputs identically.
    let p = softmax(&logits);
    assert_eq!(p[2], p[5]);
}

/// f32's unit roundoff, 2^-24.
const F32_U: f64 = 1.0 / 16_777_216.0;

/// Higham's gamma_n = n u / (1 - n u): a sum of n products computed in f32 in any order (FMA or
/// not) is within gamma_n of the sum of their magnitudes of the exact sum.
fn gamma(n: usize) -> f64 {
    n as f64 * F32_U / (1.0 - n as f64 * F32_U)
}

/// The definition of one expert in f64, `w2(silu(w1 x) * (w3 x))`, with a worst-case bound on each
/// output element of the same expert computed in f32 (`cpu::moe::expert_mlp`): `(value, bound)`.
///
/// Bound, first order in u, per intermediate unit i and output o:
/// - g_i = w1_i . x and v_i = w3_i . x are within gamma(hidden) * S1_i and gamma(hidden) * S3_i,
///   S the sums of |w x| (any summation order);
/// - a_i = silu(g_i) * v_i is then within 1.1 * |v_i| * dg_i (|silu'| <= 1.1) + |silu(g_i)| * dv_i
///   + 8 u |a_i| (expf, the add, the division and the product: at most 8 roundings);
/// - out_o = w2_o . a is within sum_i |w2_oi| da_i + gamma(inter) * sum_i |w2_oi a_i|;
///
/// doubled for the second-order terms. It follows the data: a dot product that nearly cancels
/// (one intermediate unit, 8 inputs: the case a fixed 1e-5 relative L2 failed on, 1.19e-5 at
/// tokens 1, experts 4, hidden 8, inter 1, recorded in tests/proptest-regressions/cpu_ops.txt) gets
/// the error its cancellation allows, a well-conditioned one a bound near 1e-7 relative.
fn expert_definition(
    x: &[f32],
    w1: &[f32],
    w2: &[f32],
    w3: &[f32],
    hidden: usize,
) -> (Vec<f64>, Vec<f64>) {
    let inter = w1.len() / hidden;
    let abs_dot = |a: &[f32], b: &[f32]| -> f64 {
        a.iter()
            .zip(b)
            .map(|(&p, &q)| (p as f64 * q as f64).abs())
            .sum()
    };
    let (mut out, mut bound) = (Vec::new(), Vec::new());
    for row in x.chunks(hidden) {
        let (mut a, mut da) = (Vec::with_capacity(inter), Vec::with_capacity(inter));
        for i in 0..inter {
            let (r1, r3) = (
                &w1[i * hidden..(i + 1) * hidden],
                &w3[i * hidden..(i + 1) * hidden],
            );
            let (g, v) = (dot(row, r1), dot(row, r3));
            let silu = g / (1.0 + (-g).exp());
            let (dg, dv) = (
                gamma(hidden) * abs_dot(row, r1),
                gamma(hidden) * abs_dot(row, r3),
            );
            a.push(silu * v);
            da.push(1.1 * v.abs() * dg + silu.abs() * dv + 8.0 * F32_U * (silu * v).abs());
        }
        for o in 0..hidden {
            let w2_row = &w2[o * inter..(o + 1) * inter];
            out.push((0..inter).map(|i| a[i] * w2_row[i] as f64).sum::<f64>());
            let propagated: f64 = (0..inter).map(|i| (w2_row[i] as f64).abs() * da[i]).sum();
            let own: f64 = (0..inter).map(|i| (a[i] * w2_row[i] as f64).abs()).sum();
            bound.push(2.0 * (propagated + gamma(inter) * own));
        }
    }
    (out, bound)
}

/// Fails (through `prop_assert`) unless every element of `out` is within `bound` of `reference`.
fn within_bounds(
    what: &str,
    out: &[f32],
    reference: &[f64],
    bound: &[f64],
) -> Result<(), TestCaseError> {
    for (i, ((&o, &r), &b)) in out.iter().zip(reference).zip(bound).enumerate() {
        let err = (o as f64 - r).abs();
        prop_assert!(
            err <= b,
            "{what}: element {i} is {o}, the definition {r}: error {err:e} > {b:e}"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn moe_block_is_the_weighted_sum_of_its_experts(
        tokens in 1usize..9, experts in 1usize..6, k_frac in 0.0f64..1.0,
        hidden in 1usize..24, inter in 1usize..20, seed in any::<u64>()
    ) {
        let top_k = 1 + ((experts - 1) as f64 * k_frac) as usize;
        let mut rng = Rng(seed);
        let x = rng.vec(tokens * hidden);
        let gate = rng.vec(experts * hidden);
        let mats: Vec<[Vec<f32>; 3]> = (0..experts)
            .map(|_| [rng.vec(inter * hidden), rng.vec(hidden * inter), rng.vec(inter * hidden)])
            .collect();
        let views: Vec<Expert<'_>> = mats
            .iter()
            .map(|[w1, w2, w3]| Expert {
                w1: WeightSlice::F32(w1).into(),
                w2: WeightSlice::F32(w2).into(),
                w3: WeightSlice::F32(w3).into(),
            })
            .collect();
        let mut out = vec![f32::NAN; x.len()];
        moe_block(&x, Some(WeightSlice::F32(&gate)), &views, top_k, hidden, inter, &mut out);

        // Each token on its own: the router's choice, then the weighted sum of expert outputs.
        let (mut reference, mut reference_bound) = (Vec::new(), Vec::new());
        for row in x.chunks(hidden) {
            let mut logits = vec![0.0f32; experts];
            matmul(row, WeightSlice::F32(&gate), experts, hidden, &mut logits);
            let routing = route(&logits, experts, top_k);
            // The weighted sum in f32 adds, per term, its expert's bound and one rounding of the
            // product, and gamma(top_k) of the sum of magnitudes; doubled as each expert's.
            let (mut acc, mut magnitude, mut bounds) =
                (vec![0.0f64; hidden], vec![0.0f64; hidden], vec![0.0f64; hidden]);
            for (&e, &w) in routing.experts.iter().zip(&routing.weights) {
                let [w1, w2, w3] = &mats[e];
                let (y, b) = expert_definition(row, w1, w2, w3, hidden);
                for o in 0..hidden {
                    acc[o] += w as f64 * y[o];
                    magnitude[o] += (w as f64 * y[o]).abs();
                    bounds[o] += (w as f64).abs() * b[o];
                }
            }
            for o in 0..hidden {
                bounds[o] += 2.0 * (gamma(top_k) + F32_U) * magnitude[o];
            }
            reference.extend(acc);
            reference_bound.extend(bounds);
        }
        within_bounds("moe_block", &out, &reference, &reference_bound)?;

        // The dense case: no router, one expert, output = that expert.
        let mut dense = vec![f32::NAN; x.len()];
        moe_block(&x, None, &views[..1], 1, hidden, inter, &mut dense);
        let [w1, w2, w3] = &mats[0];
        let (want, bound) = expert_definition(&x, w1, w2, w3, hidden);
        within_bounds("dense", &dense, &want, &bound)?;
        let mut single = vec![f32::NAN; x.len()];
        expert_mlp(&x, &views[0], hidden, inter, &mut single);
        prop_assert_eq!(dense, single);
    }
}

#[test]
fn embedding_copies_rows() {
    let mut rng = Rng(3);
    let (vocab, hidden) = (11, 6);
    let table = TypedWeights::new(&rng.vec(vocab * hidden));
    let ids = [3u32, 0, 10, 3, 7];
    for w in table.slices() {
        let mut out = vec![f32::NAN; ids.len() * hidden];
        embed(&ids, w, hidden, &mut out);
        for (t, &id) in ids.iter().enumerate() {
            for c in 0..hidden {
                assert_eq!(out[t * hidden + c], w.get(id as usize * hidden + c));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Paged KV bookkeeping.

fn limits(block_size: usize, num_blocks: usize, max_context: usize) -> KvLimits {
    KvLimits {
        block_size,
        num_blocks,
        max_context,
        max_sequences: 4,
        vocab_size: 50,
    }
}

/// Everything observable about a pool: each sequence's length and block table (if alive), then the
/// free block count.
type Snapshot = (Vec<Option<(usize, Vec<usize>)>>, usize);

fn snapshot(kv: &PagedKv, seqs: &[SeqId]) -> Snapshot {
    let seqs = seqs
        .iter()
        .map(|&s| {
            kv.sequence_len(s)
                .ok()
                .map(|len| (len, kv.block_table(s).unwrap().to_vec()))
        })
        .collect();
    (seqs, kv.free_blocks())
}

/// Blocks of live sequences are distinct, each sequence holds `ceil(len / block_size)` blocks,
/// and used + free = total.
fn check_invariants(kv: &PagedKv, seqs: &[SeqId]) {
    let bs = kv.limits().block_size;
    let mut used = Vec::new();
    for &s in seqs {
        if let Ok(len) = kv.sequence_len(s) {
            let table = kv.block_table(s).unwrap();
            assert_eq!(table.len(), len.div_ceil(bs));
            used.extend_from_slice(table);
            for pos in 0..len {
                let slot = kv.slot(s, pos).unwrap();
                assert_eq!(slot, Slot::lookup(table, bs, pos).unwrap());
                assert_eq!(slot.block, table[pos / bs]);
                assert_eq!(slot.offset, pos % bs);
            }
            assert_eq!(kv.slot(s, len), None);
        }
    }
    let n = used.len();
    used.sort();
    used.dedup();
    assert_eq!(used.len(), n, "a block is owned twice");
    assert!(used.iter().all(|&b| b < kv.total_blocks()));
    assert_eq!(n + kv.free_blocks(), kv.total_blocks());
}

#[derive(Debug, Clone)]
enum Op {
    New,
    Free(usize),
    /// (sequence index, start offset from the end (may overshoot), token count, bad token).
    Step(Vec<(usize, usize, usize, bool)>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::New),
        1 => (0usize..6).prop_map(Op::Free),
        5 => prop::collection::vec((0usize..6, 0usize..6, 0usize..9, prop::bool::weighted(0.05)), 0..4)
            .prop_map(Op::Step),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn kv_steps_apply_atomically_and_blocks_return(
        block_size in 1usize..5, num_blocks in 1usize..14, max_context in 1usize..20,
        ops in prop::collection::vec(op(), 1..40)
    ) {
        let mut kv = PagedKv::new(limits(block_size, num_blocks, max_context)).unwrap();
        let mut seqs: Vec<SeqId> = Vec::new();
        let tokens: Vec<u32> = (0..16).map(|i| (i * 7 + 3) % 50).collect();
        let bad: Vec<u32> = vec![49, 50, 7];
        for op in ops {
            let before = snapshot(&kv, &seqs);
            let result = match op {
                Op::New => kv.new_sequence().map(|s| seqs.push(s)),
                Op::Free(i) => match seqs.get(i) {
                    Some(&s) => kv.free_sequence(s),
                    None => kv.free_sequence(SeqId(1000 + i as u64)),
                },
                Op::Step(entries) => {
                    let batch: Vec<SeqStep<'_>> = entries
                        .iter()
                        .map(|&(i, back, n, is_bad)| {
                            let seq = seqs.get(i).copied().unwrap_or(SeqId(1000 + i as u64));
                            let len = kv.sequence_len(seq).unwrap_or(0);
                            SeqStep {
                                seq,
                                tokens: if is_bad { &bad[..n.min(3)] } else { &tokens[..n] },
                                start_pos: (len + 1).saturating_sub(back),
                                logits: LogitsFor::Last,
                            }
                        })
                        .collect();
                    let expected: usize = batch.iter().map(|s| s.tokens.len()).sum();
                    kv.apply_step(&batch).map(|plan| {
                        assert_eq!(plan.total_tokens, expected);
                        for (e, s) in plan.entries.iter().zip(&batch) {
                            assert_eq!(kv.sequence_len(s.seq).unwrap(), s.start_pos + s.tokens.len());
                            assert_eq!(e.seq, s.seq);
                        }
                    })
                }
            };
            if result.is_err() {
                prop_assert_eq!(snapshot(&kv, &seqs), before, "{:?}", result);
            }
            check_invariants(&kv, &seqs);
        }
        for &s in &seqs {
            let _ = kv.free_sequence(s);
        }
        prop_assert_eq!(kv.free_blocks(), kv.total_blocks());
    }
}

#[test]
fn kv_refusals_are_typed_and_change_nothing() {
    let mut kv = PagedKv::new(limits(2, 5, 6)).unwrap();
    let a = kv.new_sequence().unwrap();
    let b = kv.new_sequence().unwrap();
    let t = [1u32, 2, 3, 4, 5];
    let step = |seq, tokens, start_pos| SeqStep {
        seq,
        tokens,
        start_pos,
        logits: LogitsFor::None,
    };
    kv.apply_step(&[step(a, &t[..3], 0), step(b, &t[..2], 0)])
        .unwrap();
    let seqs = [a, b];
    let before = snapshot(&kv, &seqs);
    assert_eq!(kv.free_blocks(), 2);
    let cases: Vec<(Vec<SeqStep<'_>>, EngineError)> = vec![
        (vec![step(a, &[], 3)], EngineError::EmptyStep(a)),
        (
            vec![step(b, &t[..1], 2), step(a, &[50], 3)],
            EngineError::TokenOutOfRange {
                token: 50,
                vocab: 50,
            },
        ),
        (
            vec![step(a, &t[..1], 3), step(a, &t[..1], 4)],
            EngineError::DuplicateSequence(a),
        ),
        (
            vec![step(SeqId(77), &t[..1], 0)],
            EngineError::UnknownSequence(SeqId(77)),
        ),
        (
            vec![step(b, &t[..1], 3)],
            EngineError::BadStartPosition {
                seq: b,
                cached: 2,
                start_pos: 3,
            },
        ),
        (
            vec![step(a, &t[..], 3)],
            EngineError::ContextOverflow {
                seq: a,
                needed: 8,
                max_context: 6,
            },
        ),
        // a grows to 6 tokens (+1 block), b to 6 (+2 blocks): 3 needed, 2 free.
        (
            vec![step(a, &t[..3], 3), step(b, &t[..4], 2)],
            EngineError::KvCacheFull {
                seq: b,
                needed: 3,
                free: 2,
            },
        ),
    ];
    for (batch, want) in cases {
        assert_eq!(kv.apply_step(&batch), Err(want));
        assert_eq!(snapshot(&kv, &seqs), before);
    }
}

#[test]
fn kv_rewinds_free_blocks_for_other_entries_in_the_same_step() {
    let mut kv = PagedKv::new(limits(2, 4, 8)).unwrap();
    let a = kv.new_sequence().unwrap();
    let b = kv.new_sequence().unwrap();
    let t = [1u32; 8];
    let step = |seq, tokens, start_pos| SeqStep {
        seq,
        tokens,
        start_pos,
        logits: LogitsFor::None,
    };
    kv.apply_step(&[step(a, &t[..6], 0)]).unwrap();
    assert_eq!(kv.free_blocks(), 1);
    // b needs 2 blocks; a rewinding to 1 token returns 2 of its 3.
    let full = kv.apply_step(&[step(b, &t[..4], 0)]);
    assert_eq!(
        full,
        Err(EngineError::KvCacheFull {
            seq: b,
            needed: 2,
            free: 1
        })
    );
    kv.apply_step(&[step(b, &t[..4], 0), step(a, &t[..1], 1)])
        .unwrap();
    assert_eq!(kv.sequence_len(a), Ok(2));
    assert_eq!(kv.sequence_len(b), Ok(4));
    assert_eq!(kv.free_blocks(), 1);
    check_invariants(&kv, &[a, b]);
    // Context overflow: 8 fits, 9 does not.
    assert!(kv.apply_step(&[step(a, &t[..6], 2)]).is_err());
    kv.free_sequence(a).unwrap();
    kv.free_sequence(b).unwrap();
    assert_eq!(kv.free_blocks(), kv.total_blocks());
    assert_eq!(
        kv.free_sequence(a),
        Err(EngineError::UnknownSequence(a)),
        "freed twice"
    );
}

#[test]
fn kv_limits_sequences_and_rejects_zero_limits() {
    let mut kv = PagedKv::new(limits(4, 4, 16)).unwrap();
    let ids: Vec<SeqId> = (0..4).map(|_| kv.new_sequence().unwrap()).collect();
    assert_eq!(
        kv.new_sequence(),
        Err(EngineError::TooManySequences { limit: 4 })
    );
    kv.free_sequence(ids[1]).unwrap();
    let again = kv.new_sequence().unwrap();
    assert!(!ids.contains(&again), "ids are never reused");
    for zero in 0..5 {
        let mut l = limits(4, 4, 16);
        match zero {
            0 => l.block_size = 0,
            1 => l.num_blocks = 0,
            2 => l.max_context = 0,
            3 => l.max_sequences = 0,
            _ => l.vocab_size = 0,
        }
        assert!(matches!(
            PagedKv::new(l),
            Err(EngineError::InvalidOptions(_))
        ));
    }
}
