//! Properties of the sampler: greedy is the argmax with lowest-id ties, top-k and top-p keep exactly
//! the tokens they should, draws follow softmax(logits / T), seeds repeat, the repetition penalty
//! moves logits the CTRL way, non-finite logits and bad parameters are refused.

use mixtral::sampling::{log_softmax, Sampler, SamplingError, SamplingParams};
use proptest::prelude::*;

fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k,
        top_p,
        repetition_penalty: 1.0,
        seed,
    }
}

/// The test's own softmax of `logits / t`, in f64.
fn softmax(logits: &[f32], t: f64) -> Vec<f64> {
    let scaled: Vec<f64> = logits.iter().map(|&x| x as f64 / t).collect();
    let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = scaled.iter().map(|s| (s - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|x| x / sum).collect()
}

/// Ids ordered by descending logit, ties to the lower id.
fn ranked(logits: &[f32]) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    ids.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    ids
}

/// Logits drawn from a few values, so ties are common.
fn tied_logits() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec((-3i32..4).prop_map(|v| v as f32 * 0.5), 1..40)
}

fn spread_logits() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(-8.0f32..8.0, 2..60)
}

proptest! {
    #[test]
    fn greedy_is_the_argmax_with_lowest_id_ties(logits in tied_logits(), history in prop::collection::vec(0u32..40, 0..5)) {
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let expected = logits.iter().position(|&x| x == max).unwrap() as u32;
        let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
        // The penalty is off: the history does not matter (and is not even range-checked).
        prop_assert_eq!(sampler.sample(&logits, &history).unwrap(), expected);
        prop_assert_eq!(sampler.distribution(&logits, &[]).unwrap(), vec![(expected, 1.0)]);
    }

    #[test]
    fn top_k_only_returns_one_of_the_k_best(
        logits in tied_logits(),
        k in 1usize..8,
        t in 0.2f32..3.0,
        seed in any::<u64>(),
    ) {
        let best: Vec<u32> = ranked(&logits).into_iter().take(k).collect();
        let mut sampler = Sampler::new(params(t, k, 1.0, seed)).unwrap();
        for _ in 0..30 {
            let id = sampler.sample(&logits, &[]).unwrap();
            prop_assert!(best.contains(&id), "{id} not among {best:?}");
        }
        let support: Vec<u32> = sampler.distribution(&logits, &[]).unwrap().iter().map(|c| c.0).collect();
        let mut sorted_support = support.clone();
        sorted_support.sort_unstable();
        let mut sorted_best = best.clone();
        sorted_best.sort_unstable();
        prop_assert_eq!(sorted_support, sorted_best);
    }

    #[test]
    fn top_p_support_is_the_minimal_prefix(
        logits in spread_logits(),
        p in 0.05f32..0.99,
        t in 0.3f32..2.0,
    ) {
        let probs = softmax(&logits, t as f64);
        let order = ranked(&logits);
        let mut cumulative = 0.0;
        let mut expected = Vec::new();
        for &id in &order {
            // Boundaries within rounding of p are ambiguous; skip those cases.
            prop_assume!((cumulative - p as f64).abs() > 1e-9);
            if cumulative >= p as f64 {
                break;
            }
            cumulative += probs[id as usize];
            expected.push(id);
        }
        let sampler = Sampler::new(params(t, 0, p, 0)).unwrap();
        let dist = sampler.distribution(&logits, &[]).unwrap();
        let support: Vec<u32> = dist.iter().map(|c| c.0).collect();
        prop_assert_eq!(&support, &expected);
        // Renormalised over the support.
        for &(id, q) in &dist {
            let want = probs[id as usize] / cumulative;
            prop_assert!((q - want).abs() < 1e-9, "{q} vs {want}");
        }
    }

    #[test]
    fn same_seed_same_tokens(
        logits in spread_logits(),
        t in 0.3f32..2.0,
        k in 0usize..10,
        p in 0.3f32..=1.0,
        seed in any::<u64>(),
    ) {
        let mut a = Sampler::new(params(t, k, p, seed)).unwrap();
        let mut b = Sampler::new(params(t, k, p, seed)).unwrap();
        for _ in 0..20 {
            prop_assert_eq!(a.sample(&logits, &[]).unwrap(), b.sample(&logits, &[]).unwrap());
        }
    }

    #[test]
    fn non_finite_logits_are_refused(
        logits in spread_logits(),
        at in any::<prop::sample::Index>(),
        bad in prop::sample::select(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY]),
        t in prop::sample::select(vec![0.0f32, 1.0]),
    ) {
        let mut logits = logits;
        let index = at.index(logits.len());
        logits[index] = bad;
        let mut sampler = Sampler::new(params(t, 0, 1.0, 3)).unwrap();
        let err = sampler.sample(&logits, &[]).unwrap_err();
        prop_assert!(matches!(err, SamplingError::NonFiniteLogits { index: i, .. } if i == index), "{err:?}");
        prop_assert!(sampler.distribution(&logits, &[]).is_err());
    }

    #[test]
    fn repetition_penalty_moves_history_logits_the_ctrl_way(
        logits in prop::collection::vec(-6.0f32..6.0, 3..30),
        penalty in prop::sample::select(vec![0.5f32, 1.3, 2.0, 4.0]),
        picks in prop::collection::vec(any::<prop::sample::Index>(), 1..6),
    ) {
        let n = logits.len();
        let history: Vec<u32> = picks.iter().map(|i| i.index(n) as u32).collect();
        let mut doubled = history.clone();
        doubled.extend(&history);
        let sampler = Sampler::new(SamplingParams {
            temperature: 1.0,
            repetition_penalty: penalty,
            ..SamplingParams::greedy()
        })
        .unwrap();
        let dist = sampler.distribution(&logits, &history).unwrap();
        // Each distinct token is penalised once, however often it occurs.
        prop_assert_eq!(&dist, &sampler.distribution(&logits, &doubled).unwrap());
        let mut q = vec![0.0f64; n];
        for &(id, p) in &dist {
            q[id as usize] = p;
        }
        // Effective logits, up to a shared constant: ln q.
        let reference = (0..n).find(|i| !history.contains(&(*i as u32)));
        let Some(u) = reference else { return Ok(()) };
        for &h in &history {
            let l = logits[h as usize] as f64;
            let want = if l > 0.0 { l / penalty as f64 } else { l * penalty as f64 };
            let got = q[h as usize].ln() - q[u].ln() + logits[u] as f64;
            prop_assert!((got - want).abs() < 1e-6, "token {h}: {got} vs {want}");
        }
    }

    #[test]
    fn log_softmax_normalises_and_ignores_shifts(logits in spread_logits(), shift in -50.0f32..50.0) {
        let lp = log_softmax(&logits);
        let total: f64 = lp.iter().map(|x| x.exp()).sum();
        prop_assert!((total - 1.0).abs() < 1e-12);
        let shifted: Vec<f32> = logits.iter().map(|x| x + shift).collect();
        for (a, b) in lp.iter().zip(log_softmax(&shifted)) {
            prop_assert!((a - b).abs() < 1e-4);
        }
        let own = softmax(&logits, 1.0);
        for (a, b) in lp.iter().zip(own) {
            prop_assert!((a - b.ln()).abs() < 1e-10);
        }
    }
}

