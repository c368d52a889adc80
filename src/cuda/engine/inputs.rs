//! Host-side planning of one engine step (no device calls, tested on the CPU): which kind of
//! forward pass runs, the per-token inputs uploaded to the device (`ids`, `positions`, `token_seq`
//! = block-table row), the token rows whose logits are read back, and the split of large steps into
//! chunks that fit the plan's buffers.
//!
//! A step whose entries each add one token, at most the largest decode bucket of them, is a
//! **decode** step: it runs as the captured graph of the smallest bucket holding it, the unused
//! tokens padded with block-table row -1 (the kernels skip such tokens: no cache write, no keys).
//! Any other step is a **prefill** step, run eagerly in chunks of at most `max_tokens` tokens; an
//! entry longer than a chunk is split at chunk boundaries, its later pieces attending to the keys
//! its earlier pieces wrote.

use crate::kv::StepPlan;

/// Token row index meaning "no sequence": the kernels skip tokens of this row.
pub const NO_SEQUENCE: i32 = -1;

/// One entry's piece inside a prefill chunk: tokens at consecutive positions of one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefillPiece {
    /// First token of the piece inside the chunk's token list.
    pub token_offset: usize,
    /// Tokens in the piece.
    pub len: usize,
    /// Absolute position of the piece's first token.
    pub start_pos: usize,
    /// Block-table row of the sequence.
    pub seq_row: usize,
}

/// How a chunk runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkKind {
    /// One token per sequence, replayed from the graph captured for `bucket` tokens.
    Decode {
        /// Captured batch size (>= the chunk's real tokens).
        bucket: usize,
    },
    /// Eager launches; attention runs once per piece.
    Prefill {
        /// The pieces, in token order.
        pieces: Vec<PrefillPiece>,
    },
}

/// One forward pass over at most `max_tokens` tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// How it runs.
    pub kind: ChunkKind,
    /// Token ids, padded to the bucket for decode chunks.
    pub ids: Vec<u32>,
    /// Absolute positions (same length as `ids`).
    pub positions: Vec<i32>,
    /// Block-table row per token ([`NO_SEQUENCE`] for padding).
    pub token_seq: Vec<i32>,
    /// Indices (into this chunk's tokens) of the rows whose logits are read back, in output order.
    pub logit_rows: Vec<u32>,
}

impl Chunk {
    /// A decode chunk of `bucket` padding tokens (no sequence: nothing is written to the cache).
    pub fn padding(bucket: usize) -> Chunk {
        Chunk {
            kind: ChunkKind::Decode { bucket },
            ids: vec![0; bucket],
            positions: vec![0; bucket],
            token_seq: vec![NO_SEQUENCE; bucket],
            logit_rows: Vec::new(),
        }
    }

    /// Tokens the forward pass processes (padding included).
    pub fn tokens(&self) -> usize {
        self.ids.len()
    }
}

/// The chunks of one step, with `(batch index, position)` for every logits row in output order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepSchedule {
    /// Forward passes, run in order.
    pub chunks: Vec<Chunk>,
    /// Metadata of the logits rows, in the order the chunks produce them.
    pub rows: Vec<(usize, usize)>,
}

/// Plans an applied step. `tokens` are the step's token ids flattened in batch order, `seq_rows[i]`
/// the block-table row of entry `i`, `buckets` the captured decode batch sizes (ascending; empty =
/// no graphs), `max_tokens` the most tokens one forward pass holds (>= 1).
pub fn schedule_step(
    plan: &StepPlan,
    tokens: &[u32],
    seq_rows: &[usize],
    buckets: &[usize],
    max_tokens: usize,
) -> StepSchedule {
    let max_tokens = max_tokens.max(1);
    let is_decode = plan.entries.iter().all(|e| e.len == 1);
    let bucket = buckets
        .iter()
        .copied()
        .find(|&b| b >= plan.entries.len() && b <= max_tokens);
    if let (true, Some(bucket)) = (is_decode, bucket) {
        return decode_schedule(plan, tokens, seq_rows, bucket);
    }
    prefill_schedule(plan, tokens, seq_rows, max_tokens)
}

fn decode_schedule(
    plan: &StepPlan,
    tokens: &[u32],
    seq_rows: &[usize],
    bucket: usize,
) -> StepSchedule {
    let mut chunk = Chunk::padding(bucket);
    let mut rows = Vec::new();
    for (i, e) in plan.entries.iter().enumerate() {
        chunk.ids[i] = tokens[e.token_offset];
        chunk.positions[i] = e.start_pos as i32;
        chunk.token_seq[i] = seq_rows[i] as i32;
        if !e.logit_rows().is_empty() {
            chunk.logit_rows.push(i as u32);
            rows.push((i, e.start_pos));
        }
    }
    StepSchedule {
        chunks: vec![chunk],
        rows,
    }
}

