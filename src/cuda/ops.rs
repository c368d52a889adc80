//! One safe launcher per kernel family in `csrc/`. Each takes the shapes (a plain `*Shape` struct a
//! static plan can keep) and the device buffers (a `*Buffers` struct of cudarc slices or views),
//! checks every buffer's length (and 16-byte alignment where the kernel uses vector loads) against
//! what the kernel will touch for those shapes, picks the compiled instantiation and the grid, and
//! launches on the given stream. Nothing is allocated on the device and nothing synchronises, so the
//! calls can be captured into a CUDA graph. A shape with zero tokens / rows launches nothing.
//!
//! Layouts (row-major): activations `[tokens, hidden]` bf16, residual stream `[tokens, hidden]` f32,
//! weights `[out, in]` bf16, paged KV cache `[num_blocks, block_size, n_kv_heads, head_dim]` bf16 per
//! layer, block tables `[num_seqs, max_blocks_per_seq]` i32. The exact semantics of each kernel are in
//! the header comment of its `csrc/*.cu` file and on its parameter struct in [`params`](super::params).

use cudarc::driver::{
    CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg, SyncOnDrop,
};
use half::bf16;

use super::error::CudaError;
use super::module::Kernels;
use super::params::{
    AttentionDecodeParams, KernelFamily, KernelVariant, RopeKvParams, ATTENTION_COMBINE_THREADS,
    ATTENTION_MAX_SPLIT_KEYS, ATTENTION_THREADS, KERNEL_VARIANTS, ROPE_KV_THREADS,
};

/// Largest count (and product of counts) the kernels index with 32-bit integers.
const MAX_INDEX: usize = i32::MAX as usize;
/// Largest grid y / z dimension.
const MAX_GRID_YZ: usize = 65_535;
/// Static plus dynamic shared memory available without opting in to more.
const DEFAULT_SHARED_BYTES: usize = 48 * 1024;

// ---------------------------------------------------------------------------------------------
// Shared plumbing

/// A device buffer as the checks see it: its address and its length in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Buf {
    address: u64,
    len: usize,
}

fn read<'a, T>(buffer: &'a dyn DevicePtr<T>, stream: &'a CudaStream) -> (Buf, SyncOnDrop<'a>) {
    let len = buffer.len();
    let (address, guard) = buffer.device_ptr(stream);
    (Buf { address, len }, guard)
}

fn write<'a, T>(
    buffer: &'a mut dyn DevicePtrMut<T>,
    stream: &'a CudaStream,
) -> (Buf, SyncOnDrop<'a>) {
    let len = buffer.len();
    let (address, guard) = buffer.device_ptr_mut(stream);
    (Buf { address, len }, guard)
}

/// A checked launch: the instantiation (index into [`KERNEL_VARIANTS`]), geometry and parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Launch<P> {
    variant: usize,
    grid: (u32, u32, u32),
    block: u32,
    shared_bytes: u32,
    params: P,
}

fn launch<P: DeviceRepr>(
    kernels: &Kernels,
    stream: &CudaStream,
    plan: &Launch<P>,
) -> Result<(), CudaError> {
    let variant: &'static KernelVariant = &KERNEL_VARIANTS[plan.variant];
    let function = kernels
        .function(plan.variant)
        .ok_or(CudaError::MissingKernel {
            symbol: variant.symbol,
            module: variant.module,
        })?;
    let config = LaunchConfig {
        grid_dim: plan.grid,
        block_dim: (plan.block, 1, 1),
        shared_mem_bytes: plan.shared_bytes,
    };
    let mut builder = stream.launch_builder(function);
    builder.arg(&plan.params);
    // SAFETY: the function takes exactly one argument, the `#[repr(C)]` struct `P` whose layout is
    // asserted equal to the C definition (params.rs / params.h). Every pointer in it comes from a
    // live cudarc buffer whose guard outlives this call, and the planner checked that each buffer
    // covers every element (and alignment) the kernel touches for the shapes in `params`; the
    // geometry and shared memory are the ones the kernel was written for.
    unsafe { builder.launch(config) }.map_err(|source| CudaError::Launch {
        symbol: variant.symbol,
        source,
    })?;
    Ok(())
}

/// Checks against one op's name.
struct Check {
    op: &'static str,
}

impl Check {
    fn len(&self, buffer: &'static str, buf: Buf, expected: usize) -> Result<(), CudaError> {
        if buf.len < expected {
            return Err(CudaError::BufferTooSmall {
                op: self.op,
                buffer,
                expected,
                actual: buf.len,
            });
        }
        Ok(())
    }

