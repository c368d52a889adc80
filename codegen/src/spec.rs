//! The one description of every CUDA kernel's interface: the shared compile-time constants, the
//! parameter struct each `extern "C"` kernel takes by value, and the template instantiations that
//! are compiled. Everything under `csrc/generated/` and `src/cuda/params*.rs` is written from this.
//!
//! Device pointers are 64-bit addresses (`CUdeviceptr` on the Rust side). Shapes in field docs are
//! row-major; "slot" means `token * top_k + j` (the j-th expert chosen for a token).

/// What a device pointer points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    /// bfloat16 (`__nv_bfloat16`).
    Bf16,
    /// 32-bit float.
    F32,
    /// 32-bit signed integer.
    I32,
    /// 32-bit unsigned integer.
    U32,
    /// Byte (`uint8_t`): packed quantized codes.
    U8,
    /// 64-bit unsigned integer (`uint64_t`): random-number state.
    U64,
    /// Untyped: the element type is chosen by the kernel variant.
    Void,
}

/// Whether the kernel writes through a pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read only (`const T*`).
    Read,
    /// Written (and possibly read).
    Write,
}

/// The type of one parameter field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    /// A device pointer.
    Ptr(Access, Elem),
    /// `uint32_t` / `u32`.
    U32,
    /// `float` / `f32`.
    F32,
}

/// How many elements a kernel touches through a pointer field, as expressions over the struct's
/// scalar fields and the shared constants (`+ - * /` and parentheses; evaluated in 128-bit integers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// Not a pointer.
    Scalar,
    /// A contiguous buffer of at least this many elements.
    Len(&'static str),
    /// `rows` rows of `width` elements, `stride` (a scalar field, filled from the buffer) apart:
    /// one column group of a wider row-major matrix.
    Rows {
        /// Rows touched.
        rows: &'static str,
        /// The scalar field holding the row stride.
        stride: &'static str,
        /// Elements touched per row.
        width: &'static str,
    },
}

/// One field of a parameter struct.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    /// Field name, the same in C and Rust.
    pub name: &'static str,
    /// Field type.
    pub ty: Ty,
    /// What it holds, with its shape.
    pub doc: &'static str,
    /// Elements a kernel touches through a pointer (the launchers check every buffer against it).
    pub extent: Extent,
    /// The kernels read or write it with 16-byte vector accesses: it must start 16-byte aligned.
    pub aligned: bool,
    /// The pointer may be null (the kernels then skip what it is for).
    pub nullable: bool,
}

impl Field {
    const fn len(self, len: &'static str) -> Field {
        Field {
            extent: Extent::Len(len),
            ..self
        }
    }

    const fn rows(self, rows: &'static str, stride: &'static str, width: &'static str) -> Field {
        Field {
            extent: Extent::Rows {
                rows,
                stride,
                width,
            },
            ..self
        }
    }

    const fn aligned(self) -> Field {
        Field {
            aligned: true,
            ..self
        }
    }

    const fn nullable(self) -> Field {
        Field {
            nullable: true,
            ..self
        }
    }
}

/// A parameter struct passed by value to one or more kernels.
#[derive(Debug, Clone, Copy)]
pub struct ParamStruct {
    /// Type name, the same in C and Rust.
    pub name: &'static str,
    /// What the kernels using it compute.
    pub doc: &'static str,
    /// Fields in declaration (= memory) order.
    pub fields: &'static [Field],
}

/// A compile-time constant shared by the kernels (C `#define`) and their Rust launchers (`pub const`).
#[derive(Debug, Clone, Copy)]
pub struct Constant {
    /// Name, the same in C and Rust.
    pub name: &'static str,
    /// Value.
    pub value: u32,
    /// Meaning.
    pub doc: &'static str,
}

/// One value of a template axis: the integer template argument and the label it adds to the symbol.
#[derive(Debug, Clone, Copy)]
pub struct AxisValue {
    /// Template argument.
    pub value: u32,
    /// Symbol fragment, e.g. `d128`.
    pub label: &'static str,
}

/// A template parameter of a kernel family and the values compiled for it.
#[derive(Debug, Clone, Copy)]
pub struct Axis {
    /// Template parameter name (upper case), e.g. `HEAD_DIM`.
    pub name: &'static str,
    /// Compiled values.
    pub values: &'static [AxisValue],
}

/// One `__global__` kernel template and its compiled instantiations (the cross product of its axes).
#[derive(Debug, Clone, Copy)]
pub struct Family {
    /// Snake-case name; also the symbol prefix, e.g. `attention_decode`.
    pub name: &'static str,
    /// Rust enum variant name, e.g. `AttentionDecode`.
    pub rust_name: &'static str,
    /// Source file stem in `csrc/` (the fatbin holding the symbols), e.g. `attention_decode`.
    pub file: &'static str,
    /// The parameter struct the kernel takes by value.
    pub params: &'static str,
    /// Template axes; empty for a single instantiation named `name`.
    pub axes: &'static [Axis],
}

/// A field with no extent or flags (scalars; pointers then add theirs).
pub const fn field(name: &'static str, ty: Ty, doc: &'static str) -> Field {
    Field {
        name,
        ty,
        doc,
        extent: Extent::Scalar,
        aligned: false,
        nullable: false,
    }
}

const fn read(elem: Elem) -> Ty {
    Ty::Ptr(Access::Read, elem)
}

const fn write(elem: Elem) -> Ty {
    Ty::Ptr(Access::Write, elem)
}

const fn v(value: u32, label: &'static str) -> AxisValue {
    AxisValue { value, label }
}

use Elem::{Bf16, Void, F32, I32, U32 as U32E, U64, U8};
use Ty::{F32 as F32T, U32};

/// Scalar fields that several parameter structs share: a struct holding every member (as `u32`
/// scalars) has one field `field` of type `type_name` in its Rust scalars instead of the members
/// (its C struct keeps them flat).
#[derive(Debug, Clone, Copy)]
pub struct ScalarGroup {
    /// The field of the scalars holding the group, e.g. `cache`.
    pub field: &'static str,
    /// The Rust type of the group, e.g. `PagedCacheScalars`.
    pub type_name: &'static str,
    /// What the group describes.
    pub doc: &'static str,
    /// The member fields, in declaration order.
    pub members: &'static [&'static str],
}

/// Every scalar group.
pub const SCALAR_GROUPS: &[ScalarGroup] = &[ScalarGroup {
    field: "cache",
    type_name: "PagedCacheScalars",
    doc: "The paged KV cache's extents as the kernels reading or writing it take them.",
    members: &["block_size", "max_blocks_per_seq", "num_blocks", "num_seqs"],
}];