/// Frequencies over many draws against the expected probabilities: within 5 standard errors.
fn check_frequencies(sampler: &mut Sampler, logits: &[f32], expected: &[f64]) {
    const DRAWS: usize = 200_000;
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..DRAWS {
        counts[sampler.sample(logits, &[]).unwrap() as usize] += 1;
    }
    for (id, (&c, &p)) in counts.iter().zip(expected).enumerate() {
        let freq = c as f64 / DRAWS as f64;
        let sigma = (p * (1.0 - p) / DRAWS as f64).sqrt().max(1e-9);
        assert!(
            (freq - p).abs() <= 5.0 * sigma,
            "token {id}: frequency {freq} vs probability {p}"
        );
    }
}

#[test]
fn draws_follow_softmax_of_logits_over_temperature() {
    let logits = [1.0f32, 0.5, -0.3, 2.0, 0.0, -1.2];
    for (t, seed) in [(1.0f32, 1u64), (0.6, 2), (2.5, 3)] {
        let mut sampler = Sampler::new(params(t, 0, 1.0, seed)).unwrap();
        check_frequencies(&mut sampler, &logits, &softmax(&logits, t as f64));
    }
}

#[test]
fn draws_after_top_k_and_top_p_follow_the_renormalised_softmax() {
    let logits = [1.0f32, 0.5, -0.3, 2.0, 0.0, -1.2];
    // Top-3 keeps ids 3, 0, 1.
    let full = softmax(&logits, 0.8);
    let kept = full[3] + full[0] + full[1];
    let expected: Vec<f64> = (0..6)
        .map(|i| {
            if [3, 0, 1].contains(&i) {
                full[i] / kept
            } else {
                0.0
            }
        })
        .collect();
    let mut sampler = Sampler::new(params(0.8, 3, 1.0, 9)).unwrap();
    check_frequencies(&mut sampler, &logits, &expected);
    // Top-p just above the two best tokens' mass keeps three.
    let p = (full[3] + full[0]) as f32 + 0.01;
    let mut sampler = Sampler::new(params(0.8, 0, p, 10)).unwrap();
    check_frequencies(&mut sampler, &logits, &expected);
}

