//! Token selection from one row of logits (`[vocab]` f32): greedy argmax, or a seeded draw after
//! repetition penalty, temperature, top-k and top-p; and [`log_softmax`] for scoring.
//!
//! The filters apply in the order Hugging Face transformers applies them:
//! 1. repetition penalty (CTRL): for each distinct token of the history, a positive logit is divided
//!    by the penalty, a negative one multiplied by it;
//! 2. temperature: logits divided by `T`; `T == 0` means greedy (argmax, ties to the lowest id), and
//!    then nothing else below applies;
//! 3. top-k: only the `k` highest logits stay (ties to the lower id);
//! 4. top-p: of those, the smallest set of most probable tokens whose probability reaches `p` (at
//!    least one token);
//! 5. a draw from the softmax of what is left.
//!
//! All arithmetic after the input check is f64, so no filter can overflow an f32 logit. The draw
//! consumes exactly one value of the [`Rng`] stream; greedy consumes none. Same seed, same
//! logits, same history: same token.

mod rng;

pub use rng::Rng;

use std::cmp::Ordering;

/// Why sampling parameters or a logits row were refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// A parameter is outside its domain.
    #[error("invalid sampling parameter {name} = {value}: {expected}")]
    InvalidParameter {
        /// `temperature`, `top_p` or `repetition_penalty`.
        name: &'static str,
        /// The value given.
        value: f32,
        /// What the parameter must be.
        expected: &'static str,
    },
    /// The logits row has no entries.
    #[error("the logits row is empty")]
    EmptyLogits,
    /// The logits row has more entries than token ids can name.
    #[error("a logits row of {len} entries is larger than the u32 id range")]
    VocabTooLarge {
        /// The row length.
        len: usize,
    },
    /// A logit is NaN or infinite (the first such index).
    #[error("logit {index} is not finite ({value})")]
    NonFiniteLogits {
        /// Index (token id) of the first non-finite logit.
        index: usize,
        /// Its value.
        value: f32,
    },
    /// A token of the history has no logit (only checked when the repetition penalty is on).
    #[error("history token id {token} is outside the logits row of {vocab} entries")]
    HistoryOutOfRange {
        /// The offending id.
        token: u32,
        /// The row length.
        vocab: usize,
    },
}

/// How to choose each token.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    /// Softmax temperature; `0` = greedy. Must be finite and `>= 0`.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` = off.
    pub top_k: usize,
    /// Keep the smallest most-likely set reaching probability `top_p`; in `(0, 1]`, `1` = off.
    pub top_p: f32,
    /// CTRL repetition penalty over the history; finite and `> 0`, `1` = off.
    pub repetition_penalty: f32,
    /// Seed of the random stream.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    /// Greedy decoding: temperature 0, every filter off, seed 0.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }

    /// True when tokens are chosen by argmax (temperature 0).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks every parameter's domain; the error names the first bad one and its value.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let t = self.temperature;
        if !(t >= 0.0 && t.is_finite()) {
            return Err(SamplingError::InvalidParameter {
                name: "temperature",
                value: t,
                expected: "must be finite and >= 0 (0 = greedy)",
            });
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return Err(SamplingError::InvalidParameter {
                name: "top_p",
                value: p,
                expected: "must be in (0, 1] (1 = off)",
            });
        }
        let r = self.repetition_penalty;
        if !(r > 0.0 && r.is_finite()) {
            return Err(SamplingError::InvalidParameter {
                name: "repetition_penalty",
                value: r,
                expected: "must be finite and > 0 (1 = off)",
            });
        }
        Ok(())
    }
}

/// Natural log-softmax of a row, accumulated in f64: `x_i - max - ln(sum_j exp(x_j - max))`.
/// A non-finite input gives non-finite outputs; callers that need finite values check the row.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits
        .iter()
        .map(|&x| x as f64)
        .fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    let log_norm = max + sum.ln();
    logits.iter().map(|&x| x as f64 - log_norm).collect()
}