/// Compile-time constants shared by kernels and launchers.
pub const CONSTANTS: &[Constant] = &[
    Constant { name: "EMBEDDING_THREADS", value: 256, doc: "Threads per block of `embedding` (one block per token)." },
    Constant { name: "RMSNORM_THREADS", value: 256, doc: "Threads per block of `rmsnorm` (one block per row)." },
    Constant { name: "ROPE_KV_THREADS", value: 256, doc: "Threads per block of `rope_kv` (one block per token)." },
    Constant { name: "ROUTER_THREADS", value: 256, doc: "Threads per block of `router` (one block per token, one warp per expert at a time; the first warp of the last block groups the slots)." },
    Constant { name: "ROUTER_MAX_EXPERTS", value: 256, doc: "Largest expert count the router kernels accept." },
    Constant { name: "ROUTER_MAX_TOP_K", value: 8, doc: "Largest top_k the router kernels accept." },
    Constant { name: "MOE_WARPS", value: 8, doc: "Warps per block of the expert GEMV kernels." },
    Constant { name: "MOE_UNROLL", value: 4, doc: "16-byte weight loads each lane issues before using them (bytes in flight: MOE_UNROLL * 16 * rows per warp)." },
    Constant { name: "MOE_DOWN_ROWS_PER_WARP", value: 2, doc: "Output rows of w2 per warp in `moe_down` (each activation load serves this many rows)." },
    Constant { name: "ATTENTION_THREADS", value: 128, doc: "Threads per block of `attention_decode` (one block per token, KV head and split)." },
    Constant { name: "ATTENTION_MAX_SPLIT_KEYS", value: 512, doc: "Largest number of keys one split of `attention_decode` covers (bounds its shared memory)." },
    Constant { name: "ATTENTION_MIN_SPLIT_KEYS", value: 32, doc: "Fewest keys a split of `attention_decode` takes when its token's keys are spread over `target_splits` (a short context stays in few splits)." },
    Constant { name: "ATTENTION_BLOCKS_PER_SM", value: 4, doc: "Blocks of `attention_decode` per multiprocessor its planner aims at when it spreads a batch's keys over splits." },
    Constant { name: "ARGMAX_THREADS", value: 1024, doc: "Threads per block of `argmax` (one block per row)." },
    // --- linear ---
    Constant { name: "LINEAR_GEMV_WARPS", value: 8, doc: "Warps per block of `linear_gemv` (each warp owns LINEAR_GEMV_ROWS_PER_WARP output rows)." },
    Constant { name: "LINEAR_GEMV_ROWS_PER_WARP", value: 2, doc: "Weight rows per warp in `linear_gemv` (each activation load serves this many rows)." },
    Constant { name: "LINEAR_GEMV_UNROLL", value: 4, doc: "16-byte weight loads per row each lane of `linear_gemv` issues before using them." },
    Constant { name: "LINEAR_GEMV_MAX_TOKENS", value: 16, doc: "Largest token count `linear` runs as a GEMV (tiles of at most 8 tokens); more tokens take the tensor-core `linear_mma`." },
    Constant { name: "LINEAR_MMA_BM", value: 128, doc: "Tokens per block tile of `linear_mma`." },
    Constant { name: "LINEAR_MMA_BN", value: 128, doc: "Output features per block tile of `linear_mma`." },
    Constant { name: "LINEAR_MMA_BK", value: 32, doc: "Input features per shared-memory stage of `linear_mma`." },
    Constant { name: "LINEAR_MMA_THREADS", value: 256, doc: "Threads per block of `linear_mma` (8 warps as 2 x 4, each a 64 x 32 tile of the output)." },

    // --- moe_grouped ---
    Constant { name: "MOE_GROUPED_THREADS", value: 128, doc: "Threads per block of the grouped expert GEMM (4 warps, 2 x 2 over the output tile)." },
    Constant { name: "MOE_GROUPED_BM", value: 64, doc: "Slots (rows of one expert) per tile of the grouped expert GEMM." },
    Constant { name: "MOE_GROUPED_BN", value: 64, doc: "Output columns per B matrix of a grouped GEMM tile (`moe_grouped_up`: 64 of w1 and the same 64 of w3; `moe_grouped_down`: two adjacent 64-column halves of w2, 128 columns)." },
    Constant { name: "MOE_GROUPED_BK", value: 32, doc: "Reduction elements per shared-memory stage of the grouped expert GEMM (two stages, cp.async)." },

    // --- moe_cutlass ---
    Constant { name: "MOE_CUTLASS_GROUP_BYTES", value: 128, doc: "Bytes of `MoeCutlassParams::groups` per GEMM group (its problem shape, A / B / D pointers and strides; checked by a static_assert in csrc/cutlass/)." },
    Constant { name: "MOE_CUTLASS_STATUS_BASE", value: 1000, doc: "Added to a `cutlass::Status` returned by the CUTLASS entry points (below it: a `cudaError_t`)." },

    // --- attention_prefill ---
    Constant { name: "ATTENTION_PREFILL_THREADS", value: 256, doc: "Threads per block of `attention_prefill` (8 warps, 16 query rows each; one block per tile of query rows of one KV head)." },
    Constant { name: "ATTENTION_PREFILL_ROWS", value: 128, doc: "Query rows per block of `attention_prefill`: (token, query head) pairs of one KV head's group, heads fastest (16 per warp)." },
    Constant { name: "ATTENTION_PREFILL_KEYS", value: 32, doc: "Keys per K/V tile of `attention_prefill` (copied from the paged cache into one of two shared-memory stages; one per lane)." },
    Constant { name: "ATTENTION_PREFILL_PAD", value: 8, doc: "bf16 elements of padding per shared-memory row of `attention_prefill` (keeps ldmatrix reads and cp.async writes free of bank conflicts and rows 16-byte aligned)." },

    // --- sample ---
    Constant { name: "SAMPLE_THREADS", value: 1024, doc: "Threads per block of `sample` (one block per row)." },
    Constant { name: "SAMPLE_RNG_WORDS", value: 4, doc: "u64 words of one row's random state in `sample` (xoshiro256++, the host `Rng`)." },
    Constant { name: "SAMPLE_NON_FINITE", value: 4294967295, doc: "Id `sample` and `argmax` write for a row with a NaN or infinite logit (`sample` leaves its random state as it was)." },
    Constant { name: "SAMPLE_BAD_PARAMS", value: 4294967294, doc: "Id `sample` writes for a row whose temperature is not finite and > 0 or whose top_p is not in (0, 1] (its random state is left as it was)." },

    // --- fill ---
    Constant { name: "FILL_THREADS", value: 256, doc: "Threads per block of `fill_random` (grid-stride loop)." },

    // --- quant ---
    Constant { name: "QUANT_KIND_FP8", value: 0, doc: "KIND template value of the quantized kernels: FP8 E4M3 codes, one f32 scale per row." },
    Constant { name: "QUANT_KIND_INT8", value: 1, doc: "KIND template value of the quantized kernels: INT8 codes, one f32 scale per row." },
    Constant { name: "QUANT_KIND_INT4", value: 2, doc: "KIND template value of the quantized kernels: 4-bit codes (low nibble = even column), one 32-bit word per row and group: the f16 scale (low half) and the integer zero (high half)." },
    Constant { name: "QUANT_KIND_LUT4", value: 3, doc: "KIND template value of the quantized kernels: 4-bit codes (low nibble = even column) indexing a table of QUANT_TABLE_VALUES f32 values (bitsandbytes NF4 / FP4), one f32 scale per row and group: w = `table[q] * scale`." },
    Constant { name: "QUANT_TABLE_VALUES", value: 16, doc: "f32 values of the table a QUANT_KIND_LUT4 matrix's codes index (read into shared memory once per block)." },
    Constant { name: "QUANT_CHUNK_BYTES", value: 16, doc: "Bytes of codes one lane loads at a time in the quantized kernels (16 elements of 8 bits or 32 of 4 bits)." },
    Constant { name: "QUANT_UNROLL", value: 4, doc: "16-byte code loads per row each lane of `qlinear` / `qmoe_*` issues before using them." },
    Constant { name: "QLINEAR_WARPS", value: 8, doc: "Warps per block of `qlinear` (each warp owns QLINEAR_ROWS_PER_WARP output rows)." },
    Constant { name: "QLINEAR_ROWS_PER_WARP", value: 2, doc: "Weight rows per warp in `qlinear` (each activation load serves this many rows)." },
    Constant { name: "QMMA_WARPS", value: 4, doc: "Warps per block of `qlinear_mma` / `qmoe_mma_*` (they split the columns of the block's 16 rows and add their sums in warp order)." },
    Constant { name: "QMMA_ROWS", value: 16, doc: "Weight rows per block of `qlinear_mma` / `qmoe_mma_*` (one mma.sync m16 tile)." },
    Constant { name: "QMMA_KIND_BF16", value: 4, doc: "KIND template value of the tensor-core decode kernels for bf16 weights (`linear_mma_decode`, `moe_mma_*`: the weights themselves, no parameters)." },
    Constant { name: "QMMA_INT4_STEP_COLS", value: 128, doc: "Columns of one INT4 step of `qlinear_mma` / `qmoe_mma_*` (a 16-byte chunk of codes per lane of a 4-lane group); INT4 group sizes they read are multiples of it." },
    Constant { name: "DEQUANT_THREADS", value: 128, doc: "Threads per block of `dequantize` (one block per row of one matrix)." },
];

