//! Host-side work on one logits row (`[vocab]` f32) of a request: log-probabilities with the top-k
//! alternatives (from the raw row), and the logit bias and presence / frequency penalties applied
//! before the sampler.
//!
//! Penalties follow the OpenAI definition: `logit[t] -= presence * (count[t] > 0) + frequency *
//! count[t]`, where `count[t]` is how often this choice generated `t` (the prompt does not count).

use super::event::TokenLogprob;
use crate::sampling::log_softmax;
use std::collections::HashMap;

/// `logits` with the bias added and the penalties subtracted; `counts` maps each generated token
/// id to how often it was generated. Ids outside the row are skipped (the request was validated).
pub fn adjust(
    logits: &[f32],
    bias: &[(u32, f32)],
    presence: f32,
    frequency: f32,
    counts: &HashMap<u32, usize>,
) -> Vec<f32> {
    let mut row = logits.to_vec();
    for &(id, b) in bias {
        if let Some(x) = row.get_mut(id as usize) {
            *x += b;
        }
    }
    if presence != 0.0 || frequency != 0.0 {
        for (&id, &count) in counts {
            if let Some(x) = row.get_mut(id as usize) {
                *x -= presence + frequency * count as f32;
            }
        }
    }
    row
}

/// The log-probability of `chosen` under `logits` and the `k` most likely tokens (most likely
/// first, ties to the lower id), computed in f64 ([`log_softmax`]) and rounded to f32.
pub fn logprobs(logits: &[f32], chosen: u32, k: usize) -> TokenLogprob {
    let lp = log_softmax(logits);
    let logprob = lp
        .get(chosen as usize)
        .copied()
        .unwrap_or(f64::NEG_INFINITY) as f32;
    let mut ranked: Vec<(u32, f64)> = lp.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
    let order = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let k = k.min(ranked.len());
    if k > 0 && k < ranked.len() {
        ranked.select_nth_unstable_by(k - 1, order);
    }
    ranked.truncate(k);
    ranked.sort_by(order);
    TokenLogprob {
        logprob,
        top: ranked.into_iter().map(|(id, v)| (id, v as f32)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bias_and_penalties_move_the_listed_logits_only() {
        let counts = HashMap::from([(1u32, 3usize)]);
        let row = adjust(&[0.0, 1.0, 2.0], &[(2, -5.0)], 0.5, 0.25, &counts);
        // token 1: 1 - 0.5 - 0.25 * 3; token 2: 2 - 5.
        assert_eq!(row, vec![0.0, 1.0 - 0.5 - 0.75, -3.0]);
    }

    #[test]
    fn logprobs_rank_and_normalise() {
        let t = logprobs(&[0.0, 2.0, 2.0, -1.0], 3, 2);
        let ids: Vec<u32> = t.top.iter().map(|x| x.0).collect();
        assert_eq!(ids, vec![1, 2], "ties go to the lower id");
        let total: f64 = [0.0f64, 2.0, 2.0, -1.0].iter().map(|x| x.exp()).sum();
        let want = (-1.0 - total.ln()) as f32;
        assert_eq!(t.logprob, want);
    }
}
