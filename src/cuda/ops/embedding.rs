//! `embedding` (csrc/embedding.cu): `out[t, :] = table[ids[t], :]` for `[tokens]` ids into a
//! `[vocab, hidden]` bf16 table, out `[tokens, hidden]` bf16 or f32 (the view's type picks the
//! variant); an id >= vocab gives a row of zeros (validate ids on the host). Also gathers rows of
//! any bf16 matrix (the LM head's input rows).

use crate::cuda::args::{EmbeddingArgs, EmbeddingScalars};
use crate::cuda::checks::Check;
use crate::cuda::launch::{planned_launcher, unless_empty, Grid, Planned};
use crate::cuda::params::{EmbeddingParams, KernelFamily, EMBEDDING_THREADS};

planned_launcher! {
    /// Gathers the table rows of `ids` into `out`; zero tokens launch nothing.
    embedding(EmbeddingScalars, EmbeddingArgs) = plan; emulated embedding_emulated
}

fn plan(s: &EmbeddingScalars, a: &EmbeddingArgs<'_>) -> Planned<EmbeddingParams, 1> {
    let c = Check::new("embedding");
    let params = a.params(c.op, s)?;
    for (what, value) in [
        ("tokens", s.tokens),
        ("hidden", s.hidden),
        ("vocab", s.vocab),
    ] {
        c.count(what, value as usize)?;
    }
    c.product("vocab * hidden", &[s.vocab as usize, s.hidden as usize])?;
    c.product("tokens * hidden", &[s.tokens as usize, s.hidden as usize])?;
    let variant = c.variant(
        KernelFamily::Embedding,
        "out_f32",
        &[u32::from(a.out.is_f32())],
    )?;
    Ok(unless_empty(
        s.tokens,
        params,
        [Grid::linear(variant, s.tokens, EMBEDDING_THREADS)],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::ops::fake::{any_view_mut, too_small, view};

    fn args(ids: usize, table: usize, out: usize, f32_out: bool) -> EmbeddingArgs<'static> {
        EmbeddingArgs {
            ids: view(ids),
            table: view(table),
            out: any_view_mut(out, f32_out),
        }
    }

    #[test]
    fn checks_every_buffer_and_picks_the_output_type() {
        let s = EmbeddingScalars {
            tokens: 5,
            hidden: 24,
            vocab: 100,
        };
        let (params, [grid]) = plan(&s, &args(5, 2400, 120, true)).unwrap().unwrap();
        assert_eq!(grid.symbol(), "embedding_f32");
        assert_eq!(grid.grid, (5, 1, 1));
        assert_eq!((params.tokens, params.hidden, params.vocab), (5, 24, 100));
        let (_, [grid]) = plan(&s, &args(5, 2400, 120, false)).unwrap().unwrap();
        assert_eq!(grid.symbol(), "embedding_bf16");
        too_small(plan(&s, &args(4, 2400, 120, false)), "ids");
        too_small(plan(&s, &args(5, 2399, 120, false)), "table");
        too_small(plan(&s, &args(5, 2400, 119, false)), "out");
        let empty = EmbeddingScalars { tokens: 0, ..s };
        assert!(plan(&empty, &args(0, 2400, 0, false)).unwrap().is_none());
    }
}
