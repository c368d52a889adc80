//! Mixture-of-experts routing: softmax over all experts of each token's router logits, the top
//! `k` experts (ties: the lower expert index wins), their probabilities renormalised to sum to 1;
//! and the grouping of the (token, slot) assignments by expert (counts, offsets, permutation), the
//! reference for a fused GPU router kernel.
//!
//! Shapes: logits `[tokens, experts]`; [`Routing`] `experts`/`weights` `[tokens, k]`;
//! [`ExpertGroups`] `counts [experts]`, `offsets [experts + 1]`, `assignments [tokens * k]`.

/// The experts chosen for each token and their weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// Experts per token.
    pub top_k: usize,
    /// `[tokens, top_k]`: chosen expert ids, by descending probability (ties: lower id first).
    pub experts: Vec<usize>,
    /// `[tokens, top_k]`: the chosen probabilities divided by their sum.
    pub weights: Vec<f32>,
}

impl Routing {
    /// Number of tokens routed.
    pub fn tokens(&self) -> usize {
        self.experts.len().checked_div(self.top_k).unwrap_or(0)
    }
}

/// Softmax of one row in f32: `exp(l - max) / sum`.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut p: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = p.iter().sum();
    for v in &mut p {
        *v /= sum;
    }
    p
}

/// Routes every token: softmax over `num_experts` logits, top `top_k`, renormalise.
///
/// Shapes: `logits: [tokens, num_experts]`.
///
/// # Panics
/// When `top_k` is zero or above `num_experts`, or `logits` is not `[tokens, num_experts]`.
pub fn route(logits: &[f32], num_experts: usize, top_k: usize) -> Routing {
    assert!(
        top_k > 0 && top_k <= num_experts,
        "route: top_k {top_k} with {num_experts} experts"
    );
    assert_eq!(logits.len() % num_experts, 0, "route: logits shape");
    let tokens = logits.len() / num_experts;
    let mut experts = Vec::with_capacity(tokens * top_k);
    let mut weights = Vec::with_capacity(tokens * top_k);
    let mut order: Vec<usize> = Vec::with_capacity(num_experts);
    for row in logits.chunks_exact(num_experts) {
        let p = softmax(row);
        order.clear();
        order.extend(0..num_experts);
        // Descending probability, ascending index among equals (stable sort keeps index order).
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
        let chosen = &order[..top_k];
        let sum: f32 = chosen.iter().map(|&e| p[e]).sum();
        experts.extend_from_slice(chosen);
        weights.extend(chosen.iter().map(|&e| p[e] / sum));
    }
    Routing {
        top_k,
        experts,
        weights,
    }
}

/// The assignments of a [`Routing`] grouped by expert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertGroups {
    /// `[experts]`: assignments per expert.
    pub counts: Vec<usize>,
    /// `[experts + 1]`: exclusive prefix sums of `counts`; expert `e`'s assignments are
    /// `assignments[offsets[e] .. offsets[e + 1]]`.
    pub offsets: Vec<usize>,
    /// `[tokens * top_k]`: flat assignment indices `token * top_k + slot`, grouped by expert and in
    /// increasing order within each expert.
    pub assignments: Vec<usize>,
    /// Experts per token of the routing grouped.
    pub top_k: usize,
}

impl ExpertGroups {
    /// The assignment indices of expert `e`.
    pub fn of(&self, e: usize) -> &[usize] {
        &self.assignments[self.offsets[e]..self.offsets[e + 1]]
    }

    /// The token of flat assignment index `a`.
    pub fn token(&self, a: usize) -> usize {
        a / self.top_k
    }
}

/// Groups the assignments of `routing` by expert (a counting sort, stable in assignment order).
///
/// # Panics
/// When an expert id is not below `num_experts`.
pub fn group_by_expert(routing: &Routing, num_experts: usize) -> ExpertGroups {
    let mut counts = vec![0usize; num_experts];
    for &e in &routing.experts {
        counts[e] += 1;
    }
    let mut offsets = Vec::with_capacity(num_experts + 1);
    offsets.push(0);
    for &c in &counts {
        offsets.push(offsets[offsets.len() - 1] + c);
    }
    let mut next = offsets[..num_experts].to_vec();
    let mut assignments = vec![0usize; routing.experts.len()];
    for (a, &e) in routing.experts.iter().enumerate() {
        assignments[next[e]] = a;
        next[e] += 1;
    }
    ExpertGroups {
        counts,
        offsets,
        assignments,
        top_k: routing.top_k,
    }
}
