//! The feed-forward block: the SwiGLU expert MLP `w2(silu(w1 x) * (w3 x))` and the full
//! mixture-of-experts block (route every token, group tokens by expert, run each expert once on
//! all of its tokens, add `weight * expert(x)` into each token's output in expert order).
//!
//! Shapes: `x, out: [tokens, hidden]`; router `[experts, hidden]`; w1/w3 `[intermediate, hidden]`,
//! w2 `[hidden, intermediate]`.

use super::matmul::matmul;
use super::router::{group_by_expert, route};
use crate::dtype::WeightSlice;

/// The three matrices of one expert.
#[derive(Debug, Clone, Copy)]
pub struct Expert<'a> {
    /// Gate projection `[intermediate, hidden]`.
    pub w1: WeightSlice<'a>,
    /// Down projection `[hidden, intermediate]`.
    pub w2: WeightSlice<'a>,
    /// Up projection `[intermediate, hidden]`.
    pub w3: WeightSlice<'a>,
}

/// `x * sigmoid(x)` in f32, as `x / (1 + exp(-x))`.
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// The SwiGLU activation `act = silu(w1 x) * (w3 x)` of every row of `x: [tokens, hidden]` into
/// `act: [tokens, intermediate]`: the input of the down projection `w2` (what the GPU expert
/// kernels store before it).
///
/// # Panics
/// When the matrices or `act` do not have the shapes of the module docs.
pub fn expert_act(
    x: &[f32],
    expert: &Expert<'_>,
    hidden: usize,
    intermediate: usize,
    act: &mut [f32],
) {
    let mut up = vec![0.0f32; act.len()];
    matmul(x, expert.w1, intermediate, hidden, act);
    matmul(x, expert.w3, intermediate, hidden, &mut up);
    for (g, u) in act.iter_mut().zip(&up) {
        *g = silu(*g) * u;
    }
}

/// `out = w2(silu(w1 x) * (w3 x))` for every row of `x: [tokens, hidden]`.
///
/// # Panics
/// When the matrices do not have the shapes of the module docs.
pub fn expert_mlp(
    x: &[f32],
    expert: &Expert<'_>,
    hidden: usize,
    intermediate: usize,
    out: &mut [f32],
) {
    let tokens = x.len() / hidden.max(1);
    let mut act = vec![0.0f32; tokens * intermediate];
    expert_act(x, expert, hidden, intermediate, &mut act);
    matmul(&act, expert.w2, hidden, intermediate, out);
}

/// The feed-forward block over `x: [tokens, hidden]` into `out: [tokens, hidden]`.
///
/// With a router (`[experts.len(), hidden]`), each token goes to its `top_k` experts and
/// `out[t] = sum_e weight(t, e) * expert_e(x[t])`, summed in increasing expert order. Without one
/// (the dense case) there must be exactly one expert and `out = expert(x)`.
///
/// # Panics
/// When the shapes disagree, there are no experts, a router is missing for several experts, or
/// `top_k` is zero or above the number of experts.
pub fn moe_block(
    x: &[f32],
    router: Option<WeightSlice<'_>>,
    experts: &[Expert<'_>],
    top_k: usize,
    hidden: usize,
    intermediate: usize,
    out: &mut [f32],
) {
    assert_eq!(out.len(), x.len(), "moe_block: out shape");
    let Some(router) = router else {
        assert_eq!(experts.len(), 1, "moe_block: no router for several experts");
        expert_mlp(x, &experts[0], hidden, intermediate, out);
        return;
    };
    let tokens = x.len() / hidden.max(1);
    let num_experts = experts.len();
    let mut logits = vec![0.0f32; tokens * num_experts];
    matmul(x, router, num_experts, hidden, &mut logits);
    let routing = route(&logits, num_experts, top_k);
    let groups = group_by_expert(&routing, num_experts);
    out.fill(0.0);
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    for (e, expert) in experts.iter().enumerate() {
        let assigned = groups.of(e);
        if assigned.is_empty() {
            continue;
        }
        xs.clear();
        for &a in assigned {
            let t = groups.token(a);
            xs.extend_from_slice(&x[t * hidden..(t + 1) * hidden]);
        }
        ys.resize(xs.len(), 0.0);
        expert_mlp(&xs, expert, hidden, intermediate, &mut ys);
        for (&a, y) in assigned.iter().zip(ys.chunks_exact(hidden)) {
            let t = groups.token(a);
            let w = routing.weights[a];
            for (o, &v) in out[t * hidden..(t + 1) * hidden].iter_mut().zip(y) {
                *o += v * w;
            }
        }
    }
}