    fn aligned16(&self, buffer: &'static str, buf: Buf) -> Result<(), CudaError> {
        if !buf.address.is_multiple_of(16) {
            return Err(CudaError::Misaligned {
                op: self.op,
                buffer,
                address: buf.address,
            });
        }
        Ok(())
    }

    fn unsupported(
        &self,
        what: &'static str,
        value: usize,
        reason: impl Into<String>,
    ) -> CudaError {
        CudaError::Unsupported {
            op: self.op,
            what,
            value,
            reason: reason.into(),
        }
    }

    /// `value` as the kernels' 32-bit count (below 2^31).
    fn count(&self, what: &'static str, value: usize) -> Result<u32, CudaError> {
        if value > MAX_INDEX {
            return Err(self.unsupported(what, value, "must be below 2^31"));
        }
        Ok(value as u32)
    }

    fn at_least(&self, what: &'static str, value: usize, min: usize) -> Result<(), CudaError> {
        if value < min {
            return Err(self.unsupported(what, value, format!("must be at least {min}")));
        }
        Ok(())
    }

    fn multiple_of_8(&self, what: &'static str, value: usize) -> Result<(), CudaError> {
        if value == 0 || !value.is_multiple_of(8) {
            return Err(self.unsupported(
                what,
                value,
                "must be a positive multiple of 8 (16-byte vector loads)",
            ));
        }
        Ok(())
    }

    fn grid_yz(&self, what: &'static str, value: usize) -> Result<u32, CudaError> {
        if value > MAX_GRID_YZ {
            return Err(self.unsupported(
                what,
                value,
                format!("must be at most {MAX_GRID_YZ} (a grid dimension)"),
            ));
        }
        Ok(value as u32)
    }

    /// Product of counts, which must stay a valid 32-bit index.
    fn product(&self, what: &'static str, factors: &[usize]) -> Result<usize, CudaError> {
        let mut total: usize = 1;
        for &f in factors {
            total = total
                .checked_mul(f)
                .ok_or_else(|| self.unsupported(what, usize::MAX, "overflows"))?;
        }
        if total > MAX_INDEX {
            return Err(self.unsupported(what, total, "must be below 2^31"));
        }
        Ok(total)
    }

    /// Elements of a `[rows, width]` buffer whose rows are `stride` apart.
    fn strided(
        &self,
        what: &'static str,
        rows: usize,
        stride: usize,
        width: usize,
    ) -> Result<usize, CudaError> {
        if stride < width {
            return Err(self.unsupported(
                what,
                stride,
                format!("row stride must be at least the row width {width}"),
            ));
        }
        if rows == 0 {
            return Ok(0);
        }
        self.product(what, &[rows - 1, stride])?
            .checked_add(width)
            .ok_or_else(|| self.unsupported(what, usize::MAX, "overflows"))
    }

    /// The compiled instantiation of `family` for `consts`.
    fn variant(
        &self,
        family: KernelFamily,
        what: &'static str,
        consts: &[u32],
    ) -> Result<usize, CudaError> {
        if let Some(index) = KERNEL_VARIANTS
            .iter()
            .position(|v| v.family == family && v.consts == consts)
        {
            return Ok(index);
        }
        let compiled: Vec<String> = KERNEL_VARIANTS
            .iter()
            .filter(|v| v.family == family)
            .map(|v| format!("{:?}", v.consts))
            .collect();
        let value = consts.first().map_or(0, |&c| c as usize);
        Err(self.unsupported(
            what,
            value,
            format!(
                "no compiled {} kernel for {:?} = {consts:?}; compiled: {}",
                family.name(),
                family.axes(),
                compiled.join(", ")
            ),
        ))
    }
}

/// Shape of a layer's paged KV cache and the block tables indexing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedCacheShape {
    /// Blocks in the cache (`k_cache` / `v_cache` hold `num_blocks * block_size` token rows).
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Rows of the block tables.
    pub num_seqs: usize,
    /// Columns of the block tables: the most blocks one sequence can hold.
    pub max_blocks_per_seq: usize,
}

