//! The sharded plan on CPU-simulated ranks ([`ShardedCpuEngine`]) against the golden fixtures and
//! the unsharded CPU engine: tensor parallel (TP), expert parallel (EP) and both; the bytes each
//! rank reads; quantized formats that can and cannot be split.
//!
//! Tolerances, derived before running:
//! - EP with `tp = 1` changes no sum: attention is replicated; the embedding all-reduce adds zero
//!   rows (`v + 0 = v` exactly); the LM head's all-gather only moves values; and the MoE output
//!   of a token, `(0 + w_a y_a) + w_b y_b` in increasing expert order on one rank, becomes the
//!   rank-order sum of the ranks' partials, which for contiguous expert blocks and `top_k <= 2`
//!   is the same two additions in the same order (a partial holding no expert is exactly 0).
//!   So EP=2 logits must EQUAL the unsharded engine's.
//! - TP changes two sums per layer: each o_proj and w2 output element, a dot product of length
//!   `k` (`q_width` / `intermediate_size`), becomes `tp` partial dots of length `k / tp` added in
//!   rank order. Both orders are f32 evaluations of the same exact sum, each within
//!   `gamma_k * sum |x_i w_i|` of it (`gamma_k = k u / (1 - k u)`, `u = 2^-24`), so they differ by
//!   at most `2 gamma_k sum |x_i w_i|`: checked element by element through the real all-reduce in
//!   `tp_partial_sums_stay_within_the_reordering_bound`. End to end, such reorderings are the
//!   same kind of difference as between the unsharded engine and transformers (which also sums in
//!   other orders) and of the same size (one `gamma_k` per reduction), so the sharded engine must
//!   meet the golden tests' own tolerances against transformers: greedy ids equal, per-token
//!   log-probs within 1e-4, perplexity within 1e-4 relative, last logits within 1e-5 relative L2.

use crate::common;

use common::golden::{fixture_dirs, read_golden, Golden};
use common::greedy::greedy_steps;
use common::numeric::{max_abs_diff, random_values};
use common::repo::root;
use mixtral::cpu::matmul::matmul;
use mixtral::cpu::{CpuEngine, CpuEngineOptions};
use mixtral::dtype::WeightSlice;
use mixtral::generate::perplexity;
use mixtral::shard::engine::DEFAULT_TIMEOUT;
use mixtral::shard::{
    cpu_group, Collective, Layout, RankWeights, ReadLog, ShardError, ShardPlan, ShardWeightError,
    ShardedCpuEngine, ShardedOptions,
};
use mixtral::{Engine, LoadOptions, LogitsFor, Model, SeqStep};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const LOGPROB_TOLERANCE: f64 = 1e-4;
const PERPLEXITY_REL: f64 = 1e-4;
const LOGITS_REL_L2: f64 = 1e-5;

const TP2: Layout = Layout { tp: 2, ep: 1 };
const TP4: Layout = Layout { tp: 4, ep: 1 };
const EP2: Layout = Layout { tp: 1, ep: 2 };
const TP2_EP2: Layout = Layout { tp: 2, ep: 2 };

fn cpu_options() -> CpuEngineOptions {
    CpuEngineOptions {
        max_context: Some(256),
        block_size: 4,
        ..Default::default()
    }
}

fn sharded(model: &Model, layout: Layout) -> Result<ShardedCpuEngine, ShardError> {
    let options = ShardedOptions {
        layout,
        cpu: cpu_options(),
        timeout: DEFAULT_TIMEOUT,
    };
    ShardedCpuEngine::new(&model.weights, &options)
}

fn load(dir: &Path) -> Model {
    Model::load(dir, &LoadOptions::default()).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// Logits of every position of `ids` fed in one step.
fn all_logits(engine: &mut dyn Engine, ids: &[u32]) -> Vec<f32> {
    let seq = engine.new_sequence().unwrap();
    let out = engine
        .step(&[SeqStep {
            seq,
            tokens: ids,
            start_pos: 0,
            logits: LogitsFor::All,
        }])
        .unwrap();
    engine.free_sequence(seq).unwrap();
    out.logits
}

fn rel_l2(out: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len());
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&o, &r) in out.iter().zip(reference) {
        diff += (o as f64 - r).powi(2);
        norm += r * r;
    }
    (diff / norm).sqrt()
}