/// Every kernel parameter struct.
pub const STRUCTS: &[ParamStruct] = &[
    ParamStruct {
        name: "EmbeddingParams",
        doc: "Token embedding gather: `out[t, :] = table[ids[t], :]`; an id >= vocab gives a row of zeros.",
        fields: &[
            field("out", write(Void), "`[tokens, hidden]`, bf16 or f32 as the variant says.").len("tokens * hidden"),
            field("table", read(Bf16), "`[vocab, hidden]` embedding table.").len("vocab * hidden"),
            field("ids", read(U32E), "`[tokens]` token ids.").len("tokens"),
            field("tokens", U32, "Number of tokens."),
            field("hidden", U32, "Hidden size."),
            field("vocab", U32, "Rows of `table`."),
        ],
    },
    ParamStruct {
        name: "RmsnormParams",
        doc: "RMSNorm with an optional fused residual add: `residual[r] += sum_a addend[r, a]` (when the \
              variant adds), then `out[r] = residual[r] * rsqrt(mean(residual[r]^2) + eps) * weight`, in f32.",
        fields: &[
            field("out", write(Bf16), "`[rows, hidden]` normalised output.").len("rows * hidden"),
            field("residual", write(F32), "`[rows, hidden]` residual stream: read, updated in place when the variant adds.").len("rows * hidden"),
            field("addend", read(Void), "`[rows, addend_count, hidden]`, bf16 or f32 as the variant says; unused without add.").len("rows * addend_count * hidden").nullable(),
            field("weight", read(Bf16), "`[hidden]` norm weight.").len("hidden"),
            field("rows", U32, "Number of rows (tokens)."),
            field("hidden", U32, "Row length."),
            field("addend_count", U32, "Addend rows summed into each residual row (1 for attention, top_k for MoE slots)."),
            field("eps", F32T, "Epsilon inside the square root."),
        ],
    },
    ParamStruct {
        name: "RopeKvParams",
        doc: "RoPE (rotate_half: dimension `i` pairs with `i + head_dim/2`, angle `position * inv_freq[i]` in f32) \
              applied in place to q, and to k on its way into the paged cache; v is copied into the cache. \
              Token t goes to cache slot `(block_tables[token_seq[t], positions[t] / block_size], \
              positions[t] % block_size)`; a token whose slot is out of range is not written.",
        fields: &[
            field("q", write(Bf16), "`[tokens, n_heads, head_dim]` queries (row stride `q_stride`), rotated in place.").rows("tokens", "q_stride", "n_heads * head_dim"),
            field("k", read(Bf16), "`[tokens, n_kv_heads, head_dim]` new keys (row stride `k_stride`).").rows("tokens", "k_stride", "n_kv_heads * head_dim"),
            field("v", read(Bf16), "`[tokens, n_kv_heads, head_dim]` new values (row stride `v_stride`).").rows("tokens", "v_stride", "n_kv_heads * head_dim"),
            field("k_cache", write(Bf16), "`[num_blocks, block_size, n_kv_heads, head_dim]` this layer's key cache.").len("num_blocks * block_size * n_kv_heads * head_dim"),
            field("v_cache", write(Bf16), "`[num_blocks, block_size, n_kv_heads, head_dim]` this layer's value cache.").len("num_blocks * block_size * n_kv_heads * head_dim"),
            field("block_tables", read(I32), "`[num_seqs, max_blocks_per_seq]` cache block of each sequence's logical block.").len("num_seqs * max_blocks_per_seq"),
            field("token_seq", read(I32), "`[tokens]` block-table row of each token.").len("tokens"),
            field("positions", read(I32), "`[tokens]` absolute position of each token.").len("tokens"),
            field("inv_freq", read(F32), "`[head_dim / 2]` inverse frequencies `theta^(-2i/head_dim)`.").len("head_dim / 2"),
            field("tokens", U32, "Number of tokens."),
            field("n_heads", U32, "Query heads."),
            field("n_kv_heads", U32, "Key/value heads."),
            field("head_dim", U32, "Head dimension (even)."),
            field("q_stride", U32, "Elements between consecutive tokens of `q`."),
            field("k_stride", U32, "Elements between consecutive tokens of `k`."),
            field("v_stride", U32, "Elements between consecutive tokens of `v`."),
            field("block_size", U32, "Tokens per cache block."),
            field("max_blocks_per_seq", U32, "Columns of `block_tables`."),
            field("num_blocks", U32, "Blocks in the cache."),
            field("num_seqs", U32, "Rows of `block_tables`."),
        ],
    },
    ParamStruct {
        name: "RouterParams",
        doc: "MoE router: f32 logits `x . gate^T`, softmax over all experts, top_k (ties: lower expert \
              index), weights renormalised to sum to 1; then the slots grouped by expert: counts, offsets \
              and `sorted_slots` (expert-major, ascending slot within an expert).",
        fields: &[
            field("x", read(Bf16), "`[tokens, hidden]` normalised hidden states.").len("tokens * hidden").aligned(),
            field("gate", read(Bf16), "`[experts, hidden]` gate weight.").len("experts * hidden").aligned(),
            field("logits", write(F32), "`[tokens, experts]` router logits.").len("tokens * experts"),
            field("topk_ids", write(I32), "`[tokens, top_k]` chosen experts, best first.").len("tokens * top_k"),
            field("topk_weights", write(F32), "`[tokens, top_k]` renormalised routing weights.").len("tokens * top_k"),
            field("expert_counts", write(I32), "`[experts]` slots routed to each expert.").len("experts"),
            field("expert_offsets", write(I32), "`[experts + 1]` exclusive prefix sum of `expert_counts`.").len("experts + 1"),
            field("sorted_slots", write(I32), "`[tokens * top_k]` slots grouped by expert.").len("tokens * top_k"),
            field("done", write(U32E), "`[1]` blocks done with their top-k in this launch (0 between launches: the last block resets it).").len("1"),
            field("tokens", U32, "Number of tokens."),
            field("hidden", U32, "Hidden size."),
            field("experts", U32, "Number of experts."),
            field("top_k", U32, "Experts per token."),
        ],
    },
    ParamStruct {
        name: "MoeParams",
        doc: "Expert MLP over the routed slots, GEMV style for decode batches: `moe_up` writes \
              `act[s] = silu(w1[e] x[t]) * (w3[e] x[t])`, `moe_down` writes `out[s] = weight[s] * (w2[e] act[s])` \
              for every slot s = t * top_k + j routed to expert e. Weights are row-major `[out, in]` bf16.",
        fields: &[
            field("x", read(Bf16), "`[tokens, hidden]` normalised hidden states.").len("tokens * hidden").aligned(),
            field("w1", read(Bf16), "`[experts, inter, hidden]` gate projections.").len("experts * inter * hidden").aligned(),
            field("w3", read(Bf16), "`[experts, inter, hidden]` up projections.").len("experts * inter * hidden").aligned(),
            field("w2", read(Bf16), "`[experts, hidden, inter]` down projections.").len("experts * hidden * inter").aligned(),
            field("topk_weights", read(F32), "`[tokens, top_k]` routing weights.").len("tokens * top_k"),
            field("expert_offsets", read(I32), "`[experts + 1]` start of each expert's slots in `sorted_slots`.").len("experts + 1"),
            field("sorted_slots", read(I32), "`[tokens * top_k]` slots grouped by expert.").len("tokens * top_k"),
            field("act", write(Bf16), "`[tokens * top_k, inter]` SwiGLU activations per slot.").len("tokens * top_k * inter").aligned(),
            field("out", write(F32), "`[tokens * top_k, hidden]` weighted expert outputs per slot.").len("tokens * top_k * hidden"),
            field("tokens", U32, "Number of tokens."),
            field("hidden", U32, "Hidden size (a multiple of 8)."),
            field("inter", U32, "Expert intermediate size (a multiple of 8)."),
            field("experts", U32, "Number of experts."),
            field("top_k", U32, "Experts per token."),
        ],
    },
    ParamStruct {
        name: "MoeCutlassParams",
        doc: "Expert MLP of prefill chunks on CUTLASS's Hopper grouped GEMM (`mx_moe_cutlass_run`, \
              csrc/cutlass/): over the slots in expert-sorted order (row r is slot `sorted_slots[r]`), \
              `act[r] = silu(w1[e] x[t]) * (w3[e] x[t])` and `out[s] = weight[s] * (w2[e] act[r])`, with \
              the expert-sorted scratch rows `xs`, `gate_up` and `down` in between.",
        fields: &[
            field("x", read(Bf16), "`[tokens, hidden]` normalised hidden states.").len("tokens * hidden").aligned(),
            field("w1", read(Bf16), "`[experts, inter, hidden]` gate projections.").len("experts * inter * hidden").aligned(),
            field("w3", read(Bf16), "`[experts, inter, hidden]` up projections.").len("experts * inter * hidden").aligned(),
            field("w2", read(Bf16), "`[experts, hidden, inter]` down projections.").len("experts * hidden * inter").aligned(),
            field("topk_weights", read(F32), "`[tokens, top_k]` routing weights.").len("tokens * top_k"),
            field("expert_offsets", read(I32), "`[experts + 1]` start of each expert's slots in `sorted_slots`.").len("experts + 1"),
            field("sorted_slots", read(I32), "`[tokens * top_k]` slots grouped by expert.").len("tokens * top_k"),
            field("act", write(Bf16), "`[tokens * top_k, inter]` SwiGLU activations in expert-sorted order.").len("tokens * top_k * inter").aligned(),
            field("out", write(F32), "`[tokens * top_k, hidden]` weighted expert outputs per slot.").len("tokens * top_k * hidden").aligned(),
            field("xs", write(Bf16), "`[tokens * top_k, hidden]` scratch: the rows of `x` in expert-sorted order.").len("tokens * top_k * hidden").aligned(),
            field("gate_up", write(F32), "`[2, tokens * top_k, inter]` scratch: the w1 and w3 products in expert-sorted order.").len("2 * tokens * top_k * inter").aligned(),
            field("down", write(F32), "`[tokens * top_k, hidden]` scratch: the w2 products in expert-sorted order.").len("tokens * top_k * hidden").aligned(),
            field("groups", write(U8), "`[3 * experts, MOE_CUTLASS_GROUP_BYTES]` scratch: the grouped GEMMs' shapes, pointers and strides.").len("3 * experts * MOE_CUTLASS_GROUP_BYTES").aligned(),
            field("workspace", write(U8), "`[workspace_bytes]` the grouped GEMMs' workspace (`mx_moe_cutlass_workspace_bytes`).").len("workspace_bytes").aligned(),
            field("tokens", U32, "Number of tokens."),
            field("hidden", U32, "Hidden size (a multiple of 8)."),
            field("inter", U32, "Expert intermediate size (a multiple of 8)."),
            field("experts", U32, "Number of experts."),
            field("top_k", U32, "Experts per token."),
            field("workspace_bytes", U32, "Bytes of `workspace`."),
            field("sm_count", U32, "Streaming multiprocessors of the device (the persistent grid)."),
        ],
    },
    ParamStruct {
        name: "MoeCutlassQ8Params",
        doc: "Expert MLP of prefill chunks over 8-bit expert stacks (FP8 E4M3 or INT8, one scale per row) on \
              CUTLASS's Hopper grouped GEMM (`mx_moe_cutlass_fp8_run`, `mx_moe_cutlass_int8_run`, csrc/cutlass/): \
              `MoeCutlassParams`' computation with the rows of `x` and the SwiGLU activations quantized per row \
              to the stacks' format (scale = amax / 448 or / 127) and the weights read as stored \
              (`w[o, i] = code[o, i] * scale[o]`), 8-bit x 8-bit products accumulated in f32 (FP8) or i32 (INT8).",
        fields: &[
            field("x", read(Bf16), "`[tokens, hidden]` normalised hidden states.").len("tokens * hidden").aligned(),
            field("w1", read(U8), "`[experts, inter, hidden]` gate projection codes.").len("experts * inter * hidden").aligned(),
            field("w1_scales", read(F32), "`[experts, inter]` gate projection row scales.").len("experts * inter").aligned(),
            field("w3", read(U8), "`[experts, inter, hidden]` up projection codes.").len("experts * inter * hidden").aligned(),
            field("w3_scales", read(F32), "`[experts, inter]` up projection row scales.").len("experts * inter").aligned(),
            field("w2", read(U8), "`[experts, hidden, inter]` down projection codes.").len("experts * hidden * inter").aligned(),
            field("w2_scales", read(F32), "`[experts, hidden]` down projection row scales.").len("experts * hidden").aligned(),
            field("topk_weights", read(F32), "`[tokens, top_k]` routing weights.").len("tokens * top_k"),
            field("expert_offsets", read(I32), "`[experts + 1]` start of each expert's slots in `sorted_slots`.").len("experts + 1"),
            field("sorted_slots", read(I32), "`[tokens * top_k]` slots grouped by expert.").len("tokens * top_k"),
            field("out", write(F32), "`[tokens * top_k, hidden]` weighted expert outputs per slot.").len("tokens * top_k * hidden").aligned(),
            field("xs", write(U8), "`[tokens * top_k, hidden]` scratch: the 8-bit codes of the rows of `x` in expert-sorted order.").len("tokens * top_k * hidden").aligned(),
            field("xs_scales", write(F32), "`[tokens * top_k]` scratch: the scale of each row of `xs`.").len("tokens * top_k"),
            field("gate_up", write(F32), "`[2, tokens * top_k, inter]` scratch: the w1 and w3 code products (f32), then the SwiGLU activations.").len("2 * tokens * top_k * inter").aligned(),
            field("act", write(U8), "`[tokens * top_k, inter]` scratch: the 8-bit codes of the SwiGLU activations, expert-sorted.").len("tokens * top_k * inter").aligned(),
            field("act_scales", write(F32), "`[tokens * top_k]` scratch: the scale of each row of `act`.").len("tokens * top_k"),
            field("down", write(F32), "`[tokens * top_k, hidden]` scratch: the w2 code products in expert-sorted order.").len("tokens * top_k * hidden").aligned(),
            field("groups", write(U8), "`[3 * experts, MOE_CUTLASS_GROUP_BYTES]` scratch: the grouped GEMMs' shapes, pointers and strides.").len("3 * experts * MOE_CUTLASS_GROUP_BYTES").aligned(),
            field("workspace", write(U8), "`[workspace_bytes]` the grouped GEMMs' workspace (`mx_moe_cutlass_fp8_workspace_bytes` / `_int8_`).").len("workspace_bytes").aligned(),
            field("tokens", U32, "Number of tokens."),
            field("hidden", U32, "Hidden size (a multiple of 16)."),
            field("inter", U32, "Expert intermediate size (a multiple of 16)."),
            field("experts", U32, "Number of experts."),
            field("top_k", U32, "Experts per token."),
            field("workspace_bytes", U32, "Bytes of `workspace`."),
            field("sm_count", U32, "Streaming multiprocessors of the device (the persistent grid)."),
        ],
    },
    ParamStruct {
        name: "AttentionDecodeParams",
        doc: "Split-KV flash-decoding over the paged cache. Query token t (sequence row `token_seq[t]`, \
              position `p = positions[t]`) attends to keys j with max(0, p - window + 1) <= j <= p \
              (window 0: all j <= p); query head h reads KV head h / (n_heads / n_kv_heads); scores are \
              scaled by `scale` and the softmax is in f32. Each split writes its normalised partial output and \
              log2-sum-exp; the last split of a (token, KV head) to finish merges them into `out`.",
        fields: &[
            field("q", read(Bf16), "`[tokens, n_heads, head_dim]` rotated queries (row stride `q_stride`).").rows("tokens", "q_stride", "n_heads * head_dim"),
            field("k_cache", read(Bf16), "`[num_blocks, block_size, n_kv_heads, head_dim]` key cache.").len("num_blocks * block_size * n_kv_heads * head_dim").aligned(),
            field("v_cache", read(Bf16), "`[num_blocks, block_size, n_kv_heads, head_dim]` value cache.").len("num_blocks * block_size * n_kv_heads * head_dim").aligned(),
            field("block_tables", read(I32), "`[num_seqs, max_blocks_per_seq]` block tables.").len("num_seqs * max_blocks_per_seq"),
            field("token_seq", read(I32), "`[tokens]` block-table row of each query token.").len("tokens"),
            field("positions", read(I32), "`[tokens]` absolute position of each query token.").len("tokens"),
            field("out", write(Bf16), "`[tokens, n_heads, head_dim]` attention output.").len("tokens * n_heads * head_dim"),
            field("part_out", write(F32), "`[tokens, n_heads, max_splits, head_dim]` per-split normalised outputs.").len("tokens * n_heads * max_splits * head_dim"),
            field("part_lse", write(F32), "`[tokens, n_heads, max_splits]` per-split log2-sum-exp of the scaled scores.").len("tokens * n_heads * max_splits"),
            field("split_done", write(U32E), "`[tokens, n_kv_heads]` splits done per (token, KV head) in this launch (0 between launches: the last split resets it).").len("tokens * n_kv_heads"),
            field("tokens", U32, "Number of query tokens."),
            field("n_heads", U32, "Query heads."),
            field("n_kv_heads", U32, "Key/value heads."),
            field("head_dim", U32, "Head dimension."),
            field("q_stride", U32, "Elements between consecutive tokens of `q`."),
            field("block_size", U32, "Tokens per cache block."),
            field("max_blocks_per_seq", U32, "Columns of `block_tables`."),
            field("num_blocks", U32, "Blocks in the cache."),
            field("num_seqs", U32, "Rows of `block_tables`."),
            field("window", U32, "Sliding window W (keys per query, itself included); 0 = full causal."),
            field("split_keys", U32, "Most keys per split (at most ATTENTION_MAX_SPLIT_KEYS)."),
            field("max_splits", U32, "Splits allocated per (token, head); split_keys * max_splits covers the longest sequence."),
            field("target_splits", U32, "Splits a token's keys are spread over (1..=max_splits; each split at least ATTENTION_MIN_SPLIT_KEYS and at most split_keys keys), or 0: every split split_keys keys."),
            field("scale", F32T, "Score scale, 1 / sqrt(head_dim)."),
        ],
    },
    ParamStruct {
        name: "ArgmaxParams",
        doc: "Greedy sampling: `out_ids[r] = argmax(logits[r, :])`, ties to the lowest id; SAMPLE_NON_FINITE \
              for a row holding a NaN or an infinity.",
        fields: &[
            field("logits", read(F32), "`[rows, vocab]` logits.").len("rows * vocab"),
            field("out_ids", write(U32E), "`[rows]` chosen token ids, or SAMPLE_NON_FINITE.").len("rows"),
            field("rows", U32, "Number of rows."),
            field("vocab", U32, "Row length."),
        ],
    },
    // --- linear ---
    ParamStruct {
        name: "LinearParams",
        doc: "Dense projection `out[t, o] = sum_i x[t, i] * w[o, i]` (x and w bf16, f32 accumulation), out bf16 or \
              f32 as the variant says. `linear_gemv` streams the weight once per tile of tokens (decode), \
              `linear_mma` is the tensor-core GEMM (prefill).",
        fields: &[
            field("x", read(Bf16), "`[tokens, in_features]` input rows (16-byte aligned).").len("tokens * in_features").aligned(),
            field("w", read(Bf16), "`[out_features, in_features]` weight, row-major as stored in checkpoints (16-byte aligned).").len("out_features * in_features").aligned(),
            field("out", write(Void), "`[tokens, out_features]`, bf16 or f32 as the variant says.").len("tokens * out_features"),
            field("tokens", U32, "Number of tokens (rows of x and out)."),
            field("in_features", U32, "Input features (a positive multiple of 8)."),
            field("out_features", U32, "Output features (rows of w)."),
        ],
    },

    ParamStruct {
        name: "LinearCutlassParams",
        doc: "Dense projection of prefill chunks on CUTLASS's Hopper GEMM (`mx_linear_cutlass_bf16_run`, \
              `mx_linear_cutlass_f32_run`, csrc/cutlass/): `out[t, o] = sum_i x[t, i] * w[o, i]` (x and w bf16, \
              f32 accumulation), out bf16 or f32 as the entry says; stream-K over `sm_count` SMs, the \
              partial tiles in `workspace`.",
        fields: &[
            field("x", read(Bf16), "`[tokens, in_features]` input rows (16-byte aligned).").len("tokens * in_features").aligned(),
            field("w", read(Bf16), "`[out_features, in_features]` weight, row-major as stored in checkpoints (16-byte aligned).").len("out_features * in_features").aligned(),
            field("out", write(Void), "`[tokens, out_features]`, bf16 or f32 as the entry says (16-byte aligned).").len("tokens * out_features").aligned(),
            field("workspace", write(U8), "`[workspace_bytes]` the GEMM's workspace (`mx_linear_cutlass_workspace_bytes`).").len("workspace_bytes").aligned(),
            field("tokens", U32, "Number of tokens (rows of x and out)."),
            field("in_features", U32, "Input features (a positive multiple of 8)."),
            field("out_features", U32, "Output features (rows of w; a positive multiple of 8)."),
            field("workspace_bytes", U32, "Bytes of `workspace`."),
            field("sm_count", U32, "Streaming multiprocessors of the device (the persistent grid)."),
        ],
    },

    // --- moe_grouped ---

    // --- attention_prefill ---
    ParamStruct {
        name: "AttentionPrefillParams",
        doc: "Causal flash attention of one sequence's `tokens` consecutive queries (positions \
              `start_pos .. start_pos + tokens`, block-table row `seq_row`) over the paged cache. The query at \
              position p attends to keys j with max(0, p - window + 1) <= j <= p (window 0: all j <= p); \
              query head h reads KV head h / (n_heads / n_kv_heads); scores are scaled by `scale`, softmax in f32. \
              Keys whose block-table entry is outside [0, num_blocks) are skipped.",
        fields: &[
            field("q", read(Bf16), "`[tokens, n_heads, head_dim]` rotated queries (row stride `q_stride`).").rows("tokens", "q_stride", "n_heads * head_dim"),
            field("k_cache", read(Bf16), "`[num_blocks, block_size, n_kv_heads, head_dim]` key cache.").len("num_blocks * block_size * n_kv_heads * head_dim").aligned(),
            field("v_cache", read(Bf16), "`[num_blocks, block_size, n_kv_heads, head_dim]` value cache.").len("num_blocks * block_size * n_kv_heads * head_dim").aligned(),
            field("block_tables", read(I32), "`[num_seqs, max_blocks_per_seq]` block tables.").len("num_seqs * max_blocks_per_seq"),
            field("out", write(Bf16), "`[tokens, n_heads, head_dim]` attention output.").len("tokens * n_heads * head_dim"),
            field("tokens", U32, "Number of query tokens."),
            field("start_pos", U32, "Absolute position of the first query token."),
            field("seq_row", U32, "Block-table row of the sequence."),
            field("n_heads", U32, "Query heads."),
            field("n_kv_heads", U32, "Key/value heads."),
            field("head_dim", U32, "Head dimension (the instantiation's HEAD_DIM)."),
            field("q_stride", U32, "Elements between consecutive tokens of `q`."),
            field("block_size", U32, "Tokens per cache block."),
            field("max_blocks_per_seq", U32, "Columns of `block_tables`."),
            field("num_blocks", U32, "Blocks in the cache."),
            field("num_seqs", U32, "Rows of `block_tables`."),
            field("window", U32, "Sliding window W (keys per query, itself included); 0 = full causal."),
            field("scale", F32T, "Score scale, 1 / sqrt(head_dim)."),
        ],
    },

    // --- sample ---
    ParamStruct {
        name: "SampleParams",
        doc: "Seeded sampling per row, the host `Sampler` without repetition penalty: scores `logits / temperature`, \
              top-k (ties to the lower id; 0 = off), top-p (smallest most-probable set reaching `top_p`), then one \
              draw from the softmax of what is left using one value of the row's xoshiro256++ stream.",
        fields: &[
            field("logits", read(F32), "`[rows, vocab]` logits.").len("rows * vocab"),
            field("temperature", read(F32), "`[rows]` temperature, finite and > 0.").len("rows"),
            field("top_k", read(U32E), "`[rows]` top-k, 0 = off.").len("rows"),
            field("top_p", read(F32), "`[rows]` top-p in (0, 1], 1 = off.").len("rows"),
            field("rng_state", write(U64), "`[rows, SAMPLE_RNG_WORDS]` u64 xoshiro256++ state per row, advanced by one step per drawn row.").len("rows * SAMPLE_RNG_WORDS"),
            field("out_ids", write(U32E), "`[rows]` drawn token ids, or SAMPLE_NON_FINITE / SAMPLE_BAD_PARAMS.").len("rows"),
            field("rows", U32, "Number of rows."),
            field("vocab", U32, "Row length."),
            field("fast", U32, "1: the fast paths where they apply (the same ids in a few passes), else the search path; 0: the search path only."),
        ],
    },

    // --- fill ---
    ParamStruct {
        name: "FillParams",
        doc: "Seeded pseudo-random fill for benchmarks on made-up weights: `out[i] = shift + scale * u(seed, base + i)` \
              with `u` uniform in [-1, 1) from a 32-bit integer hash (never constant, never NaN).",
        fields: &[
            field("out", write(Bf16), "`[len]` values written.").len("len"),
            field("len", U32, "Elements to write (below 2^31)."),
            field("base", U32, "Hash index of element 0 (lets a large buffer be filled in pieces)."),
            field("seed", U32, "Seed."),
            field("scale", F32T, "Half-width of the range."),
            field("shift", F32T, "Centre of the range."),
        ],
    },
    // --- quant ---
    ParamStruct {
        name: "QLinearParams",
        doc: "Dense projection over one packed quantized matrix (csrc/quant.cuh): `out[t, o] = sum_j x[t, perm[j]] * \
              w[o, j]` over the stored columns j (perm absent: x[t, j]), w[o, j] the dequantized value, f32 \
              accumulation; out bf16 or f32 as the variant says.",
        fields: &[
            field("x", read(Bf16), "`[tokens, in_features]` input rows (16-byte aligned).").len("tokens * in_features").aligned(),
            field("codes", read(U8), "`[out_features, row_bytes]` codes (16-byte aligned).").len("out_features * row_bytes").aligned(),
            field("params", read(F32), "`[out_features, row_params]`: the row scale (8-bit), (scale, zero) per group (INT4) or scale per group (LUT4).").len("out_features * row_params"),
            field("perm", read(U32E), "`[in_features]` input column of each stored column (16-byte aligned), or null.").len("in_features").aligned().nullable(),
            field("table", read(F32), "`[QUANT_TABLE_VALUES]` values of the 4-bit codes (LUT4; null for the other kinds).").len("QUANT_TABLE_VALUES").nullable(),
            field("out", write(Void), "`[tokens, out_features]`, bf16 or f32 as the variant says.").len("tokens * out_features"),
            field("tokens", U32, "Number of tokens (at most LINEAR_GEMV_MAX_TOKENS)."),
            field("in_features", U32, "Input features (a multiple of 16 for 8-bit, 32 for 4-bit)."),
            field("out_features", U32, "Output features (rows of the matrix)."),
            field("row_bytes", U32, "Code bytes per row: in_features (8-bit) or in_features / 2 (4-bit)."),
            field("row_params", U32, "f32 parameters per row: 1 (8-bit), 2 * ceil(in_features / group_size) (INT4) or ceil(in_features / group_size) (LUT4)."),
            field("group_size", U32, "Stored columns per group (4-bit: INT4 and LUT4, a multiple of 32); 0 for 8-bit."),
        ],
    },
    ParamStruct {
        name: "QMoeParams",
        doc: "The decode expert MLP of `MoeParams` over packed expert stacks: matrix e of a stack starts at \
              `e * rows * row_bytes` codes, `e * rows * row_params` params and `e * cols` perm entries. `qmoe_up` \
              writes `act[s] = silu(w1[e] x[t]) * (w3[e] x[t])`, `qmoe_down` `out[s] = weight[s] * (w2[e] act[s])`.",
        fields: &[
            field("x", read(Bf16), "`[tokens, hidden]` normalised hidden states (16-byte aligned).").len("tokens * hidden").aligned(),
            field("w1_codes", read(U8), "`[experts, inter, w13_row_bytes]` gate projection codes (16-byte aligned).").len("experts * inter * w13_row_bytes").aligned(),
            field("w1_params", read(F32), "`[experts, inter, w13_row_params]` gate projection parameters.").len("experts * inter * w13_row_params"),
            field("w3_codes", read(U8), "`[experts, inter, w13_row_bytes]` up projection codes (16-byte aligned).").len("experts * inter * w13_row_bytes").aligned(),
            field("w3_params", read(F32), "`[experts, inter, w13_row_params]` up projection parameters.").len("experts * inter * w13_row_params"),
            field("w13_perm", read(U32E), "`[experts, hidden]` permutation shared by w1 and w3 (16-byte aligned), or null.").len("experts * hidden").aligned().nullable(),
            field("w2_codes", read(U8), "`[experts, hidden, w2_row_bytes]` down projection codes (16-byte aligned).").len("experts * hidden * w2_row_bytes").aligned(),
            field("w2_params", read(F32), "`[experts, hidden, w2_row_params]` down projection parameters.").len("experts * hidden * w2_row_params"),
            field("w2_perm", read(U32E), "`[experts, inter]` permutation of w2 (16-byte aligned), or null.").len("experts * inter").aligned().nullable(),
            field("table", read(F32), "`[QUANT_TABLE_VALUES]` values of the 4-bit codes of all three stacks (LUT4; null for the other kinds).").len("QUANT_TABLE_VALUES").nullable(),
            field("topk_weights", read(F32), "`[tokens, top_k]` routing weights.").len("tokens * top_k"),
            field("expert_offsets", read(I32), "`[experts + 1]` start of each expert's slots in `sorted_slots`.").len("experts + 1"),
            field("sorted_slots", read(I32), "`[tokens * top_k]` slots grouped by expert.").len("tokens * top_k"),
            field("act", write(Bf16), "`[tokens * top_k, inter]` SwiGLU activations per slot (16-byte aligned).").len("tokens * top_k * inter").aligned(),
            field("out", write(F32), "`[tokens * top_k, hidden]` weighted expert outputs per slot.").len("tokens * top_k * hidden"),
            field("tokens", U32, "Number of tokens."),
            field("hidden", U32, "Hidden size (a multiple of 16 for 8-bit, 32 for 4-bit)."),
            field("inter", U32, "Expert intermediate size (a multiple of 16 for 8-bit, 32 for 4-bit)."),
            field("experts", U32, "Number of experts."),
            field("top_k", U32, "Experts per token."),
            field("group_size", U32, "Stored columns per group of every stack (4-bit: INT4 and LUT4, a multiple of 32); 0 for 8-bit."),
            field("w13_row_bytes", U32, "Code bytes per row of w1 and w3."),
            field("w13_row_params", U32, "f32 parameters per row of w1 and w3."),
            field("w2_row_bytes", U32, "Code bytes per row of w2."),
            field("w2_row_params", U32, "f32 parameters per row of w2."),
        ],
    },
    ParamStruct {
        name: "DequantParams",
        doc: "A stack of `count` packed matrices `[rows, cols]` expanded to bf16 in input-column order: \
              `out[m, r, perm[m, j]] = bf16(w[m, r, j])` for every stored column j (perm absent: `out[m, r, j]`).",
        fields: &[
            field("codes", read(U8), "`[count, rows, row_bytes]` codes (16-byte aligned).").len("count * rows * row_bytes").aligned(),
            field("params", read(F32), "`[count, rows, row_params]` parameters.").len("count * rows * row_params"),
            field("perm", read(U32E), "`[count, cols]` input column of each stored column, or null.").len("count * cols").nullable(),
            field("table", read(F32), "`[QUANT_TABLE_VALUES]` values of the 4-bit codes (LUT4; null for the other kinds).").len("QUANT_TABLE_VALUES").nullable(),
            field("out", write(Bf16), "`[count, rows, cols]` dequantized matrices (16-byte aligned).").len("count * rows * cols").aligned(),
            field("count", U32, "Matrices in the stack."),
            field("rows", U32, "Rows of each matrix."),
            field("cols", U32, "Columns of each matrix (a multiple of 16 for 8-bit, 32 for 4-bit)."),
            field("row_bytes", U32, "Code bytes per row."),
            field("row_params", U32, "f32 parameters per row."),
            field("group_size", U32, "Stored columns per group (4-bit: INT4 and LUT4, a multiple of 32); 0 for 8-bit."),
        ],
    },
];