impl PagedCacheShape {
    fn check(
        &self,
        c: &Check,
        n_kv_heads: usize,
        head_dim: usize,
        k: Buf,
        v: Buf,
        tables: Buf,
    ) -> Result<(), CudaError> {
        c.at_least("block_size", self.block_size, 1)?;
        c.count("num_blocks", self.num_blocks)?;
        c.count("num_seqs", self.num_seqs)?;
        c.count("max_blocks_per_seq", self.max_blocks_per_seq)?;
        c.product(
            "max_blocks_per_seq * block_size",
            &[self.max_blocks_per_seq, self.block_size],
        )?;
        // Cache offsets are computed in 64 bits; only the total must exist.
        let cache = self
            .num_blocks
            .checked_mul(self.block_size)
            .and_then(|n| n.checked_mul(n_kv_heads))
            .and_then(|n| n.checked_mul(head_dim))
            .ok_or_else(|| c.unsupported("cache elements", usize::MAX, "overflows"))?;
        c.len("k_cache", k, cache)?;
        c.len("v_cache", v, cache)?;
        let table = self
            .num_seqs
            .checked_mul(self.max_blocks_per_seq)
            .ok_or_else(|| c.unsupported("block table elements", usize::MAX, "overflows"))?;
        c.len("block_tables", tables, table)
    }
}

// ---------------------------------------------------------------------------------------------
// rope_kv

/// Shapes of [`rope_kv`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RopeKvShape {
    /// Tokens.
    pub tokens: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Head dimension (even).
    pub head_dim: usize,
    /// Elements between consecutive tokens of `q` (>= n_heads * head_dim).
    pub q_stride: usize,
    /// Elements between consecutive tokens of `k` (>= n_kv_heads * head_dim).
    pub k_stride: usize,
    /// Elements between consecutive tokens of `v` (>= n_kv_heads * head_dim).
    pub v_stride: usize,
    /// The cache and block tables.
    pub cache: PagedCacheShape,
}

/// Buffers of [`rope_kv`].
pub struct RopeKvBuffers<'a> {
    /// `[tokens, n_heads, head_dim]` queries (row stride `q_stride`), rotated in place.
    pub q: &'a mut dyn DevicePtrMut<bf16>,
    /// `[tokens, n_kv_heads, head_dim]` new keys (row stride `k_stride`).
    pub k: &'a dyn DevicePtr<bf16>,
    /// `[tokens, n_kv_heads, head_dim]` new values (row stride `v_stride`).
    pub v: &'a dyn DevicePtr<bf16>,
    /// `[num_blocks, block_size, n_kv_heads, head_dim]` key cache of the layer.
    pub k_cache: &'a mut dyn DevicePtrMut<bf16>,
    /// `[num_blocks, block_size, n_kv_heads, head_dim]` value cache of the layer.
    pub v_cache: &'a mut dyn DevicePtrMut<bf16>,
    /// `[num_seqs, max_blocks_per_seq]` block tables.
    pub block_tables: &'a dyn DevicePtr<i32>,
    /// `[tokens]` block-table row of each token.
    pub token_seq: &'a dyn DevicePtr<i32>,
    /// `[tokens]` absolute position of each token.
    pub positions: &'a dyn DevicePtr<i32>,
    /// `[head_dim / 2]` inverse frequencies, the CPU reference's table.
    pub inv_freq: &'a dyn DevicePtr<f32>,
}

struct RopeKvBufs {
    q: Buf,
    k: Buf,
    v: Buf,
    k_cache: Buf,
    v_cache: Buf,
    block_tables: Buf,
    token_seq: Buf,
    positions: Buf,
    inv_freq: Buf,
}

