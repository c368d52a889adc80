//! Greedy continuation through any engine's step API: the prompt in one step, then one decode step
//! per token through the paged KV cache, each token the argmax of the last position's logits.

use mixtral::sampling::{Sampler, SamplingParams};
use mixtral::{Engine, LogitsFor, SeqStep};

/// The `n` greedy tokens after `prompt` on `engine`, from a sequence of its own (freed after). Each
/// step must return exactly the last position's logits row.
pub fn greedy_steps(engine: &mut dyn Engine, prompt: &[u32], n: usize) -> Vec<u32> {
    let seq = engine.new_sequence().unwrap();
    let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
    let mut tokens = prompt.to_vec();
    let mut start = 0;
    let mut generated = Vec::new();
    while generated.len() < n {
        let step = SeqStep {
            seq,
            tokens: &tokens[start..],
            start_pos: start,
            logits: LogitsFor::Last,
        };
        let out = engine.step(&[step]).unwrap();
        assert_eq!(out.rows, vec![(0, tokens.len() - 1)]);
        let next = sampler.sample(out.row(0), &generated).unwrap();
        start = tokens.len();
        tokens.push(next);
        generated.push(next);
    }
    engine.free_sequence(seq).unwrap();
    generated
}
