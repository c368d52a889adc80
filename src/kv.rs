//! Paged KV-cache bookkeeping shared by every backend: a pool of fixed-size blocks and a block table
//! per sequence. Storage of the blocks themselves belongs to the backend.
//!
//! STUB: interface only; implementation pending.