/// Orders (id, score) pairs by descending score, ties to the lower id.
fn by_rank(a: &(u32, f64), b: &(u32, f64)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Chooses tokens from logits rows with fixed parameters and its own seeded random stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    /// A sampler for `params` (validated), its stream seeded by `params.seed`.
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        Ok(Sampler {
            params,
            rng: Rng::new(params.seed),
        })
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The random stream's current position.
    pub fn rng(&self) -> &Rng {
        &self.rng
    }

    /// Moves the random stream to `rng` (where a device copy of it got to).
    pub fn set_rng(&mut self, rng: Rng) {
        self.rng = rng;
    }

    /// Chooses the next token from `logits` (`[vocab]`); `history` is the sequence so far (prompt
    /// and generated tokens), read by the repetition penalty only.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<u32, SamplingError> {
        let scores = self.penalised(logits, history)?;
        if self.params.is_greedy() {
            return Ok(argmax(&scores));
        }
        let (candidates, total) = self.filtered(scores);
        let target = self.rng.next_f64() * total;
        let mut cumulative = 0.0;
        let mut chosen = None;
        for &(id, weight) in &candidates {
            cumulative += weight;
            if weight > 0.0 {
                chosen = Some(id);
                if target < cumulative {
                    break;
                }
            }
        }
        // `filtered` always keeps the top token with weight 1, so `chosen` is set.
        Ok(chosen.unwrap_or_default())
    }

    /// The distribution `sample` draws from: (token id, probability) for every token it can
    /// return, most probable first (ties to the lower id), probabilities summing to 1. Greedy:
    /// the argmax with probability 1. Consumes no randomness.
    pub fn distribution(
        &self,
        logits: &[f32],
        history: &[u32],
    ) -> Result<Vec<(u32, f64)>, SamplingError> {
        let scores = self.penalised(logits, history)?;
        if self.params.is_greedy() {
            return Ok(vec![(argmax(&scores), 1.0)]);
        }
        let (mut candidates, total) = self.filtered(scores);
        for c in &mut candidates {
            c.1 /= total;
        }
        candidates.sort_by(by_rank);
        Ok(candidates)
    }

    /// Checks the row and applies the repetition penalty; f64 scores, one per token id.
    fn penalised(&self, logits: &[f32], history: &[u32]) -> Result<Vec<f64>, SamplingError> {
        if logits.is_empty() {
            return Err(SamplingError::EmptyLogits);
        }
        if u32::try_from(logits.len()).is_err() {
            return Err(SamplingError::VocabTooLarge { len: logits.len() });
        }
        if let Some((index, &value)) = logits.iter().enumerate().find(|(_, x)| !x.is_finite()) {
            return Err(SamplingError::NonFiniteLogits { index, value });
        }
        let mut scores: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
        let penalty = self.params.repetition_penalty as f64;
        if penalty != 1.0 {
            let mut distinct = history.to_vec();
            distinct.sort_unstable();
            distinct.dedup();
            for token in distinct {
                let vocab = scores.len();
                let score = usize::try_from(token)
                    .ok()
                    .and_then(|i| scores.get_mut(i))
                    .ok_or(SamplingError::HistoryOutOfRange { token, vocab })?;
                *score = if *score > 0.0 {
                    *score / penalty
                } else {
                    *score * penalty
                };
            }
        }
        Ok(scores)
    }

    /// Temperature, top-k and top-p over non-empty finite scores: the kept (id, unnormalised
    /// weight) pairs and their total. The best token has weight exactly 1 and is always kept.
    fn filtered(&self, scores: Vec<f64>) -> (Vec<(u32, f64)>, f64) {
        let temperature = self.params.temperature as f64;
        let mut candidates: Vec<(u32, f64)> = scores
            .into_iter()
            .enumerate()
            .map(|(id, s)| (id as u32, s / temperature))
            .collect();
        let top_k = self.params.top_k;
        let mut sorted = false;
        if top_k > 0 && top_k < candidates.len() {
            candidates.select_nth_unstable_by(top_k - 1, by_rank);
            candidates.truncate(top_k);
            candidates.sort_by(by_rank);
            sorted = true;
        }
        let max = candidates
            .iter()
            .map(|c| c.1)
            .fold(f64::NEG_INFINITY, f64::max);
        for c in &mut candidates {
            c.1 = (c.1 - max).exp();
        }
        let mut total: f64 = candidates.iter().map(|c| c.1).sum();
        let top_p = self.params.top_p as f64;
        if top_p < 1.0 {
            if !sorted {
                candidates.sort_by(by_rank);
            }
            let threshold = top_p * total;
            let mut cumulative = 0.0;
            let mut keep = candidates.len();
            for (i, c) in candidates.iter().enumerate() {
                cumulative += c.1;
                if cumulative >= threshold {
                    keep = i + 1;
                    break;
                }
            }
            candidates.truncate(keep);
            total = candidates.iter().map(|c| c.1).sum();
        }
        (candidates, total)
    }
}

/// Index of the largest score, ties to the lowest index; `scores` is non-empty and finite.
fn argmax(scores: &[f64]) -> u32 {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, &s) in scores.iter().enumerate() {
        if s > best.1 {
            best = (i, s);
        }
    }
    best.0 as u32
}
