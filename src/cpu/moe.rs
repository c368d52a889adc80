//! The sparse mixture-of-experts feed-forward block.
//!
//! For `x`: `[tokens, hidden]`: router logits `x . gate^T` (`[tokens, experts]`), routing
//! ([`router`](super::router)), then each expert runs once on all the tokens routed to it:
//! `w2( silu(w1 x) * (w3 x) )` (`w1`, `w3`: `[intermediate, hidden]`, `w2`: `[hidden, intermediate]`),
//! and its outputs are added into the tokens' rows scaled by their routing weights, experts in
//! increasing index order. Without a router (the dense one-expert case) the single expert's output is
//! the block's output.

use super::matmul::matmul;
use super::router::{group_by_expert, route_all};
use crate::weights::{ExpertWeights, LayerWeights};

/// `silu(a) * b`, elementwise, into `a`.
fn swiglu(a: &mut [f32], b: &[f32]) {
    for (x, &y) in a.iter_mut().zip(b) {
        *x = *x / (1.0 + (-*x).exp()) * y;
    }
}

/// One expert on `x` (`[tokens, hidden]`), returning `[tokens, hidden]`.
pub fn expert_mlp(expert: &ExpertWeights, x: &[f32], tokens: usize) -> Vec<f32> {
    let (inter, hidden) = (expert.w1.rows, expert.w1.cols);
    let mut gate = vec![0.0f32; tokens * inter];
    let mut up = vec![0.0f32; tokens * inter];
    matmul(x, tokens, expert.w1.data(), inter, hidden, &mut gate);
    matmul(x, tokens, expert.w3.data(), inter, hidden, &mut up);
    swiglu(&mut gate, &up);
    let mut out = vec![0.0f32; tokens * hidden];
    matmul(&gate, tokens, expert.w2.data(), hidden, inter, &mut out);
    out
}

/// The MoE block of `layer` on `x` (`[tokens, hidden]`), returning `[tokens, hidden]`.
pub fn moe_block(
    layer: &LayerWeights,
    k: usize,
    x: &[f32],
    tokens: usize,
    hidden: usize,
) -> Vec<f32> {
    let Some(router) = &layer.router else {
        return expert_mlp(&layer.experts[0], x, tokens);
    };
    let num_experts = layer.experts.len();
    let mut logits = vec![0.0f32; tokens * num_experts];
    matmul(x, tokens, router.data(), num_experts, hidden, &mut logits);
    let routes = route_all(&logits, num_experts, k);
    let groups = group_by_expert(&routes, num_experts);
    let mut out = vec![0.0f32; tokens * hidden];
    for (e, expert) in layer.experts.iter().enumerate() {
        let pairs = &groups.permutation[groups.offsets[e]..groups.offsets[e + 1]];
        if pairs.is_empty() {
            continue;
        }
        let mut gathered = Vec::with_capacity(pairs.len() * hidden);
        for &pair in pairs {
            let token = pair / k;
            gathered.extend_from_slice(&x[token * hidden..(token + 1) * hidden]);
        }
        let y = expert_mlp(expert, &gathered, pairs.len());
        for (&pair, y_row) in pairs.iter().zip(y.chunks(hidden)) {
            let (token, choice) = (pair / k, pair % k);
            let weight = routes[token].weights[choice];
            for (o, v) in out[token * hidden..(token + 1) * hidden]
                .iter_mut()
                .zip(y_row)
            {
                *o += weight * v;
            }
        }
    }
    out
}