fn prefill_schedule(
    plan: &StepPlan,
    tokens: &[u32],
    seq_rows: &[usize],
    max_tokens: usize,
) -> StepSchedule {
    let mut chunks = Vec::new();
    let mut rows = Vec::new();
    let mut current = empty_prefill();
    let mut pieces: Vec<PrefillPiece> = Vec::new();
    for (i, e) in plan.entries.iter().enumerate() {
        let wanted = e.logit_rows();
        let mut done = 0;
        while done < e.len {
            if current.ids.len() == max_tokens {
                current.kind = ChunkKind::Prefill {
                    pieces: std::mem::take(&mut pieces),
                };
                chunks.push(std::mem::replace(&mut current, empty_prefill()));
            }
            let take = (e.len - done).min(max_tokens - current.ids.len());
            let token_offset = current.ids.len();
            pieces.push(PrefillPiece {
                token_offset,
                len: take,
                start_pos: e.start_pos + done,
                seq_row: seq_rows[i],
            });
            for j in done..done + take {
                current.ids.push(tokens[e.token_offset + j]);
                current.positions.push((e.start_pos + j) as i32);
                current.token_seq.push(seq_rows[i] as i32);
                if wanted.contains(&j) {
                    current.logit_rows.push((token_offset + j - done) as u32);
                    rows.push((i, e.start_pos + j));
                }
            }
            done += take;
        }
    }
    if !current.ids.is_empty() {
        current.kind = ChunkKind::Prefill { pieces };
        chunks.push(current);
    }
    StepSchedule { chunks, rows }
}

fn empty_prefill() -> Chunk {
    Chunk {
        kind: ChunkKind::Prefill { pieces: Vec::new() },
        ids: Vec::new(),
        positions: Vec::new(),
        token_seq: Vec::new(),
        logit_rows: Vec::new(),
    }
}

