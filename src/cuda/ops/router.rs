//! `router` (csrc/router.cu): the MoE router of `[tokens, hidden]` bf16 states over a
//! `[experts, hidden]` gate, one launch: each block (one per token) writes the f32 logits
//! `[tokens, experts]`, the top_k experts `[tokens, top_k]` (softmax, ties to the lower expert) and
//! their renormalised weights; the last block to finish groups the `tokens * top_k` slots by expert:
//! counts `[experts]`, offsets `[experts + 1]` and `sorted_slots`. `done` `[1]` counts the finished
//! blocks (0 between launches: allocated zeroed, reset by that last block).

use crate::cuda::args::{RouterArgs, RouterScalars};
use crate::cuda::checks::Check;
use crate::cuda::launch::{planned_launcher, unless_empty, Grid, Planned};
use crate::cuda::params::{
    KernelFamily, RouterParams, ROUTER_MAX_EXPERTS, ROUTER_MAX_TOP_K, ROUTER_THREADS,
};

planned_launcher! {
    /// Router logits, softmax, top-k with renormalised weights, and the grouping of slots per expert;
    /// zero tokens launch nothing.
    router(RouterScalars, RouterArgs) = plan; emulated router_emulated
}

fn plan(s: &RouterScalars, a: &RouterArgs<'_>) -> Planned<RouterParams, 1> {
    let c = Check::new("router");
    let params = a.params(c.op, s)?;
    c.multiple_of_8("hidden", s.hidden as usize)?;
    if s.experts == 0 || s.experts > ROUTER_MAX_EXPERTS {
        return Err(c.unsupported(
            "experts",
            s.experts as usize,
            format!("must be in 1..={ROUTER_MAX_EXPERTS}"),
        ));
    }
    if s.top_k == 0 || s.top_k > s.experts || s.top_k > ROUTER_MAX_TOP_K {
        return Err(c.unsupported(
            "top_k",
            s.top_k as usize,
            format!("must be in 1..={ROUTER_MAX_TOP_K} and at most experts"),
        ));
    }
    c.count("tokens", s.tokens as usize)?;
    c.product("tokens * top_k", &[s.tokens as usize, s.top_k as usize])?;
    let router = c.variant(KernelFamily::Router, "router", &[])?;
    Ok(unless_empty(
        s.tokens,
        params,
        [Grid::linear(router, s.tokens, ROUTER_THREADS)],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::ops::fake::{misaligned, too_small, unsupported, view, view_mut, BASE};

    /// Buffers of exactly the sizes `s` needs, `expert_offsets` `offsets_short` elements short.
    fn args(s: &RouterScalars, offsets_short: usize) -> RouterArgs<'static> {
        let [t, h, e, k] = [s.tokens, s.hidden, s.experts, s.top_k].map(|v| v as usize);
        RouterArgs {
            x: view(t * h),
            gate: view(e * h),
            logits: view_mut(t * e),
            topk_ids: view_mut(t * k),
            topk_weights: view_mut(t * k),
            expert_counts: view_mut(e),
            expert_offsets: view_mut(e + 1 - offsets_short),
            sorted_slots: view_mut(t * k),
            done: view_mut(1),
        }
    }

    #[test]
    fn router_limits_and_launches() {
        let s = RouterScalars {
            tokens: 3,
            hidden: 64,
            experts: 8,
            top_k: 2,
        };
        let (params, [router]) = plan(&s, &args(&s, 0)).unwrap().unwrap();
        assert_eq!(
            (router.symbol(), router.grid, router.block),
            ("router", (3, 1, 1), ROUTER_THREADS)
        );
        assert_eq!(
            (params.tokens, params.hidden, params.experts, params.top_k),
            (3, 64, 8, 2)
        );
        let bad = |s: RouterScalars, what: &str| unsupported(plan(&s, &args(&s, 0)), what);
        bad(RouterScalars { hidden: 60, ..s }, "hidden");
        bad(
            RouterScalars {
                top_k: 9,
                experts: 16,
                ..s
            },
            "top_k",
        );
        bad(
            RouterScalars {
                top_k: 3,
                experts: 2,
                ..s
            },
            "top_k",
        );
        bad(RouterScalars { top_k: 0, ..s }, "top_k");
        bad(RouterScalars { experts: 257, ..s }, "experts");
        bad(
            RouterScalars {
                tokens: 1 << 31,
                hidden: 8,
                ..s
            },
            "tokens",
        );
        too_small(plan(&s, &args(&s, 1)), "expert_offsets");
        too_small(
            plan(
                &s,
                &RouterArgs {
                    done: view_mut(0),
                    ..args(&s, 0)
                },
            ),
            "done",
        );
        // SAFETY: the planner only reads the address; nothing is launched.
        let x = unsafe { crate::cuda::memory::View::from_raw(BASE + 8, 192) };
        misaligned(plan(&s, &RouterArgs { x, ..args(&s, 0) }), "x");
        let empty = RouterScalars { tokens: 0, ..s };
        assert!(plan(&empty, &args(&empty, 0)).unwrap().is_none());
    }
}