/// Checks one sharded engine against a fixture's transformers outputs.
fn check_golden(dir: &Path, golden: &Golden, engine: &mut ShardedCpuEngine) {
    let name = format!("{} {}", dir.display(), engine.layout());
    let got = greedy_steps(engine, &golden.prompt_ids, golden.greedy_ids.len());
    assert_eq!(got, golden.greedy_ids, "{name}: greedy ids");
    assert_eq!(engine.free_kv_blocks(), engine.total_kv_blocks(), "{name}");

    let sequence: Vec<u32> = golden
        .prompt_ids
        .iter()
        .chain(&golden.greedy_ids)
        .copied()
        .collect();
    let scored = perplexity(engine, &sequence).unwrap();
    let worst = max_abs_diff(&scored.token_logprobs, &golden.token_logprobs);
    let rel_ppl = (scored.perplexity - golden.perplexity).abs() / golden.perplexity;
    let all = all_logits(engine, &sequence);
    let vocab = engine.config().vocab_size;
    let last = &all[all.len() - vocab..];
    let rel = rel_l2(last, &golden.last_logits);
    eprintln!(
        "{name}: max |logprob diff| {worst:.2e}, ppl rel {rel_ppl:.2e}, last logits {rel:.2e}"
    );
    assert_eq!(scored.token_logprobs.len(), golden.token_logprobs.len());
    assert!(worst <= LOGPROB_TOLERANCE, "{name}: logprob diff {worst:e}");
    assert!(
        rel_ppl <= PERPLEXITY_REL,
        "{name}: perplexity rel {rel_ppl:e}"
    );
    assert!(rel <= LOGITS_REL_L2, "{name}: last logits rel L2 {rel:e}");
}

#[test]
fn tp2_ep2_tp4_and_tp2xep2_reproduce_every_golden_fixture() {
    let mut ran: BTreeMap<Layout, usize> = BTreeMap::new();
    for dir in fixture_dirs() {
        let golden = read_golden(&dir);
        let model = load(&dir);
        for layout in [TP2, EP2, TP4, TP2_EP2] {
            match sharded(&model, layout) {
                Ok(mut engine) => {
                    check_golden(&dir, &golden, &mut engine);
                    *ran.entry(layout).or_default() += 1;
                }
                // Only a size the layout does not divide may refuse (named in the error).
                Err(ShardError::Plan(e)) => eprintln!("{} {layout}: {e}", dir.display()),
                Err(e) => panic!("{} {layout}: {e}", dir.display()),
            }
        }
    }
    let dense = 1; // mistral-dense-bf16 has one MLP: no expert parallelism.
    let all = fixture_dirs().len();
    assert_eq!(ran.get(&TP2), Some(&all), "TP=2 on every fixture: {ran:?}");
    assert_eq!(
        ran.get(&EP2),
        Some(&(all - dense)),
        "EP=2 on every MoE fixture: {ran:?}"
    );
    assert!(
        ran.get(&TP4).is_some_and(|&n| n >= 1),
        "TP=4 where the heads divide: {ran:?}"
    );
    assert!(ran.get(&TP2_EP2).is_some_and(|&n| n >= 1), "{ran:?}");
}

#[test]
fn expert_parallel_logits_equal_the_unsharded_engine() {
    for dir in fixture_dirs() {
        let model = load(&dir);
        if model.config.num_experts < 2 || model.config.experts_per_token > 2 {
            continue;
        }
        let golden = read_golden(&dir);
        let ids: Vec<u32> = golden
            .prompt_ids
            .iter()
            .chain(&golden.greedy_ids)
            .copied()
            .collect();
        let mut reference = CpuEngine::new(Arc::clone(&model.weights), cpu_options()).unwrap();
        let want = all_logits(&mut reference, &ids);
        let mut ep2 = sharded(&model, EP2).unwrap();
        let got = all_logits(&mut ep2, &ids);
        assert!(want == got, "{}: EP=2 logits differ", dir.display());
    }
}

