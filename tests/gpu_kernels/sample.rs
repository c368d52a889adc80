//! `sample` and `argmax` against the host sampler (`src/sampling`), `sample` both through its
//! search path only and through its fast paths: the same seed draws the same ids and leaves the same
//! random state; the draws over many rows follow the host's distribution
//! (a chi-square bound, and never an id outside its support); top_k = 1 is argmax; argmax flags a
//! row holding a NaN or an infinity; a row with a
//! non-finite logit or an out-of-domain parameter gets its sentinel and keeps its state.

use mixtral::cuda::args::{ArgmaxArgs, ArgmaxScalars, SampleArgs, SampleScalars};
use mixtral::cuda::ops::{
    argmax, argmax_emulated, rng_state_for_seed, sample, sample_emulated, RNG_STATE_WORDS,
    SAMPLE_ID_BAD_PARAMS, SAMPLE_ID_NON_FINITE,
};
use mixtral::sampling::{Rng, Sampler, SamplingParams};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use crate::common::{self, launch, random_values, Guarded, Stream, Target};

/// One row's parameters.
#[derive(Debug, Clone, Copy)]
struct RowParams {
    temperature: f32,
    top_k: u32,
    top_p: f32,
    seed: u64,
}

impl RowParams {
    /// `n` rows of these parameters, seeded 0 to n - 1.
    fn seeded(n: u64, temperature: f32, top_k: u32, top_p: f32) -> Vec<RowParams> {
        (0..n)
            .map(|seed| RowParams {
                temperature,
                top_k,
                top_p,
                seed,
            })
            .collect()
    }

    fn host(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k as usize,
            top_p: self.top_p,
            repetition_penalty: 1.0,
            seed: self.seed,
        }
    }
}

/// The random state of every row, between poisoned guards ([`Guarded`]).
fn state_buffer(stream: Stream<'_>, rows: &[RowParams]) -> Guarded<u64> {
    let states: Vec<u64> = rows
        .iter()
        .flat_map(|r| rng_state_for_seed(r.seed))
        .collect();
    Guarded::with(stream, &states)
}

/// Both ways `sample` can run: its search path only, and its fast paths where they apply.
const MODES: [bool; 2] = [false, true];

/// Launches `sample` `draws` times on the same logits, state carried over, through its fast paths
/// when `fast`; the ids of each draw.
fn draw(
    gpu: &Target,
    logits: &[f32],
    vocab: usize,
    rows: &[RowParams],
    draws: usize,
    fast: bool,
) -> (Vec<Vec<u32>>, Vec<u64>) {
    let stream = gpu.stream();
    let logits_d = Guarded::with(stream, logits);
    let temperature = Guarded::with(
        stream,
        &rows.iter().map(|r| r.temperature).collect::<Vec<_>>(),
    );
    let top_k = Guarded::with(stream, &rows.iter().map(|r| r.top_k).collect::<Vec<_>>());
    let top_p = Guarded::with(stream, &rows.iter().map(|r| r.top_p).collect::<Vec<_>>());
    let mut state = state_buffer(stream, rows);
    let scalars = SampleScalars {
        rows: rows.len() as u32,
        vocab: vocab as u32,
        fast: fast as u32,
    };
    let mut all = Vec::with_capacity(draws);
    for _ in 0..draws {
        let mut out = Guarded::<u32>::poisoned(stream, rows.len());
        let rng_state = state.dev_mut();
        launch!(
            gpu.on(),
            sample | sample_emulated,
            &scalars,
            SampleArgs {
                logits: logits_d.dev(),
                temperature: temperature.dev(),
                top_k: top_k.dev(),
                top_p: top_p.dev(),
                rng_state,
                out_ids: out.dev_mut(),
            },
        )
        .expect("sample");
        all.push(out.read_written(stream, "out_ids"));
    }
    (all, state.read(stream, "rng_state"))
}

/// The host state of `seed` after `steps` draws.
fn host_state(seed: u64, steps: usize) -> Vec<u64> {
    let mut rng = Rng::new(seed);
    for _ in 0..steps {
        rng.next_u64();
    }
    rng.state().to_vec()
}

fn row_params(vocab: usize) -> impl Strategy<Value = RowParams> {
    (
        prop::sample::select(vec![0.25f32, 0.7, 1.0, 1.6]),
        prop::sample::select(vec![0u32, 1, 2, 7, 40, vocab as u32, vocab as u32 + 3]),
        prop::sample::select(vec![1.0f32, 0.95, 0.6, 0.2]),
        any::<u64>(),
    )
        .prop_map(|(temperature, top_k, top_p, seed)| RowParams {
            temperature,
            top_k,
            top_p,
            seed,
        })
}