#[test]
fn different_seeds_give_different_streams() {
    let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.1).collect();
    let draw = |seed| {
        let mut s = Sampler::new(params(1.0, 0, 1.0, seed)).unwrap();
        (0..50)
            .map(|_| s.sample(&logits, &[]).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(draw(5), draw(5));
    assert_ne!(draw(5), draw(6));
}

#[test]
fn bad_parameters_name_the_parameter_and_value() {
    let cases = [
        (params(-0.5, 0, 1.0, 0), "temperature", -0.5),
        (
            params(f32::INFINITY, 0, 1.0, 0),
            "temperature",
            f32::INFINITY,
        ),
        (params(1.0, 0, 0.0, 0), "top_p", 0.0),
        (params(1.0, 0, 1.5, 0), "top_p", 1.5),
        (
            SamplingParams {
                repetition_penalty: 0.0,
                ..SamplingParams::greedy()
            },
            "repetition_penalty",
            0.0,
        ),
        (
            SamplingParams {
                repetition_penalty: -1.0,
                ..SamplingParams::greedy()
            },
            "repetition_penalty",
            -1.0,
        ),
    ];
    for (p, name, value) in cases {
        let err = p.validate().unwrap_err();
        match &err {
            SamplingError::InvalidParameter {
                name: n, value: v, ..
            } => {
                assert_eq!((*n, *v), (name, value));
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains(name), "{err}");
        assert!(Sampler::new(p).is_err());
    }
    let nan = params(f32::NAN, 0, 1.0, 0).validate().unwrap_err();
    assert!(nan.to_string().contains("temperature = NaN"), "{nan}");
    let nan = SamplingParams {
        repetition_penalty: f32::NAN,
        ..SamplingParams::greedy()
    };
    assert!(nan.validate().is_err());
    assert!(params(0.0, 0, 1.0, 0).validate().is_ok());
    assert!(params(0.7, 40, 0.9, 0).validate().is_ok());
}

#[test]
fn empty_rows_and_out_of_range_history_are_errors() {
    let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
    assert_eq!(sampler.sample(&[], &[]), Err(SamplingError::EmptyLogits));
    let mut penalised = Sampler::new(SamplingParams {
        repetition_penalty: 1.2,
        ..SamplingParams::greedy()
    })
    .unwrap();
    assert_eq!(
        penalised.sample(&[0.5, 1.0], &[0, 9]),
        Err(SamplingError::HistoryOutOfRange { token: 9, vocab: 2 })
    );
}