fn plan_rope_kv(
    s: &RopeKvShape,
    b: &RopeKvBufs,
) -> Result<Option<Launch<RopeKvParams>>, CudaError> {
    let c = Check { op: "rope_kv" };
    if s.head_dim < 2 || !s.head_dim.is_multiple_of(2) {
        return Err(c.unsupported("head_dim", s.head_dim, "must be even and at least 2"));
    }
    let half = s.head_dim / 2;
    let shared = half * std::mem::size_of::<[f32; 2]>();
    if shared > DEFAULT_SHARED_BYTES {
        return Err(c.unsupported(
            "head_dim",
            s.head_dim,
            "its cos/sin table must fit 48 KiB of shared memory",
        ));
    }
    let tokens = c.count("tokens", s.tokens)?;
    c.at_least("n_kv_heads", s.n_kv_heads, 1)?;
    c.product("n_heads * head_dim", &[s.n_heads, s.head_dim])?;
    c.product("n_kv_heads * head_dim", &[s.n_kv_heads, s.head_dim])?;
    c.len(
        "q",
        b.q,
        c.strided("q_stride", s.tokens, s.q_stride, s.n_heads * s.head_dim)?,
    )?;
    c.len(
        "k",
        b.k,
        c.strided("k_stride", s.tokens, s.k_stride, s.n_kv_heads * s.head_dim)?,
    )?;
    c.len(
        "v",
        b.v,
        c.strided("v_stride", s.tokens, s.v_stride, s.n_kv_heads * s.head_dim)?,
    )?;
    s.cache.check(
        &c,
        s.n_kv_heads,
        s.head_dim,
        b.k_cache,
        b.v_cache,
        b.block_tables,
    )?;
    c.len("token_seq", b.token_seq, s.tokens)?;
    c.len("positions", b.positions, s.tokens)?;
    c.len("inv_freq", b.inv_freq, half)?;
    let variant = c.variant(KernelFamily::RopeKv, "rope_kv", &[])?;
    if s.tokens == 0 {
        return Ok(None);
    }
    Ok(Some(Launch {
        variant,
        grid: (tokens, 1, 1),
        block: ROPE_KV_THREADS,
        shared_bytes: shared as u32,
        params: RopeKvParams {
            q: b.q.address,
            k: b.k.address,
            v: b.v.address,
            k_cache: b.k_cache.address,
            v_cache: b.v_cache.address,
            block_tables: b.block_tables.address,
            token_seq: b.token_seq.address,
            positions: b.positions.address,
            inv_freq: b.inv_freq.address,
            tokens,
            n_heads: c.count("n_heads", s.n_heads)?,
            n_kv_heads: c.count("n_kv_heads", s.n_kv_heads)?,
            head_dim: c.count("head_dim", s.head_dim)?,
            q_stride: c.count("q_stride", s.q_stride)?,
            k_stride: c.count("k_stride", s.k_stride)?,
            v_stride: c.count("v_stride", s.v_stride)?,
            block_size: c.count("block_size", s.cache.block_size)?,
            max_blocks_per_seq: c.count("max_blocks_per_seq", s.cache.max_blocks_per_seq)?,
            num_blocks: c.count("num_blocks", s.cache.num_blocks)?,
            num_seqs: c.count("num_seqs", s.cache.num_seqs)?,
        },
    }))
}

/// RoPE on q (in place) and k, and k/v appended to the paged cache at each token's position.
pub fn rope_kv(
    kernels: &Kernels,
    stream: &CudaStream,
    shape: &RopeKvShape,
    b: RopeKvBuffers<'_>,
) -> Result<(), CudaError> {
    let (q, _q) = write(b.q, stream);
    let (k, _k) = read(b.k, stream);
    let (v, _v) = read(b.v, stream);
    let (k_cache, _k_cache) = write(b.k_cache, stream);
    let (v_cache, _v_cache) = write(b.v_cache, stream);
    let (block_tables, _block_tables) = read(b.block_tables, stream);
    let (token_seq, _token_seq) = read(b.token_seq, stream);
    let (positions, _positions) = read(b.positions, stream);
    let (inv_freq, _inv_freq) = read(b.inv_freq, stream);
    let bufs = RopeKvBufs {
        q,
        k,
        v,
        k_cache,
        v_cache,
        block_tables,
        token_seq,
        positions,
        inv_freq,
    };
    match plan_rope_kv(shape, &bufs)? {
        Some(plan) => launch(kernels, stream, &plan),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// qmoe shapes (the bf16 expert ops take `MoeScalars`)

/// Shapes of [`qmoe_gemv`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeShape {
    /// Tokens.
    pub tokens: usize,
    /// Hidden size (a multiple of 8).
    pub hidden: usize,
    /// Expert intermediate size (a multiple of 8).
    pub inter: usize,
    /// Experts.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
}

// ---------------------------------------------------------------------------------------------
// attention_decode

/// Shapes of [`attention_decode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionDecodeShape {
    /// Query tokens (at most 65535).
    pub tokens: usize,
    /// Query heads (a multiple of `n_kv_heads`).
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Head dimension (a compiled value: 16, 32, 64 or 128).
    pub head_dim: usize,
    /// Elements between consecutive tokens of `q` (>= n_heads * head_dim).
    pub q_stride: usize,
    /// The cache and block tables.
    pub cache: PagedCacheShape,
    /// Sliding window W (keys per query, itself included); `None` = full causal attention.
    pub window: Option<usize>,
    /// Keys per split (1..=ATTENTION_MAX_SPLIT_KEYS).
    pub split_keys: usize,
    /// Splits allocated per (token, head); `split_keys * max_splits` must cover
    /// `max_blocks_per_seq * block_size` keys ([`attention_splits`] gives the least).
    pub max_splits: usize,
}