/// Logits of one row: random at `scale`, sometimes peaked (one id far ahead), sometimes with
/// repeated values (ties the filters must break by id).
fn row_logits(seed: u64, vocab: usize, scale: f32, kind: u8) -> Vec<f32> {
    let mut row = random_values(seed, vocab, scale);
    match kind {
        1 => {
            let peak = (seed as usize) % vocab;
            row[peak] += 4.0 * scale;
        }
        2 => {
            for x in &mut row {
                *x = (*x * 4.0 / scale).round() * scale / 4.0;
            }
        }
        _ => {}
    }
    row
}

#[test]
fn sample_draws_the_host_samplers_ids_for_the_same_seed() {
    let gpu = common::target("sample_draws_the_host_samplers_ids_for_the_same_seed");
    let strategy = prop::sample::select(vec![1usize, 2, 5, 97, 1000, 32000, 50_257, 256_000])
        .prop_flat_map(|vocab| {
            (
                Just(vocab),
                prop::collection::vec(row_params(vocab), 1..5),
                prop::collection::vec(
                    (
                        any::<u64>(),
                        prop::sample::select(vec![0.5f32, 3.0, 12.0]),
                        0u8..3,
                    ),
                    4,
                ),
            )
        });
    let mut runner = TestRunner::new(Config::with_cases(gpu.cases(20, 4)));
    runner
        .run(&strategy, |(vocab, rows, looks)| {
            let logits: Vec<f32> = (0..rows.len())
                .flat_map(|r| {
                    let (seed, scale, kind) = looks[r % looks.len()];
                    row_logits(seed ^ r as u64, vocab, scale, kind)
                })
                .collect();
            let draws = 3;
            for fast in MODES {
                let (ids, state) = draw(&gpu, &logits, vocab, &rows, draws, fast);
                for (r, params) in rows.iter().enumerate() {
                    let row = &logits[r * vocab..(r + 1) * vocab];
                    let mut sampler = Sampler::new(params.host()).expect("valid params");
                    for (d, step) in ids.iter().enumerate() {
                        let host = sampler.sample(row, &[]).expect("finite row");
                        prop_assert_eq!(
                            step[r],
                            host,
                            "fast {} row {} draw {} params {:?}",
                            fast,
                            r,
                            d,
                            params
                        );
                    }
                    prop_assert_eq!(
                        &state[r * RNG_STATE_WORDS..(r + 1) * RNG_STATE_WORDS],
                        &host_state(params.seed, draws)[..],
                        "fast {} row {} random state",
                        fast,
                        r
                    );
                }
            }
            Ok(())
        })
        .unwrap();
}

/// Chi-square statistic of `counts` against `n * p` over the support (cells expected below 5
/// pooled into one), its degrees of freedom, and the number of draws outside the support.
fn chi_square(counts: &[usize], distribution: &[(u32, f64)], n: usize) -> (f64, f64, usize) {
    let mut chi = 0.0;
    let mut cells = 0usize;
    let mut inside = 0;
    let (mut pooled_observed, mut pooled_expected) = (0.0, 0.0);
    for &(id, p) in distribution {
        let expected = p * n as f64;
        let observed = counts[id as usize] as f64;
        inside += counts[id as usize];
        if expected < 5.0 {
            pooled_observed += observed;
            pooled_expected += expected;
        } else {
            chi += (observed - expected).powi(2) / expected;
            cells += 1;
        }
    }
    if pooled_expected > 0.0 {
        chi += (pooled_observed - pooled_expected).powi(2) / pooled_expected.max(1.0);
        cells += 1;
    }
    (chi, cells.saturating_sub(1) as f64, n - inside)
}

