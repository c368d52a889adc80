//! [`PagedKv::check_invariants`]: recounts what the pool's bookkeeping must agree on, for tests
//! and debugging after any sequence of operations.

use super::{PagedKv, RELEASED};
use std::collections::HashSet;

impl PagedKv {
    /// Checks every invariant of the pool and returns the first one broken, in words:
    /// - each sequence's table has `ceil(len / block_size)` entries, its first `released` ones
    ///   [`RELEASED`] and the others handed-out ids; it holds `len` tokens and at most
    ///   `len / block_size` names;
    /// - each block's reference count equals the number of tables holding it;
    /// - a block with no reference is exactly one of: recycled (unnamed), parked in the cache
    ///   (named) or never handed out; a referenced block is none of these;
    /// - each name of the cache index belongs to the block that carries it;
    /// - used blocks plus free blocks equal the pool.
    pub fn check_invariants(&self) -> Result<(), String> {
        let bs = self.limits.block_size;
        let mut counted = vec![0usize; self.fresh];
        for (id, s) in &self.seqs {
            if s.blocks.len() != s.len.div_ceil(bs) {
                return Err(format!(
                    "{id:?} holds {} tokens in {} table entries",
                    s.len,
                    s.blocks.len()
                ));
            }
            if s.tokens.len() != s.len || s.names.len() > s.len / bs {
                return Err(format!(
                    "{id:?} holds {} tokens but records {} tokens and {} names",
                    s.len,
                    s.tokens.len(),
                    s.names.len()
                ));
            }
            for (i, &b) in s.blocks.iter().enumerate() {
                match (i < s.released, b == RELEASED) {
                    (true, true) => continue,
                    (false, false) => {}
                    _ => return Err(format!("{id:?} entry {i} ({b}) vs released {}", s.released)),
                }
                let Some(c) = counted.get_mut(b) else {
                    return Err(format!("{id:?} holds block {b}, never handed out"));
                };
                *c += 1;
            }
        }
        let recycled: HashSet<usize> = self.recycled.iter().copied().collect();
        if recycled.len() != self.recycled.len() {
            return Err("a block is recycled twice".into());
        }
        let mut used = 0;
        for (b, (&c, info)) in counted.iter().zip(&self.info).enumerate() {
            if c != info.refs {
                return Err(format!(
                    "block {b}: {} references recorded, {c} held",
                    info.refs
                ));
            }
            let parked = self.cache.is_parked(b);
            let free_states = [recycled.contains(&b), parked];
            let free_count = free_states.iter().filter(|&&x| x).count();
            match (c, free_count) {
                (0, 1) => {}
                (0, _) => return Err(format!("free block {b} is in {free_count} free lists")),
                (_, 0) => used += 1,
                _ => return Err(format!("block {b} has {c} references but is free")),
            }
            if recycled.contains(&b) && info.name.is_some() {
                return Err(format!("recycled block {b} has a name"));
            }
            if parked && info.name.is_none() {
                return Err(format!("parked block {b} has no name"));
            }
        }
        if self.info.len() != self.fresh {
            return Err(format!(
                "{} block records for {} ids",
                self.info.len(),
                self.fresh
            ));
        }
        for (name, b) in self.cache.names() {
            if self.info.get(b).and_then(|i| i.name) != Some(name) {
                return Err(format!(
                    "the cache names block {b} {name:x}, the block disagrees"
                ));
            }
        }
        let named = self.info.iter().filter(|i| i.name.is_some()).count();
        if named != self.cache.len() {
            return Err(format!(
                "{named} named blocks, {} in the index",
                self.cache.len()
            ));
        }
        if used + self.free_blocks() != self.limits.num_blocks {
            return Err(format!(
                "{used} used + {} free != {} blocks",
                self.free_blocks(),
                self.limits.num_blocks
            ));
        }
        Ok(())
    }
}