/// The fewest splits of `split_keys` keys covering a sequence of `max_keys` keys.
pub fn attention_splits(max_keys: usize, split_keys: usize) -> usize {
    max_keys.div_ceil(split_keys.max(1)).max(1)
}

/// Buffers of [`attention_decode`].
pub struct AttentionDecodeBuffers<'a> {
    /// `[tokens, n_heads, head_dim]` rotated queries (row stride `q_stride`).
    pub q: &'a dyn DevicePtr<bf16>,
    /// `[num_blocks, block_size, n_kv_heads, head_dim]` key cache (16-byte aligned).
    pub k_cache: &'a dyn DevicePtr<bf16>,
    /// `[num_blocks, block_size, n_kv_heads, head_dim]` value cache (16-byte aligned).
    pub v_cache: &'a dyn DevicePtr<bf16>,
    /// `[num_seqs, max_blocks_per_seq]` block tables.
    pub block_tables: &'a dyn DevicePtr<i32>,
    /// `[tokens]` block-table row of each query token.
    pub token_seq: &'a dyn DevicePtr<i32>,
    /// `[tokens]` absolute position of each query token.
    pub positions: &'a dyn DevicePtr<i32>,
    /// `[tokens, n_heads, head_dim]` output.
    pub out: &'a mut dyn DevicePtrMut<bf16>,
    /// `[tokens, n_heads, max_splits, head_dim]` scratch.
    pub part_out: &'a mut dyn DevicePtrMut<f32>,
    /// `[tokens, n_heads, max_splits]` scratch.
    pub part_lse: &'a mut dyn DevicePtrMut<f32>,
}

struct AttentionBufs {
    q: Buf,
    k_cache: Buf,
    v_cache: Buf,
    block_tables: Buf,
    token_seq: Buf,
    positions: Buf,
    out: Buf,
    part_out: Buf,
    part_lse: Buf,
}