#[test]
fn tp_partial_sums_stay_within_the_reordering_bound() {
    // An o_proj-shaped product: x [tokens, k] times W [n, k], W split into tp column blocks, each
    // rank's partial summed by the CPU all-reduce, against the unsharded matmul.
    let (tokens, n, k) = (3usize, 40usize, 128usize);
    let x = random_values(1, tokens * k, 1.0);
    let w = random_values(2, n * k, 0.5);
    let mut full = vec![0.0f32; tokens * n];
    matmul(&x, WeightSlice::F32(&w), n, k, &mut full);
    let u = 2f64.powi(-24);
    let gamma = k as f64 * u / (1.0 - k as f64 * u);
    for tp in [2usize, 4] {
        let width = k / tp;
        let handles: Vec<_> = cpu_group(tp, DEFAULT_TIMEOUT)
            .into_iter()
            .map(|mut c| {
                let (x, w) = (x.clone(), w.clone());
                std::thread::spawn(move || {
                    let cols = c.rank() * width..(c.rank() + 1) * width;
                    let xs: Vec<f32> = x.chunks(k).flat_map(|r| r[cols.clone()].to_vec()).collect();
                    let ws: Vec<f32> = w.chunks(k).flat_map(|r| r[cols.clone()].to_vec()).collect();
                    let mut part = vec![0.0f32; tokens * n];
                    matmul(&xs, WeightSlice::F32(&ws), n, width, &mut part);
                    c.all_reduce::<f32>(&mut part).unwrap();
                    part
                })
            })
            .collect();
        let results: Vec<Vec<f32>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for r in &results[1..] {
            assert_eq!(r, &results[0], "every rank holds the same sum");
        }
        let mut differs = 0;
        for t in 0..tokens {
            for j in 0..n {
                let abs_sum: f64 = (0..k)
                    .map(|i| (x[t * k + i] as f64 * w[j * k + i] as f64).abs())
                    .sum();
                let (a, b) = (results[0][t * n + j] as f64, full[t * n + j] as f64);
                assert!(
                    (a - b).abs() <= 2.0 * gamma * abs_sum,
                    "tp={tp} [{t},{j}]: {a} vs {b}, bound {}",
                    2.0 * gamma * abs_sum
                );
                differs += usize::from(a != b);
            }
        }
        eprintln!(
            "tp={tp}: {differs} of {} elements differ in the last bits",
            tokens * n
        );
    }
}

/// Bytes of a weight as stored.
fn bytes_of(w: &mixtral::weights::Weight) -> u64 {
    w.tensor.stored_bytes() as u64
}

#[test]
fn a_rank_reads_only_its_own_bytes() {
    let model = load(&root().join("models/tiny-mixtral"));
    let weights = &model.weights;
    let c = &model.config;
    // Replicated on every rank: norms, routers and, without TP, the attention projections;
    // everything else (experts, embedding, LM head; attention with TP) is split in two.
    let replicated_of = |layout: Layout| -> u64 {
        weights
            .layers
            .iter()
            .map(|l| {
                let attention = [&l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj];
                let attention: u64 = attention.into_iter().map(bytes_of).sum();
                bytes_of(&l.attn_norm)
                    + bytes_of(&l.ffn_norm)
                    + l.router.as_ref().map_or(0, bytes_of)
                    + if layout.tp == 1 { attention } else { 0 }
            })
            .sum::<u64>()
            + bytes_of(&weights.final_norm)
    };
    let total = weights.total_bytes();
    for layout in [TP2, EP2] {
        let replicated = replicated_of(layout);
        let plan = ShardPlan::new(c, layout).unwrap();
        let mut logs = Vec::new();
        for shard in &plan.ranks {
            let mut log = ReadLog::default();
            RankWeights::new(weights, shard, &mut log).unwrap();
            // Half of every split tensor plus all of the replicated ones.
            assert_eq!(
                log.total_bytes(),
                (total - replicated) / 2 + replicated,
                "{layout} rank {}",
                shard.rank
            );
            logs.push(log);
        }
        // The two ranks' reads of each split tensor are disjoint and cover it.
        let mut by_tensor: BTreeMap<String, Vec<std::ops::Range<usize>>> = BTreeMap::new();
        for log in &logs {
            for r in &log.reads {
                by_tensor
                    .entry(r.tensor.clone())
                    .or_default()
                    .push(r.bytes.clone());
            }
        }
        for (tensor, mut ranges) in by_tensor {
            let len = weights
                .all()
                .into_iter()
                .find(|w| w.tensor.name() == tensor)
                .map(|w| w.tensor.stored_bytes())
                .unwrap();
            ranges.sort_by_key(|r| r.start);
            let is_replicated = tensor.contains("norm")
                || tensor.contains("gate.")
                || (layout.tp == 1 && tensor.contains("self_attn"));
            if is_replicated {
                assert_eq!(ranges, vec![0..len, 0..len], "{tensor}");
                continue;
            }
            let mut at = 0;
            for r in &ranges {
                assert_eq!(r.start, at, "{layout} {tensor}: gap or overlap at {at}");
                at = r.end;
            }
            assert_eq!(at, len, "{layout} {tensor}");
        }
        if layout == EP2 {
            // Whole experts: rank 0 never reads an expert of rank 1.
            let half = c.num_experts / 2;
            assert!(logs[0]
                .reads
                .iter()
                .filter(|r| r.tensor.contains(".experts."))
                .all(|r| (0..half).any(|e| r.tensor.contains(&format!(".experts.{e}.")))));
        }
    }
    // The engine reports the same counts.
    let engine = sharded(&model, TP2).unwrap();
    let replicated = replicated_of(TP2);
    let expected = (total - replicated) / 2 + replicated;
    assert_eq!(engine.read_bytes(), &[expected, expected]);
}

