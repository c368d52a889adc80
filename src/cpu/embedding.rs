//! Token embedding lookup: `out[t, :] = table[ids[t], :]` as f32, for `ids: [tokens]`,
//! `table: [vocab, hidden]`, `out: [tokens, hidden]`.

use crate::dtype::WeightSlice;

/// Copies the embedding row of each id into `out`, converted to f32.
///
/// Shapes: `ids: [tokens]`, `table: [vocab, hidden]`, `out: [tokens, hidden]`.
///
/// # Panics
/// When `hidden == 0`, the lengths do not match those shapes, or an id is not below
/// `table.len() / hidden` (callers validate ids first).
pub fn embed(ids: &[u32], table: WeightSlice<'_>, hidden: usize, out: &mut [f32]) {
    assert!(hidden > 0, "embed: hidden must be positive");
    assert_eq!(
        table.len() % hidden,
        0,
        "embed: table is not [vocab, {hidden}]"
    );
    assert_eq!(
        out.len(),
        ids.len() * hidden,
        "embed: out is not [tokens, {hidden}]"
    );
    let vocab = table.len() / hidden;
    for (&id, row) in ids.iter().zip(out.chunks_exact_mut(hidden)) {
        let id = id as usize;
        assert!(id < vocab, "embed: token id {id} not below vocab {vocab}");
        table.slice(id * hidden..(id + 1) * hidden).to_f32_into(row);
    }
}