/// Every kernel family and its compiled instantiations.
pub const FAMILIES: &[Family] = &[
    Family {
        name: "embedding",
        rust_name: "Embedding",
        file: "embedding",
        params: "EmbeddingParams",
        axes: &[OUT_F32_AXIS],
    },
    Family {
        name: "rmsnorm",
        rust_name: "Rmsnorm",
        file: "rmsnorm",
        params: "RmsnormParams",
        axes: &[Axis {
            name: "ADD",
            values: &[v(0, "plain"), v(1, "add_bf16"), v(2, "add_f32")],
        }],
    },
    Family {
        name: "rope_kv",
        rust_name: "RopeKv",
        file: "rope_kv",
        params: "RopeKvParams",
        axes: &[],
    },
    Family {
        name: "router",
        rust_name: "Router",
        file: "router",
        params: "RouterParams",
        axes: &[],
    },
    Family {
        name: "moe_up",
        rust_name: "MoeUp",
        file: "moe_gemv",
        params: "MoeParams",
        axes: &[Axis {
            name: "TILE",
            values: &[v(1, "t1"), v(2, "t2"), v(4, "t4"), v(8, "t8")],
        }],
    },
    Family {
        name: "moe_down",
        rust_name: "MoeDown",
        file: "moe_gemv",
        params: "MoeParams",
        axes: &[Axis {
            name: "TILE",
            values: &[v(1, "t1"), v(2, "t2"), v(4, "t4"), v(8, "t8")],
        }],
    },
    Family {
        name: "moe_mma_up",
        rust_name: "MoeMmaUp",
        file: "moe_gemv",
        params: "MoeParams",
        axes: &[MAX_NT_AXIS],
    },
    Family {
        name: "moe_mma_down",
        rust_name: "MoeMmaDown",
        file: "moe_gemv",
        params: "MoeParams",
        axes: &[MAX_NT_AXIS],
    },
    Family {
        name: "attention_decode",
        rust_name: "AttentionDecode",
        file: "attention_decode",
        params: "AttentionDecodeParams",
        axes: &[
            Axis {
                name: "HEAD_DIM",
                values: &[v(16, "d16"), v(32, "d32"), v(64, "d64"), v(128, "d128")],
            },
            Axis {
                name: "GROUP",
                values: &[v(1, "g1"), v(2, "g2"), v(4, "g4"), v(6, "g6"), v(8, "g8")],
            },
        ],
    },
    Family {
        name: "attention_decode_mma",
        rust_name: "AttentionDecodeMma",
        file: "attention_decode",
        params: "AttentionDecodeParams",
        axes: &[
            Axis {
                name: "HEAD_DIM",
                values: &[v(64, "d64"), v(128, "d128")],
            },
            Axis {
                name: "GROUP",
                values: &[v(4, "g4"), v(6, "g6"), v(8, "g8")],
            },
        ],
    },
    Family {
        name: "argmax",
        rust_name: "Argmax",
        file: "sampling",
        params: "ArgmaxParams",
        axes: &[],
    },
    // --- linear ---
    Family {
        name: "linear_gemv",
        rust_name: "LinearGemv",
        file: "linear",
        params: "LinearParams",
        axes: &[
            Axis {
                name: "TILE",
                values: &[v(1, "t1"), v(2, "t2"), v(4, "t4"), v(8, "t8")],
            },
            OUT_F32_AXIS,
        ],
    },
    Family {
        name: "linear_mma",
        rust_name: "LinearMma",
        file: "linear",
        params: "LinearParams",
        axes: &[OUT_F32_AXIS],
    },
    Family {
        name: "linear_mma_decode",
        rust_name: "LinearMmaDecode",
        file: "linear",
        params: "LinearParams",
        axes: &[NT_AXIS, OUT_F32_AXIS],
    },
    // --- moe_grouped ---
    Family {
        name: "moe_grouped_up",
        rust_name: "MoeGroupedUp",
        file: "moe_grouped",
        params: "MoeParams",
        axes: &[],
    },
    Family {
        name: "moe_grouped_down",
        rust_name: "MoeGroupedDown",
        file: "moe_grouped",
        params: "MoeParams",
        axes: &[],
    },
    // --- attention_prefill ---
    Family {
        name: "attention_prefill",
        rust_name: "AttentionPrefill",
        file: "attention_prefill",
        params: "AttentionPrefillParams",
        axes: &[Axis {
            name: "HEAD_DIM",
            values: &[v(16, "d16"), v(32, "d32"), v(64, "d64"), v(128, "d128")],
        }],
    },
    // --- sample ---
    Family {
        name: "sample",
        rust_name: "Sample",
        file: "sampling",
        params: "SampleParams",
        axes: &[],
    },
    // --- fill ---
    Family {
        name: "fill_random",
        rust_name: "FillRandom",
        file: "fill",
        params: "FillParams",
        axes: &[],
    },
    // --- quant ---
    Family {
        name: "qlinear",
        rust_name: "QLinear",
        file: "qlinear",
        params: "QLinearParams",
        axes: &[KIND_AXIS, TILE_AXIS, OUT_F32_AXIS],
    },
    Family {
        name: "qmoe_up",
        rust_name: "QMoeUp",
        file: "qmoe",
        params: "QMoeParams",
        axes: &[KIND_AXIS, TILE_AXIS],
    },
    Family {
        name: "qmoe_down",
        rust_name: "QMoeDown",
        file: "qmoe",
        params: "QMoeParams",
        axes: &[KIND_AXIS, TILE_AXIS],
    },
    Family {
        name: "qlinear_mma",
        rust_name: "QLinearMma",
        file: "qlinear",
        params: "QLinearParams",
        axes: &[MMA_KIND_AXIS, NT_AXIS, OUT_F32_AXIS],
    },
    Family {
        name: "qmoe_mma_up",
        rust_name: "QMoeMmaUp",
        file: "qmoe",
        params: "QMoeParams",
        axes: &[MMA_KIND_AXIS, MAX_NT_AXIS],
    },
    Family {
        name: "qmoe_mma_down",
        rust_name: "QMoeMmaDown",
        file: "qmoe",
        params: "QMoeParams",
        axes: &[MMA_KIND_AXIS, MAX_NT_AXIS],
    },
    Family {
        name: "dequantize",
        rust_name: "Dequantize",
        file: "dequant",
        params: "DequantParams",
        axes: &[KIND_AXIS],
    },
];

