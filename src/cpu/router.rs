//! Mixture-of-experts routing: per token, softmax over all expert logits (f32), the top k experts
//! (ties: the lower expert index wins), their probabilities renormalised to sum to 1; and the
//! grouping of (token, choice) pairs per expert that the expert kernels consume.
//!
//! Logits: `[tokens, experts]`; routes: `[tokens, k]` (expert ids and weights, best first).

/// The experts chosen for one token, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Expert ids, distinct, in decreasing probability (ties: lower id first).
    pub experts: Vec<usize>,
    /// Renormalised weights (sum to 1), matching `experts`.
    pub weights: Vec<f32>,
}

/// Routes one token from its router logits (`[experts]`).
pub fn route(logits: &[f32], k: usize) -> Route {
    assert!(k >= 1 && k <= logits.len(), "route: k out of range");
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let total: f32 = exps.iter().sum();
    let probs: Vec<f32> = exps.iter().map(|e| e / total).collect();
    let mut order: Vec<usize> = (0..probs.len()).collect();
    // Stable sort by decreasing probability: equal probabilities keep the lower index first.
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let experts: Vec<usize> = order[..k].to_vec();
    let chosen: f32 = experts.iter().map(|&e| probs[e]).sum();
    let weights = experts.iter().map(|&e| probs[e] / chosen).collect();
    Route { experts, weights }
}

/// Routes every token of `logits` (`[tokens, experts]`).
pub fn route_all(logits: &[f32], num_experts: usize, k: usize) -> Vec<Route> {
    logits
        .chunks(num_experts)
        .map(|row| route(row, k))
        .collect()
}

/// (token, choice) pairs grouped by expert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertGroups {
    /// Pairs routed to each expert: `[experts]`.
    pub counts: Vec<usize>,
    /// Start of each expert's run in `permutation`: `[experts + 1]`, `offsets[e+1] = offsets[e] + counts[e]`.
    pub offsets: Vec<usize>,
    /// `token * k + choice` for every pair, grouped by expert, tokens ascending within a group.
    pub permutation: Vec<usize>,
}

/// Groups the choices of `routes` (each with `k` experts) by expert.
pub fn group_by_expert(routes: &[Route], num_experts: usize) -> ExpertGroups {
    let mut counts = vec![0usize; num_experts];
    for r in routes {
        for &e in &r.experts {
            counts[e] += 1;
        }
    }
    let mut offsets = vec![0usize; num_experts + 1];
    for e in 0..num_experts {
        offsets[e + 1] = offsets[e] + counts[e];
    }
    let mut cursor = offsets.clone();
    let mut permutation = vec![0usize; offsets[num_experts]];
    for (token, r) in routes.iter().enumerate() {
        let k = r.experts.len();
        for (choice, &e) in r.experts.iter().enumerate() {
            permutation[cursor[e]] = token * k + choice;
            cursor[e] += 1;
        }
    }
    ExpertGroups {
        counts,
        offsets,
        permutation,
    }
}