#[test]
fn sample_follows_the_host_distribution_over_many_rows() {
    let gpu = common::target("sample_follows_the_host_distribution_over_many_rows");
    if gpu.emulated() {
        // 6000 rows of 1024 threads a draw take minutes there; the draws' arithmetic is checked id
        // for id against the host sampler by the other tests of this file.
        eprintln!(
            "skipped sample_follows_the_host_distribution_over_many_rows on the kernel emulator"
        );
        return;
    }
    const VOCAB: usize = 12;
    const ROWS: usize = 6000;
    let strategy = (
        any::<u64>(),
        prop::sample::select(vec![0.6f32, 1.0, 1.5]),
        prop::sample::select(vec![0u32, 3, 5, 11]),
        prop::sample::select(vec![1.0f32, 0.8, 0.5]),
    );
    let mut runner = TestRunner::new(Config::with_cases(gpu.cases(16, 4)));
    runner
        .run(&strategy, |(seed, temperature, top_k, top_p)| {
            // Spread logits (several ids matter), one tie pair.
            let mut row = random_values(seed, VOCAB, 2.0);
            row[7] = row[2];
            let logits: Vec<f32> = (0..ROWS).flat_map(|_| row.iter().copied()).collect();
            let rows: Vec<RowParams> = (0..ROWS as u64)
                .map(|r| RowParams {
                    temperature,
                    top_k,
                    top_p,
                    seed: seed.wrapping_add(r.wrapping_mul(0x9e37_79b9)),
                })
                .collect();
            let distribution = Sampler::new(rows[0].host())
                .expect("valid params")
                .distribution(&row, &[])
                .expect("finite row");
            for fast in MODES {
                let (ids, _) = draw(&gpu, &logits, VOCAB, &rows, 1, fast);
                let mut counts = [0usize; VOCAB];
                for &id in &ids[0] {
                    prop_assert!((id as usize) < VOCAB, "id {} out of the vocab", id);
                    counts[id as usize] += 1;
                }
                let (chi, df, outside) = chi_square(&counts, &distribution, ROWS);
                prop_assert_eq!(
                    outside,
                    0,
                    "fast {}: draws outside the support {:?}: {:?}",
                    fast,
                    distribution,
                    counts
                );
                // About 6 standard deviations above the mean of a chi-square with df degrees of
                // freedom.
                let bound = df + 6.0 * (2.0 * df).sqrt() + 6.0;
                prop_assert!(
                    chi <= bound,
                    "fast {}: chi-square {} > {} for {:?}: {:?}",
                    fast,
                    chi,
                    bound,
                    distribution,
                    counts
                );
            }
            Ok(())
        })
        .unwrap();
}

/// `argmax` over `logits` (`[rows, vocab]`) into a poisoned output; every id must be written.
fn run_argmax(gpu: &Target, logits: &[f32], vocab: usize) -> Vec<u32> {
    let rows = logits.len() / vocab;
    let stream = gpu.stream();
    let logits_d = Guarded::with(stream, logits);
    let mut out = Guarded::<u32>::poisoned(stream, rows);
    launch!(
        gpu.on(),
        argmax | argmax_emulated,
        &ArgmaxScalars {
            rows: rows as u32,
            vocab: vocab as u32,
        },
        ArgmaxArgs {
            logits: logits_d.dev(),
            out_ids: out.dev_mut(),
        },
    )
    .expect("argmax");
    out.read_written(stream, "argmax out_ids")
}

#[test]
fn top_k_one_is_argmax_and_agrees_with_the_argmax_kernel() {
    let gpu = common::target("top_k_one_is_argmax_and_agrees_with_the_argmax_kernel");
    let strategy = (
        1usize..6,
        prop::sample::select(vec![1usize, 3, 1023, 1025, 32000, 131_073]),
        any::<u64>(),
        prop::sample::select(vec![0.3f32, 1.0, 2.5]),
        any::<bool>(),
    );
    let mut runner = TestRunner::new(Config::with_cases(gpu.cases(20, 4)));
    runner
        .run(&strategy, |(rows, vocab, seed, temperature, tie)| {
            let mut logits = random_values(seed, rows * vocab, 8.0);
            if tie && vocab > 2 {
                // The maximum twice in each row: the lower id must win.
                for r in 0..rows {
                    let row = &mut logits[r * vocab..(r + 1) * vocab];
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    row[vocab - 1] = max;
                    row[vocab / 2] = max;
                }
            }
            let params: Vec<RowParams> = (0..rows as u64)
                .map(|r| RowParams {
                    temperature,
                    top_k: 1,
                    top_p: 1.0,
                    seed: seed ^ r,
                })
                .collect();
            let greedy_ids = run_argmax(&gpu, &logits, vocab);
            for fast in MODES {
                let (ids, state) = draw(&gpu, &logits, vocab, &params, 1, fast);
                for r in 0..rows {
                    let row = &logits[r * vocab..(r + 1) * vocab];
                    let host = Sampler::new(SamplingParams::greedy())
                        .expect("greedy")
                        .sample(row, &[])
                        .expect("finite row");
                    prop_assert_eq!(ids[0][r], host, "fast {} sample row {}", fast, r);
                    prop_assert_eq!(greedy_ids[r], host, "argmax row {}", r);
                    // A top_k = 1 draw still consumes one value, as on the host.
                    prop_assert_eq!(
                        &state[r * RNG_STATE_WORDS..(r + 1) * RNG_STATE_WORDS],
                        &host_state(params[r].seed, 1)[..]
                    );
                }
            }
            Ok(())
        })
        .unwrap();
}

