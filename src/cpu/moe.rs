//! The feed-forward block: the SwiGLU expert MLP `w2(silu(w1 x) * (w3 x))` and the full
//! mixture-of-experts block (route every token, group tokens by expert, run each expert once on
//! all of its tokens, add `weight * expert(x)` into each token's output in expert order).
//!
//! Shapes: `x, out: [tokens, hidden]`; router `[experts, hidden]`; w1/w3 `[intermediate, hidden]`,
//! w2 `[hidden, intermediate]`.

use super::matmul::matmul;
use super::packed_matmul::Matrix;
use super::router::{group_by_expert, route, Routing};
use crate::dtype::WeightSlice;
use crate::packed::Q8;

/// The three matrices of one expert (stored elements or packed codes).
#[derive(Debug, Clone, Copy)]
pub struct Expert<'a> {
    /// Gate projection `[intermediate, hidden]`.
    pub w1: Matrix<'a>,
    /// Down projection `[hidden, intermediate]`.
    pub w2: Matrix<'a>,
    /// Up projection `[intermediate, hidden]`.
    pub w3: Matrix<'a>,
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
    expert.w1.product(x, intermediate, hidden, act);
    expert.w3.product(x, intermediate, hidden, &mut up);
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
    mlp(x, expert, (hidden, intermediate), |v, _| v, out);
}

/// [`expert_mlp`] with 8-bit activations, as the W8A8 tensor-core kernels compute it: the rows of
/// `x` and of the SwiGLU activations are quantized per row to `format` and dequantized again
/// ([`Q8::round_trip_rows`]) before each product; the weights are used as they are.
///
/// # Panics
/// When the matrices do not have the shapes of the module docs.
pub fn expert_mlp_q8_activations(
    x: &[f32],
    expert: &Expert<'_>,
    (hidden, intermediate): (usize, usize),
    format: Q8,
    out: &mut [f32],
) {
    let quantize = |v: Vec<f32>, cols| format.round_trip_rows(&v, cols);
    mlp(x, expert, (hidden, intermediate), quantize, out);
}

/// The expert MLP with `input(rows, cols)` applied to the rows of x and of the activations before
/// each product.
fn mlp(
    x: &[f32],
    expert: &Expert<'_>,
    (hidden, intermediate): (usize, usize),
    input: impl Fn(Vec<f32>, usize) -> Vec<f32>,
    out: &mut [f32],
) {
    let tokens = x.len() / hidden.max(1);
    let mut act = vec![0.0f32; tokens * intermediate];
    expert_act(
        &input(x.to_vec(), hidden),
        expert,
        hidden,
        intermediate,
        &mut act,
    );
    expert
        .w2
        .product(&input(act, intermediate), hidden, intermediate, out);
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
    let routing = route_tokens(x, router, experts.len(), top_k, hidden);
    let all: Vec<(usize, Expert<'_>)> = experts.iter().copied().enumerate().collect();
    moe_experts(x, &routing, &all, experts.len(), hidden, intermediate, out);
}

/// The routing of every row of `x: [tokens, hidden]`: router logits `x . router^T`
/// (`router: [num_experts, hidden]`), then [`route`].
///
/// # Panics
/// As [`route`], or when the shapes disagree.
pub fn route_tokens(
    x: &[f32],
    router: WeightSlice<'_>,
    num_experts: usize,
    top_k: usize,
    hidden: usize,
) -> Routing {
    let tokens = x.len() / hidden.max(1);
    let mut logits = vec![0.0f32; tokens * num_experts];
    matmul(x, router, num_experts, hidden, &mut logits);
    route(&logits, num_experts, top_k)
}

/// The contribution of some of the experts to the MoE block: for every listed `(id, expert)` in
/// list order (increasing id for [`moe_block`]), its tokens in `routing` gathered, the expert run
/// once on them, and `weight(t, id) * expert(x[t])` added into `out[t]`; `out` starts at zero, so
/// a token routed to none of the listed experts gets a zero row. `intermediate` is the listed
/// experts' w1/w3 row count (a tensor-parallel rank passes its slice of the rows, and of w2's
/// columns, and gets its partial sum of the down projection).
///
/// Shapes: `x, out: [tokens, hidden]`; ids below `num_experts` (the routing's).
///
/// # Panics
/// When the shapes disagree or an id is not below `num_experts`.
pub fn moe_experts(
    x: &[f32],
    routing: &Routing,
    experts: &[(usize, Expert<'_>)],
    num_experts: usize,
    hidden: usize,
    intermediate: usize,
    out: &mut [f32],
) {
    assert_eq!(out.len(), x.len(), "moe_experts: out shape");
    let groups = group_by_expert(routing, num_experts);
    out.fill(0.0);
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    for &(e, expert) in experts {
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
        expert_mlp(&xs, &expert, hidden, intermediate, &mut ys);
        for (&a, y) in assigned.iter().zip(ys.chunks_exact(hidden)) {
            let t = groups.token(a);
            let w = routing.weights[a];
            for (o, &v) in out[t * hidden..(t + 1) * hidden].iter_mut().zip(y) {
                *o += v * w;
            }
        }
    }
}
