//! `argmax` (csrc/sampling.cu): greedy sampling, `out_ids[r]` = the lowest id of the maximum of
//! `logits[r, :]` (`[rows, vocab]` f32), or SAMPLE_NON_FINITE for a row holding a NaN or an infinity.
//! Also the rules and grid of every per-row kernel of that file ([`one_block_per_row`], which
//! `sample` plans with as well).

use crate::cuda::args::{ArgmaxArgs, ArgmaxScalars};
use crate::cuda::checks::Check;
use crate::cuda::launch::{planned_launcher, unless_empty, Grid, Planned};
use crate::cuda::params::{ArgmaxParams, KernelFamily, ARGMAX_THREADS};

planned_launcher! {
    /// The argmax of each logits row; zero rows launch nothing.
    argmax(ArgmaxScalars, ArgmaxArgs) = plan; emulated argmax_emulated
}

/// Plans a kernel of csrc/sampling.cu (`argmax`, `sample`: `family`, compiled once, named as the
/// op) as one block of `threads` per logits row: the counts and `rows * vocab` below 2^31, at least
/// one logit per row; zero rows launch nothing.
pub(super) fn one_block_per_row<P>(
    c: &Check,
    s: &ArgmaxScalars,
    params: P,
    (family, threads): (KernelFamily, u32),
) -> Planned<P, 1> {
    c.count("rows", s.rows as usize)?;
    c.count("vocab", s.vocab as usize)?;
    c.at_least("vocab", s.vocab as usize, 1)?;
    c.product("rows * vocab", &[s.rows as usize, s.vocab as usize])?;
    let variant = c.variant(family, c.op, &[])?;
    Ok(unless_empty(
        s.rows,
        params,
        [Grid::linear(variant, s.rows, threads)],
    ))
}

fn plan(s: &ArgmaxScalars, a: &ArgmaxArgs<'_>) -> Planned<ArgmaxParams, 1> {
    let c = Check::new("argmax");
    let params = a.params(c.op, s)?;
    one_block_per_row(&c, s, params, (KernelFamily::Argmax, ARGMAX_THREADS))
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