/// The element format axis of the quantized kernels (values: the QUANT_KIND_* constants).
const KIND_AXIS: Axis = Axis {
    name: "KIND",
    values: &[v(0, "fp8"), v(1, "int8"), v(2, "int4"), v(3, "lut4")],
};

/// The element formats the tensor-core decode kernels read (values: the QUANT_KIND_* constants).
const MMA_KIND_AXIS: Axis = Axis {
    name: "KIND",
    values: &[v(0, "fp8"), v(1, "int8"), v(2, "int4")],
};

/// 8-column n-tiles of the dense tensor-core decode kernels (8 or 16 tokens a pass).
const NT_AXIS: Axis = Axis {
    name: "NT",
    values: &[v(1, "n8"), v(2, "n16")],
};

/// The output element of the dense projections (bf16 or f32).
const OUT_F32_AXIS: Axis = Axis {
    name: "OUT_F32",
    values: &[v(0, "bf16"), v(1, "f32")],
};

/// Most 8-column n-tiles per weight pass of the 4-bit tensor-core expert kernels (8, 16 or 32 slots).
const MAX_NT_AXIS: Axis = Axis {
    name: "MAX_NT",
    values: &[v(1, "n8"), v(2, "n16"), v(4, "n32")],
};

/// Tokens (slots) per weight pass of the quantized GEMVs.
const TILE_AXIS: Axis = Axis {
    name: "TILE",
    values: &[v(1, "t1"), v(2, "t2"), v(4, "t4"), v(8, "t8")],
};

