//! Embedding gather: `out[t, :] = table[ids[t], :]` as f32; `table`: `[vocab, hidden]`.

use crate::dtype::WeightSlice;

/// Gathers rows of `table` (`[vocab, hidden]`) for `ids` into `out` (`[ids.len(), hidden]`).
/// Ids must already be checked against the vocabulary.
pub fn embed(table: WeightSlice<'_>, hidden: usize, ids: &[u32], out: &mut [f32]) {
    assert_eq!(
        out.len(),
        ids.len() * hidden,
        "embed: out is not [tokens, hidden]"
    );
    for (&id, row) in ids.iter().zip(out.chunks_mut(hidden)) {
        let start = id as usize * hidden;
        table.slice(start..start + hidden).to_f32_into(row);
    }
}