/// The decode batch sizes to capture: powers of two up to `max_batch` (and `max_batch` itself), none
/// above `max_tokens`.
pub fn decode_buckets(max_batch: usize, max_tokens: usize) -> Vec<usize> {
    let limit = max_batch.min(max_tokens);
    let mut buckets = Vec::new();
    let mut b = 1;
    while b < limit {
        buckets.push(b);
        b *= 2;
    }
    if limit >= 1 {
        buckets.push(limit);
    }
    buckets
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{LogitsFor, SeqId};
    use crate::kv::StepEntry;

    fn plan(entries: &[(usize, usize, LogitsFor)]) -> StepPlan {
        let mut offset = 0;
        let entries = entries
            .iter()
            .enumerate()
            .map(|(i, &(start_pos, len, logits))| {
                let e = StepEntry {
                    seq: SeqId(i as u64),
                    start_pos,
                    len,
                    token_offset: offset,
                    logits,
                };
                offset += len;
                e
            })
            .collect();
        StepPlan {
            entries,
            total_tokens: offset,
        }
    }

    fn ids(n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| 100 + 7 * i).collect()
    }

    /// Three entries of one token each, at positions 5, 9 and 2, the second wanting no logits: a
    /// decode step wherever a bucket holds three tokens.
    fn three_single_tokens() -> StepPlan {
        plan(&[
            (5, 1, LogitsFor::Last),
            (9, 1, LogitsFor::None),
            (2, 1, LogitsFor::All),
        ])
    }

    #[test]
    fn buckets_are_powers_of_two_then_the_limit() {
        assert_eq!(decode_buckets(8, 512), vec![1, 2, 4, 8]);
        assert_eq!(decode_buckets(12, 512), vec![1, 2, 4, 8, 12]);
        assert_eq!(decode_buckets(64, 16), vec![1, 2, 4, 8, 16]);
        assert_eq!(decode_buckets(1, 512), vec![1]);
    }

    #[test]
    fn decode_step_pads_to_the_smallest_bucket() {
        let s = schedule_step(
            &three_single_tokens(),
            &ids(3),
            &[4, 0, 7],
            &[1, 2, 4, 8],
            512,
        );
        assert_eq!(s.chunks.len(), 1);
        let c = &s.chunks[0];
        assert_eq!(c.kind, ChunkKind::Decode { bucket: 4 });
        assert_eq!(c.ids, vec![100, 107, 114, 0]);
        assert_eq!(c.positions, vec![5, 9, 2, 0]);
        assert_eq!(c.token_seq, vec![4, 0, 7, NO_SEQUENCE]);
        assert_eq!(c.logit_rows, vec![0, 2]);
        assert_eq!(s.rows, vec![(0, 5), (2, 2)]);
    }

    #[test]
    fn a_batch_above_every_bucket_runs_eagerly() {
        let s = schedule_step(&three_single_tokens(), &ids(3), &[4, 0, 7], &[1, 2], 512);
        assert!(matches!(s.chunks[0].kind, ChunkKind::Prefill { .. }));
        assert_eq!(s.chunks[0].tokens(), 3);
        assert_eq!(s.chunks[0].positions, vec![5, 9, 2]);
        assert_eq!(s.rows, vec![(0, 5), (2, 2)]);
    }

    #[test]
    fn prefill_splits_long_entries_across_chunks() {
        // Entry 0: 5 tokens from position 2, all logits; entry 1: 4 tokens from 0, last logits.
        let p = plan(&[(2, 5, LogitsFor::All), (0, 4, LogitsFor::Last)]);
        let s = schedule_step(&p, &ids(9), &[3, 1], &[1, 2, 4], 4);
        assert_eq!(s.chunks.len(), 3);
        let lens: Vec<usize> = s.chunks.iter().map(Chunk::tokens).collect();
        assert_eq!(lens, vec![4, 4, 1]);
        // Every token appears once, in order, with its position and row.
        let all_ids: Vec<u32> = s.chunks.iter().flat_map(|c| c.ids.clone()).collect();
        assert_eq!(all_ids, ids(9));
        let all_pos: Vec<i32> = s.chunks.iter().flat_map(|c| c.positions.clone()).collect();
        assert_eq!(all_pos, vec![2, 3, 4, 5, 6, 0, 1, 2, 3]);
        let all_rows: Vec<i32> = s.chunks.iter().flat_map(|c| c.token_seq.clone()).collect();
        assert_eq!(all_rows, vec![3, 3, 3, 3, 3, 1, 1, 1, 1]);
        // Pieces: chunk 1 holds the tail of entry 0 and the head of entry 1.
        let ChunkKind::Prefill { pieces } = &s.chunks[1].kind else {
            panic!("prefill expected")
        };
        assert_eq!(
            pieces,
            &vec![
                PrefillPiece {
                    token_offset: 0,
                    len: 1,
                    start_pos: 6,
                    seq_row: 3
                },
                PrefillPiece {
                    token_offset: 1,
                    len: 3,
                    start_pos: 0,
                    seq_row: 1
                },
            ]
        );
        // Logits: all five of entry 0, then the last of entry 1 (in chunk 2, row 0).
        assert_eq!(s.rows, vec![(0, 2), (0, 3), (0, 4), (0, 5), (0, 6), (1, 3)]);
        assert_eq!(s.chunks[0].logit_rows, vec![0, 1, 2, 3]);
        assert_eq!(s.chunks[1].logit_rows, vec![0]);
        assert_eq!(s.chunks[2].logit_rows, vec![0]);
    }

    #[test]
    fn every_piece_lies_inside_its_chunk_and_covers_it() {
        for max_tokens in 1..=7 {
            let p = plan(&[
                (0, 6, LogitsFor::None),
                (4, 1, LogitsFor::Last),
                (1, 9, LogitsFor::All),
            ]);
            let s = schedule_step(&p, &ids(16), &[0, 1, 2], &[], max_tokens);
            let mut total = 0;
            for c in &s.chunks {
                assert!(c.tokens() <= max_tokens);
                let ChunkKind::Prefill { pieces } = &c.kind else {
                    panic!("no buckets: every chunk is prefill")
                };
                let mut next = 0;
                for piece in pieces {
                    assert_eq!(piece.token_offset, next);
                    for t in 0..piece.len {
                        assert_eq!(
                            c.positions[piece.token_offset + t] as usize,
                            piece.start_pos + t
                        );
                        assert_eq!(c.token_seq[piece.token_offset + t] as usize, piece.seq_row);
                    }
                    next += piece.len;
                }
                assert_eq!(next, c.tokens());
                total += c.tokens();
            }
            assert_eq!(total, 16);
            assert_eq!(s.rows.len(), 1 + 9);
        }
    }
}