/// An argument of a host entry point of the CUTLASS shim (`csrc/cutlass/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShimArg {
    /// A `uint32_t` / `u32` of this name.
    U32(&'static str),
    /// `const <struct>* params`: a parameter struct of [`STRUCTS`], read on the host only.
    Params(&'static str),
    /// `void* stream` / `*mut c_void`: the `cudaStream_t` (a `CUstream`) the work is enqueued on.
    Stream,
}

/// What a host entry point of the CUTLASS shim returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShimReturn {
    /// `size_t` / `usize`: a workspace size in bytes.
    Bytes,
    /// `int` / `i32`: 0, a `cudaError_t` (below `MOE_CUTLASS_STATUS_BASE`), or
    /// `MOE_CUTLASS_STATUS_BASE` + a `cutlass::Status`.
    Status,
}

/// A host entry point of the CUTLASS shim: declared once in `csrc/generated/shims.h` (which every
/// definition in `csrc/cutlass/` must match, or nvcc rejects it) and in `src/cuda/shims.rs`.
#[derive(Debug, Clone, Copy)]
pub struct Shim {
    /// The C symbol, `mx_...`.
    pub name: &'static str,
    /// What it computes.
    pub doc: &'static str,
    /// Its arguments, in order.
    pub args: &'static [ShimArg],
    /// What it returns.
    pub returns: ShimReturn,
}

