//! The CPU reference of what the MoE expert kernels write per slot, from the crate's own CPU
//! expert (`mixtral::cpu::moe::{expert_act, expert_mlp, expert_mlp_q8_activations}`): shared by
//! the bf16 and the quantized expert kernel tests, so the reference is called, never copied.

use mixtral::cpu::moe::{expert_act, expert_mlp, expert_mlp_q8_activations, Expert};
use mixtral::cpu::router::{ExpertGroups, Routing};
use mixtral::quant::Q8;

/// What the expert kernels multiply the weights with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activations {
    /// The activations as they are (the bf16 and weight-only quantized kernels).
    Exact,
    /// The rows of x and of the SwiGLU activations quantized per row to an 8-bit format (the
    /// W8A8 kernels); `act` is then the SwiGLU of the quantized x, before its own quantization.
    Q8(Q8),
}

/// What the expert kernels write for every slot `s = t * top_k + j` (token t's j-th expert e).
pub struct SlotReference {
    /// `[slots, inter]`: `silu(w1[e] x[t]) * (w3[e] x[t])`.
    pub act: Vec<f32>,
    /// `[slots, hidden]`: `weight[s] * w2[e] act[s]`.
    pub out: Vec<f32>,
}

/// The per-slot reference over `x: [tokens, hidden]`, each expert run once on all of its slots in
/// `groups` (the grouping the kernels are given), as the CPU engine's MoE block runs them.
pub fn expert_slots(
    x: &[f32],
    experts: &[Expert<'_>],
    routing: &Routing,
    groups: &ExpertGroups,
    hidden: usize,
    inter: usize,
) -> SlotReference {
    expert_slots_with(
        Activations::Exact,
        x,
        experts,
        routing,
        groups,
        (hidden, inter),
    )
}

/// [`expert_slots`] with the activations the kernels under test multiply with.
pub fn expert_slots_with(
    activations: Activations,
    x: &[f32],
    experts: &[Expert<'_>],
    routing: &Routing,
    groups: &ExpertGroups,
    (hidden, inter): (usize, usize),
) -> SlotReference {
    let slots = routing.experts.len();
    let mut act = vec![0.0f32; slots * inter];
    let mut out = vec![0.0f32; slots * hidden];
    for (e, expert) in experts.iter().enumerate() {
        let assigned = groups.of(e);
        if assigned.is_empty() {
            continue;
        }
        let xs: Vec<f32> = assigned
            .iter()
            .flat_map(|&a| {
                let t = groups.token(a);
                x[t * hidden..(t + 1) * hidden].iter().copied()
            })
            .collect();
        let mut acts = vec![0.0f32; assigned.len() * inter];
        let mut ys = vec![0.0f32; assigned.len() * hidden];
        match activations {
            Activations::Exact => {
                expert_act(&xs, expert, hidden, inter, &mut acts);
                expert_mlp(&xs, expert, hidden, inter, &mut ys);
            }
            Activations::Q8(format) => {
                let xq = format.round_trip_rows(&xs, hidden);
                expert_act(&xq, expert, hidden, inter, &mut acts);
                expert_mlp_q8_activations(&xs, expert, (hidden, inter), format, &mut ys);
            }
        }
        for (i, &a) in assigned.iter().enumerate() {
            act[a * inter..(a + 1) * inter].copy_from_slice(&acts[i * inter..(i + 1) * inter]);
            let w = routing.weights[a];
            for (o, &y) in out[a * hidden..(a + 1) * hidden]
                .iter_mut()
                .zip(&ys[i * hidden..(i + 1) * hidden])
            {
                *o = w * y;
            }
        }
    }
    SlotReference { act, out }
}
