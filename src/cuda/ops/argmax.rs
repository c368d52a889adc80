//! `argmax` (csrc/sampling.cu): greedy sampling, `out_ids[r]` = the lowest id of the maximum of
//! `logits[r, :]` (`[rows, vocab]` f32), or SAMPLE_NON_FINITE for a row holding a NaN or an infinity.

use crate::cuda::args::{ArgmaxArgs, ArgmaxScalars};
use crate::cuda::checks::Check;
use crate::cuda::launch::{planned_launcher, unless_empty, Grid, Planned};
use crate::cuda::params::{ArgmaxParams, KernelFamily, ARGMAX_THREADS};

fn plan(s: &ArgmaxScalars, a: &ArgmaxArgs<'_>) -> Planned<ArgmaxParams, 1> {
    let c = Check { op: "argmax" };
    let params = a.params(c.op, s)?;
    c.count("rows", s.rows as usize)?;
    c.at_least("vocab", s.vocab as usize, 1)?;
    c.product("rows * vocab", &[s.rows as usize, s.vocab as usize])?;
    let variant = c.variant(KernelFamily::Argmax, "argmax", &[])?;
    Ok(unless_empty(s.rows, params, [Grid::linear(variant, s.rows, ARGMAX_THREADS)]))
}

planned_launcher! {
    /// The argmax of each logits row; zero rows launch nothing.
    argmax(ArgmaxScalars, ArgmaxArgs) = plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::ops::fake::{too_small, unsupported, view, view_mut};

    fn args(logits: usize, out: usize) -> ArgmaxArgs<'static> {
        ArgmaxArgs {
            logits: view(logits),
            out_ids: view_mut(out),
        }
    }

    #[test]
    fn one_block_per_row_and_every_buffer_checked() {
        let s = ArgmaxScalars {
            rows: 4,
            vocab: 32000,
        };
        let (_, [grid]) = plan(&s, &args(128_000, 4)).unwrap().unwrap();
        assert_eq!((grid.grid, grid.block), ((4, 1, 1), ARGMAX_THREADS));
        too_small(plan(&s, &args(127_999, 4)), "logits");
        too_small(plan(&s, &args(128_000, 3)), "out_ids");
        unsupported(plan(&ArgmaxScalars { vocab: 0, ..s }, &args(0, 4)), "vocab");
    }
}