/// The arguments of a grouped expert GEMM's workspace query.
const EXPERTS_ON_SMS: &[ShimArg] = &[ShimArg::U32("experts"), ShimArg::U32("sm_count")];

/// Every host entry point of the CUTLASS shim.
pub const SHIMS: &[Shim] = &[
    Shim {
        name: "mx_moe_cutlass_workspace_bytes",
        doc: "Workspace bytes of the bf16 grouped expert GEMMs of `experts` experts on `sm_count` SMs (csrc/cutlass/moe_experts_sm90.cu).",
        args: EXPERTS_ON_SMS,
        returns: ShimReturn::Bytes,
    },
    Shim {
        name: "mx_moe_cutlass_run",
        doc: "The bf16 expert MLPs of a prefill chunk (the six steps of csrc/cutlass/moe_experts_sm90.cu) on `stream`.",
        args: &[ShimArg::Params("MoeCutlassParams"), ShimArg::Stream],
        returns: ShimReturn::Status,
    },
    Shim {
        name: "mx_moe_cutlass_fp8_workspace_bytes",
        doc: "Workspace bytes of the FP8 grouped expert GEMMs of `experts` experts on `sm_count` SMs (csrc/cutlass/moe_experts_q8_sm90.cu).",
        args: EXPERTS_ON_SMS,
        returns: ShimReturn::Bytes,
    },
    Shim {
        name: "mx_moe_cutlass_fp8_run",
        doc: "The expert MLPs of a prefill chunk over FP8 E4M3 stacks (csrc/cutlass/moe_experts_q8.cuh) on `stream`.",
        args: &[ShimArg::Params("MoeCutlassQ8Params"), ShimArg::Stream],
        returns: ShimReturn::Status,
    },
    Shim {
        name: "mx_moe_cutlass_int8_workspace_bytes",
        doc: "Workspace bytes of the INT8 grouped expert GEMMs of `experts` experts on `sm_count` SMs (csrc/cutlass/moe_experts_q8_sm90.cu).",
        args: EXPERTS_ON_SMS,
        returns: ShimReturn::Bytes,
    },
    Shim {
        name: "mx_moe_cutlass_int8_run",
        doc: "The expert MLPs of a prefill chunk over INT8 stacks (csrc/cutlass/moe_experts_q8.cuh) on `stream`.",
        args: &[ShimArg::Params("MoeCutlassQ8Params"), ShimArg::Stream],
        returns: ShimReturn::Status,
    },
    Shim {
        name: "mx_linear_cutlass_bf16_workspace_bytes",
        doc: "Workspace bytes of the bf16-output dense GEMM of `params`' shape on its `sm_count` SMs (its buffers unused; csrc/cutlass/linear_sm90.cu).",
        args: &[ShimArg::Params("LinearCutlassParams")],
        returns: ShimReturn::Bytes,
    },
    Shim {
        name: "mx_linear_cutlass_bf16_run",
        doc: "The bf16-output dense GEMM of csrc/cutlass/linear_sm90.cuh on `stream`.",
        args: &[ShimArg::Params("LinearCutlassParams"), ShimArg::Stream],
        returns: ShimReturn::Status,
    },
    Shim {
        name: "mx_linear_cutlass_f32_workspace_bytes",
        doc: "Workspace bytes of the f32-output dense GEMM of `params`' shape on its `sm_count` SMs (its buffers unused; csrc/cutlass/linear_sm90.cu).",
        args: &[ShimArg::Params("LinearCutlassParams")],
        returns: ShimReturn::Bytes,
    },
    Shim {
        name: "mx_linear_cutlass_f32_run",
        doc: "The f32-output dense GEMM of csrc/cutlass/linear_sm90.cuh on `stream`.",
        args: &[ShimArg::Params("LinearCutlassParams"), ShimArg::Stream],
        returns: ShimReturn::Status,
    },
];