fn plan_attention(
    s: &AttentionDecodeShape,
    b: &AttentionBufs,
) -> Result<Option<[Launch<AttentionDecodeParams>; 2]>, CudaError> {
    let c = Check {
        op: "attention_decode",
    };
    c.at_least("n_kv_heads", s.n_kv_heads, 1)?;
    if s.n_heads == 0 || !s.n_heads.is_multiple_of(s.n_kv_heads) {
        return Err(c.unsupported(
            "n_heads",
            s.n_heads,
            format!(
                "must be a positive multiple of n_kv_heads = {}",
                s.n_kv_heads
            ),
        ));
    }
    let group = c.count("n_heads / n_kv_heads", s.n_heads / s.n_kv_heads)?;
    let head_dim = c.count("head_dim", s.head_dim)?;
    let decode = c.variant(
        KernelFamily::AttentionDecode,
        "(head_dim, group)",
        &[head_dim, group],
    )?;
    let combine = c.variant(KernelFamily::AttentionCombine, "attention_combine", &[])?;
    if s.split_keys == 0 || s.split_keys > ATTENTION_MAX_SPLIT_KEYS as usize {
        return Err(c.unsupported(
            "split_keys",
            s.split_keys,
            format!("must be in 1..={ATTENTION_MAX_SPLIT_KEYS}"),
        ));
    }
    let max_keys = c.product(
        "max_blocks_per_seq * block_size",
        &[s.cache.max_blocks_per_seq, s.cache.block_size],
    )?;
    let covered = c.product("split_keys * max_splits", &[s.split_keys, s.max_splits])?;
    if covered < max_keys {
        return Err(c.unsupported(
            "max_splits",
            s.max_splits,
            format!("split_keys * max_splits must cover the {max_keys} keys a sequence can hold"),
        ));
    }
    let window = match s.window {
        None => 0,
        Some(w) => {
            c.at_least("window", w, 1)?;
            c.count("window", w)?
        }
    };
    let tokens = c.grid_yz("tokens", s.tokens)?;
    let n_kv_heads = c.grid_yz("n_kv_heads", s.n_kv_heads)?;
    let n_heads = c.grid_yz("n_heads", s.n_heads)?;
    let max_splits = c.count("max_splits", s.max_splits)?;
    c.aligned16("k_cache", b.k_cache)?;
    c.aligned16("v_cache", b.v_cache)?;
    c.len(
        "q",
        b.q,
        c.strided("q_stride", s.tokens, s.q_stride, s.n_heads * s.head_dim)?,
    )?;
    s.cache.check(
        &c,
        s.n_kv_heads,
        s.head_dim,
        b.k_cache,
        b.v_cache,
        b.block_tables,
    )?;
    c.len("token_seq", b.token_seq, s.tokens)?;
    c.len("positions", b.positions, s.tokens)?;
    c.len(
        "out",
        b.out,
        c.product(
            "tokens * n_heads * head_dim",
            &[s.tokens, s.n_heads, s.head_dim],
        )?,
    )?;
    let lse = c.product(
        "tokens * n_heads * max_splits",
        &[s.tokens, s.n_heads, s.max_splits],
    )?;
    c.len("part_lse", b.part_lse, lse)?;
    c.len(
        "part_out",
        b.part_out,
        lse.checked_mul(s.head_dim)
            .ok_or_else(|| c.unsupported("part_out elements", usize::MAX, "overflows"))?,
    )?;
    let shared = s.split_keys * group as usize * std::mem::size_of::<f32>();
    if s.tokens == 0 {
        return Ok(None);
    }
    let params = AttentionDecodeParams {
        q: b.q.address,
        k_cache: b.k_cache.address,
        v_cache: b.v_cache.address,
        block_tables: b.block_tables.address,
        token_seq: b.token_seq.address,
        positions: b.positions.address,
        out: b.out.address,
        part_out: b.part_out.address,
        part_lse: b.part_lse.address,
        tokens,
        n_heads,
        n_kv_heads,
        head_dim,
        q_stride: c.count("q_stride", s.q_stride)?,
        block_size: c.count("block_size", s.cache.block_size)?,
        max_blocks_per_seq: c.count("max_blocks_per_seq", s.cache.max_blocks_per_seq)?,
        num_blocks: c.count("num_blocks", s.cache.num_blocks)?,
        num_seqs: c.count("num_seqs", s.cache.num_seqs)?,
        window,
        split_keys: s.split_keys as u32,
        max_splits,
        scale: 1.0 / (s.head_dim as f32).sqrt(),
    };
    Ok(Some([
        Launch {
            variant: decode,
            grid: (max_splits, n_kv_heads, tokens),
            block: ATTENTION_THREADS,
            shared_bytes: shared as u32,
            params,
        },
        Launch {
            variant: combine,
            grid: (n_heads, tokens, 1),
            block: ATTENTION_COMBINE_THREADS,
            shared_bytes: 0,
            params,
        },
    ]))
}

/// Split-KV decode attention over the paged cache (GQA, optional sliding window), then the combine.
pub fn attention_decode(
    kernels: &Kernels,
    stream: &CudaStream,
    shape: &AttentionDecodeShape,
    b: AttentionDecodeBuffers<'_>,
) -> Result<(), CudaError> {
    let (q, _q) = read(b.q, stream);
    let (k_cache, _k_cache) = read(b.k_cache, stream);
    let (v_cache, _v_cache) = read(b.v_cache, stream);
    let (block_tables, _block_tables) = read(b.block_tables, stream);
    let (token_seq, _token_seq) = read(b.token_seq, stream);
    let (positions, _positions) = read(b.positions, stream);
    let (out, _out) = write(b.out, stream);
    let (part_out, _part_out) = write(b.part_out, stream);
    let (part_lse, _part_lse) = write(b.part_lse, stream);
    let bufs = AttentionBufs {
        q,
        k_cache,
        v_cache,
        block_tables,
        token_seq,
        positions,
        out,
        part_out,
        part_lse,
    };
    if let Some(plans) = plan_attention(shape, &bufs)? {
        for plan in &plans {
            launch(kernels, stream, plan)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Ops in their own files (each child module uses the checked plumbing above).

mod argmax;
pub use argmax::*;

mod embedding;
pub use embedding::*;

mod rmsnorm;
pub use rmsnorm::*;

#[cfg(test)]
pub(crate) mod fake;

mod linear;
pub use linear::*;

mod router;
pub use router::*;

mod moe_gemv;
pub use moe_gemv::*;

mod moe_grouped;
pub use moe_grouped::*;

mod attention_prefill;
pub use attention_prefill::*;

mod sample;
pub use sample::*;

mod fill;
pub use fill::*;

#[cfg(test)]
mod tests;

mod quant;
pub use quant::*;

mod moe_wgmma;
pub use moe_wgmma::*;