fn quant_dir(name: &str) -> PathBuf {
    root().join("tests/fixtures/quant").join(name)
}

#[test]
fn fp8_and_int8_split_like_their_unsharded_engine() {
    for name in ["fp8-channel", "fp8-tensor", "int8-channel", "gptq"] {
        let model = load(&quant_dir(name));
        let expected: Value = serde_json::from_str(
            &std::fs::read_to_string(quant_dir(name).join("expected.json")).unwrap(),
        )
        .unwrap();
        let ids: Vec<u32> = expected["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let mut reference = CpuEngine::new(Arc::clone(&model.weights), cpu_options()).unwrap();
        let want_greedy = greedy_steps(&mut reference, &ids[..4], 8);
        let want = perplexity(&mut reference, &ids).unwrap();
        // GPTQ groups of 32 cannot be cut at w2's 48 columns: EP only (see the next test).
        let layouts: &[Layout] = if name == "gptq" {
            &[EP2]
        } else {
            &[TP2, EP2, TP2_EP2]
        };
        for &layout in layouts {
            let mut engine = sharded(&model, layout).unwrap();
            assert_eq!(
                greedy_steps(&mut engine, &ids[..4], 8),
                want_greedy,
                "{name} {layout}"
            );
            let got = perplexity(&mut engine, &ids).unwrap();
            let worst = max_abs_diff(&got.token_logprobs, &want.token_logprobs);
            assert!(worst <= LOGPROB_TOLERANCE, "{name} {layout}: {worst:e}");
        }
    }
}

/// A rank keeps its pieces of quantized matrices packed: every projection and expert part of a
/// quantized fixture has a packed form, and holds its codes and parameters, never 4-byte f32
/// elements: the 8-bit kinds hold 1 byte a weight plus one f32 scale per row (4 / cols, under 0.3
/// at these fixtures' widths), GPTQ 0.5 bytes of codes plus an f32 scale and zero per group of 32
/// (8 / 32 = 0.25), so 0.75 in all.
#[test]
fn quantized_parts_stay_packed_on_every_rank() {
    for (name, layout, bytes_per_weight) in [
        ("fp8-channel", TP2, 1.3),
        ("int8-channel", TP2_EP2, 1.3),
        ("gptq", EP2, 0.76),
    ] {
        let model = load(&quant_dir(name));
        let plan = ShardPlan::new(&model.weights.config, layout).unwrap();
        for shard in &plan.ranks {
            let rank = RankWeights::new(&model.weights, shard, &mut ReadLog::default()).unwrap();
            for (l, layer) in rank.layers.iter().enumerate() {
                let experts = layer.experts.iter().flat_map(|e| [&e.w1, &e.w2, &e.w3]);
                let attention = [&layer.q_proj, &layer.k_proj, &layer.v_proj, &layer.o_proj];
                for part in attention.into_iter().chain(experts) {
                    let what = format!("{name} {layout} rank {} layer {l}", shard.rank);
                    let packed = part
                        .packed()
                        .unwrap_or_else(|| panic!("{what}: not packed"));
                    assert_eq!((packed.rows, packed.cols), (part.rows, part.cols), "{what}");
                    let held = part.owned_bytes() as f64 / (part.rows * part.cols) as f64;
                    assert!(held < bytes_per_weight, "{what}: {held} bytes a weight");
                }
            }
        }
    }
}

#[test]
fn int4_that_cannot_be_cut_is_a_typed_error_naming_the_tensor() {
    let cases = [
        ("gptq-actorder", "int4 act-order"),
        ("gptq", "int4 groups of 32"),
    ];
    for (name, format) in cases {
        let model = load(&quant_dir(name));
        match sharded(&model, TP2) {
            Err(ShardError::Weights(ShardWeightError::Unsliceable {
                tensor,
                format: f,
                how,
                ..
            })) => {
                assert_eq!(f, format, "{name}");
                assert_eq!(how, "columns");
                assert!(
                    tensor.ends_with("_proj.weight") || tensor.ends_with(".w2.weight"),
                    "{tensor}"
                );
            }
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn layouts_the_model_cannot_take_are_refused_naming_the_value() {
    let model = load(&root().join("models/tiny-mixtral"));
    let error = sharded(&model, Layout { tp: 4, ep: 1 }).unwrap_err();
    assert!(
        error.to_string().contains("num_key_value_heads = 2"),
        "{error}"
    );
    let error = sharded(&model, Layout { tp: 1, ep: 3 }).unwrap_err();
    assert!(
        error.to_string().contains("num_local_experts = 8"),
        "{error}"
    );
}

#[test]
fn split_runs_are_deterministic_and_a_batch_equals_each_sequence_alone() {
    // Every reduction has one fixed order and every kernel computes an element the same way
    // whatever the token count, so these are exact equalities.
    let model = load(&root().join("models/tiny-mixtral"));
    let golden = read_golden(&root().join("models/tiny-mixtral"));
    let a: Vec<u32> = golden.prompt_ids.clone();
    let b: Vec<u32> = golden.greedy_ids.iter().rev().copied().collect();
    for layout in [TP2, EP2, TP2_EP2] {
        let first = all_logits(&mut sharded(&model, layout).unwrap(), &a);
        let again = all_logits(&mut sharded(&model, layout).unwrap(), &a);
        assert!(first == again, "{layout}: two runs differ");

        let mut engine = sharded(&model, layout).unwrap();
        let alone_b = all_logits(&mut engine, &b);
        let (sa, sb) = (
            engine.new_sequence().unwrap(),
            engine.new_sequence().unwrap(),
        );
        let out = engine
            .step(&[
                SeqStep {
                    seq: sa,
                    tokens: &a,
                    start_pos: 0,
                    logits: LogitsFor::All,
                },
                SeqStep {
                    seq: sb,
                    tokens: &b,
                    start_pos: 0,
                    logits: LogitsFor::All,
                },
            ])
            .unwrap();
        let vocab = engine.config().vocab_size;
        assert_eq!(out.len(), a.len() + b.len());
        assert!(
            out.logits[..a.len() * vocab] == first[..],
            "{layout}: batch row of a"
        );
        assert!(
            out.logits[a.len() * vocab..] == alone_b[..],
            "{layout}: batch row of b"
        );
    }
}

#[test]
fn a_ranks_parts_name_their_tensor_and_piece() {
    let model = load(&root().join("models/tiny-mixtral"));
    let plan = ShardPlan::new(&model.config, TP2).unwrap();
    let shard = &plan.ranks[1];
    let mut log = ReadLog::default();
    let rank = RankWeights::new(&model.weights, shard, &mut log).unwrap();
    let (whole, part) = (&model.weights.layers[0], &rank.layers[0]);
    // q_proj is cut by rows (rank 1's heads), o_proj by columns.
    let q = whole.q_proj.tensor.name();
    let rows = part.q_proj.rows;
    assert_eq!(part.q_proj.name(), format!("{q} rows {rows}..{}", 2 * rows));
    let o = whole.o_proj.tensor.name();
    let cols = part.o_proj.cols;
    assert_eq!(
        part.o_proj.name(),
        format!("{o} columns {cols}..{}", 2 * cols)
    );
}