/// A row holding a NaN or an infinity anywhere gets SAMPLE_ID_NON_FINITE from `argmax`, as the host
/// sampler refuses it; the finite rows beside it get their argmax.
#[test]
fn argmax_flags_rows_with_a_nan_or_an_infinity() {
    let gpu = common::target("argmax_flags_rows_with_a_nan_or_an_infinity");
    let vocab = 32000;
    let bad_values = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::NAN];
    let rows = 2 * bad_values.len();
    let mut logits = random_values(91, rows * vocab, 6.0);
    // Bad values in the even rows, at the first, a middle and the last position.
    for (k, &bad) in bad_values.iter().enumerate() {
        let at = [0, 12_345, vocab - 1, 777][k];
        logits[2 * k * vocab + at] = bad;
    }
    let ids = run_argmax(&gpu, &logits, vocab);
    for r in 0..rows {
        let row = &logits[r * vocab..(r + 1) * vocab];
        match Sampler::new(SamplingParams::greedy())
            .expect("greedy")
            .sample(row, &[])
        {
            Ok(host) => assert_eq!(ids[r], host, "finite row {r}"),
            Err(_) => assert_eq!(
                ids[r], SAMPLE_ID_NON_FINITE,
                "row {r} holds a non-finite logit"
            ),
        }
    }
    assert_eq!(
        ids.iter().filter(|&&id| id == SAMPLE_ID_NON_FINITE).count(),
        4
    );
}

#[test]
fn refused_rows_get_their_sentinel_and_keep_their_state() {
    let gpu = common::target("refused_rows_get_their_sentinel_and_keep_their_state");
    let vocab = 3001;
    let bad_values = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
    let mut logits = random_values(77, 6 * vocab, 5.0);
    for (r, &bad) in bad_values.iter().enumerate() {
        logits[r * vocab + (r * 997 + 13) % vocab] = bad;
    }
    let good = RowParams {
        temperature: 0.8,
        top_k: 20,
        top_p: 0.9,
        seed: 5,
    };
    let rows = vec![
        RowParams { seed: 1, ..good },
        RowParams { seed: 2, ..good },
        RowParams { seed: 3, ..good },
        RowParams {
            temperature: 0.0,
            seed: 4,
            ..good
        },
        RowParams {
            top_p: 0.0,
            seed: 6,
            ..good
        },
        good,
    ];
    let host = Sampler::new(good.host())
        .expect("valid")
        .sample(&logits[5 * vocab..], &[])
        .expect("finite");
    for fast in MODES {
        let (ids, state) = draw(&gpu, &logits, vocab, &rows, 1, fast);
        for (r, &id) in ids[0].iter().enumerate().take(3) {
            assert_eq!(id, SAMPLE_ID_NON_FINITE, "fast {fast} row {r}");
        }
        assert_eq!(ids[0][3], SAMPLE_ID_BAD_PARAMS, "fast {fast} temperature 0");
        assert_eq!(ids[0][4], SAMPLE_ID_BAD_PARAMS, "fast {fast} top_p 0");
        for (r, params) in rows.iter().enumerate().take(5) {
            assert_eq!(
                &state[r * RNG_STATE_WORDS..(r + 1) * RNG_STATE_WORDS],
                &host_state(params.seed, 0)[..],
                "fast {fast} row {r} state must not advance"
            );
        }
        assert_eq!(
            ids[0][5], host,
            "fast {fast}: the valid row beside refused ones"
        );
        assert_eq!(&state[5 * RNG_STATE_WORDS..], &host_state(good.seed, 1)[..]);
    }
}

#[test]
fn top_p_alone_walks_in_weight_order_and_top_k_in_score_order() {
    let gpu = common::target("top_p_alone_walks_in_weight_order_and_top_k_in_score_order");
    // -0.0 and +0.0 have the same weight (ties to the lower id after top-p alone) but distinct
    // scores under the host's total order (+0.0 first after top-k); -800 underflows to weight 0.
    let mut row = random_values(11, 40, 3.0)
        .iter()
        .map(|v| v - 9.0)
        .collect::<Vec<f32>>();
    row[3] = -0.0;
    row[4] = 0.0;
    row[9] = -800.0;
    let configs = [(0u32, 0.3f32), (2, 0.3), (0, 1.0), (6, 1.0), (0, 0.999)];
    let mut first_ids = Vec::new();
    for (top_k, top_p) in configs {
        let rows = RowParams::seeded(gpu.cases(64, 6), 1.0, top_k, top_p);
        let ids = draws_match_the_host(&gpu, &row, &rows, 2);
        first_ids.push(ids[0][0]);
    }
    // The host itself picks id 3 (weight order) and id 4 (score order) in the first two configs,
    // so the orders the device follows are told apart.
    assert_eq!(&first_ids[..2], &[3, 4]);
}

/// The fast paths at their limits, against the host sampler with both modes: top-k of exactly 1024
/// (fast) and 1025 (search path), the k-th logit tied by more than 1024 ids (search path), top-p
/// alone whose cut falls inside the 1024 highest logits (peaked rows: fast) or far beyond them (flat
/// rows: search path), more than 1024 ids tied at the top, and no filter over a vocabulary that is not a
/// multiple of the block's 1024 runs.
#[test]
fn fast_paths_agree_with_the_host_at_their_limits() {
    let gpu = common::target("fast_paths_agree_with_the_host_at_their_limits");
    let vocab = 5003;
    let peaked: Vec<f32> = random_values(21, vocab, 3.0)
        .iter()
        .enumerate()
        .map(|(i, v)| if i % 97 == 5 { v + 12.0 } else { *v })
        .collect();
    let flat = random_values(22, vocab, 0.5);
    // 1200 ids share the value at rank 40 (and so at ranks 40 to 1239).
    let mut tied_kth = random_values(23, vocab, 2.0);
    let mut order: Vec<usize> = (0..vocab).collect();
    order.sort_by(|&a, &b| tied_kth[b].total_cmp(&tied_kth[a]));
    let kth = tied_kth[order[39]];
    for &i in &order[40..1240] {
        tied_kth[i] = kth;
    }
    // 1100 ids tied at the top.
    let mut tied_top = random_values(24, vocab, 2.0);
    for v in tied_top.iter_mut().take(1100) {
        *v = 9.0;
    }
    let cases: [(&[f32], u32, f32); 9] = [
        (&peaked, 1024, 1.0),
        (&peaked, 1025, 1.0),
        (&peaked, 1024, 0.9),
        (&tied_kth, 40, 1.0),
        (&peaked, 0, 0.9),
        (&flat, 0, 0.95),
        (&tied_top, 0, 0.5),
        (&tied_top, 3, 1.0),
        (&flat, 0, 1.0),
    ];
    for (row, top_k, top_p) in cases {
        let rows = RowParams::seeded(gpu.cases(16, 3), 0.8, top_k, top_p);
        draws_match_the_host(&gpu, row, &rows, 2);
    }
}

/// Draws `draws` times from `row` repeated once per entry of `rows`, both ways, and asserts every
/// id and final random state equal the host sampler's; returns the fast paths' ids.
fn draws_match_the_host(
    gpu: &Target,
    row: &[f32],
    rows: &[RowParams],
    draws: usize,
) -> Vec<Vec<u32>> {
    let logits: Vec<f32> = rows.iter().flat_map(|_| row.iter().copied()).collect();
    let mut last = Vec::new();
    for fast in MODES {
        let (ids, state) = draw(gpu, &logits, row.len(), rows, draws, fast);
        for (r, params) in rows.iter().enumerate() {
            let mut sampler = Sampler::new(params.host()).expect("valid");
            for (d, step) in ids.iter().enumerate() {
                let host = sampler.sample(row, &[]).expect("finite");
                assert_eq!(step[r], host, "fast {fast} {params:?} row {r} draw {d}");
            }
            assert_eq!(
                &state[r * RNG_STATE_WORDS..(r + 1) * RNG_STATE_WORDS],
                &host_state(params.seed, draws)[..],
                "fast {fast} {params:?} row {r} random state"
            );
        }
        last = ids;
    }
    last
}
