#!/usr/bin/env python3
"""Writes quantized checkpoints of a tiny Mixtral with the real quantization libraries, and what
each library's own reader computes on them, under tests/fixtures/real-quant/<name>/.

Unlike scripts/make-quant-fixtures.py (which packs the tensors itself, so a misreading of a format
would be mirrored on both sides), every file here is written by the library, and every expected
number comes from the library's own dequantization.

Run (each library in its own virtual environment; a fixture whose library is not installed at the
pinned version is skipped and its committed files are left as they are). The base model is built
once under transformers 5 and handed to the older environments, whose Mixtral draws the initial
weights in another order:

    PY=/work/venv-realfix/bin/python          # or any environment below
    $PY scripts/make-real-quant-fixtures.py --save-base /tmp/base
    $PY scripts/make-real-quant-fixtures.py --base /tmp/base [--only NAME ...]

Environments used for the committed files (Python 3.11.7, torch 2.15.0, CPU only, no GPU; each a
venv over the torch environment with `pip install --no-deps`, so torch stays as it is; made by
`scripts/make-real-quant-envs TORCH_PYTHON DEST`):
  main:   transformers 5.25.0, safetensors 0.8.0, llmcompressor 0.14.0.1, compressed-tensors 0.19.0,
          gptqmodel 7.7.0, bitsandbytes 0.50.2, accelerate 1.16.0, datasets 5.2.0
  legacy: transformers 4.57.1, tokenizers 0.22.1, huggingface_hub 0.36.0, gptqmodel 5.4.2,
          llmcompressor 0.9.0.5, compressed-tensors 0.13.0, datasets 3.6.0 (GPTQModel 5.4 and
          llm-compressor 0.9 need transformers 4)
  awq:    transformers 4.51.3, tokenizers 0.21.4, huggingface_hub 0.36.0, autoawq 0.2.9 (its last
          release imports names removed in transformers 4.57; its sdist's setup.py fails under
          current setuptools, so its `awq` package was copied into site-packages from the sdist)
Every library asked for ran on the CPU. What it took:
  - GPTQModel 5.4 refuses to import on a 2-core machine (its loader pool asks for 2 workers out of
    cpu_count // 2): the script reports 4 CPUs to it through os.cpu_count. Its lazy ("turtle")
    loading asserts an accelerator: offload_to_disk=False. Its Mixtral definition never expands
    its `{expert_index}` module template (no dynamic_expert_index): the script sets it to
    num_local_experts.
  - GPTQModel 7.7 wants GPTQMODEL_CPU_WORKERS >= 2 on this machine; its AWQ asks for projection
    outputs that are multiples of 64 (hence head_dim 32 below).
  - bitsandbytes under transformers 5 quantizes only nn.Linear modules: Mixtral's fused experts
    stay bf16, so the bnb checkpoints have 4-bit attention projections and bf16 experts.
  - llm-compressor 0.14 no longer writes act-order `group` (weight_g_idx); 0.9 does.

The base model: MixtralForCausalLM, bf16, hidden 64, intermediate 128, 2 layers, 4 heads of 32 (2 KV
heads), 4 experts top-2, vocab 512, untied LM head, weights drawn as in scripts/make-fixtures.py (its init_weights, seed BASE_SEED). A word-level tokenizer over the ids
("t0".."t511") is saved beside it because the libraries insist on loading one; it is not committed.

Calibration (GPTQ, AWQ): CALIB_SAMPLES sequences of CALIB_LEN ids, BOS then ids drawn from a
generator seeded with CALIB_SEED. torch runs in one thread with deterministic algorithms (GPTQModel
keeps its own 2-worker pool).

expected.json:
  {"name", "library": "llmcompressor 0.14.0.1 / compressed-tensors 0.19.0" etc., "format": the
   checkpoint's quantization_config method and format, "notes", "torch_version",
   "transformers_version",
   "score_ids": [int],          BOS + SCORE_LEN - 1 ids from a generator seeded with SCORE_SEED
   "token_logprobs": [float],   log p(score_ids[i] | score_ids[:i]), i = 1 .. len-1, one forward
   "perplexity": float,         exp(-mean(token_logprobs)), f64
   "prompt_ids": [int],         score_ids[:PROMPT_LEN]
   "greedy_ids": [int],         NEW_TOKENS tokens of greedy generate (EOS stopping disabled)
   "min_greedy_margin": float}  smallest top1 - top2 logit gap over the greedy steps
computed by dequantizing the saved tensors with the library's own functions in float32 (the
library's arithmetic, with its scales upcast exactly to f32 first, so that no bf16 rounding of the
product enters), writing an f32 checkpoint with the classic Mixtral tensor names and no
quantization_config, and running transformers' MixtralForCausalLM (eager attention and experts,
float32) on it. Weight-only: the FP8 checkpoints' activation scales are not applied (the crate's
engine computes activations in f32).
Readers: compressed-tensors: its format compressor's `decompress` (0.19) or `decompress_weight`
(0.13) (pack-quantized, float-quantized); GPTQModel: the checkpoint loaded with
`GPTQModel.load(backend=TORCH, dtype=float32)` and each quantized module's `dequantize_weight()`;
AWQ GEMM: the writing library's `dequantize_gemm` (AutoAWQ's, or GPTQModel's own copy);
bitsandbytes: `bitsandbytes.functional.dequantize_4bit` with the QuantState rebuilt from the saved
tensors by `QuantState.from_dict` (bit-identical to dequantizing the Linear4bit modules that
transformers loads from the checkpoint, with their QuantState's dtype set to f32; transformers' own
forward on that checkpoint keeps the embedding and router in bf16 and dequantizes to bf16, which
moves this random model's perplexity by 1-8%, so it is not the f32 reference). GPTQModel 5.4 also saves `model.rotary_emb.inv_freq`, which the
reference drops (transformers recomputes it).
"""

import argparse
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/fixtures/real-quant"

BASE_SEED = 11
CALIB_SEED = 5
CALIB_SAMPLES = 16
CALIB_LEN = 64
SCORE_SEED = 23
SCORE_LEN = 48
PROMPT_LEN = 8
NEW_TOKENS = 16
# f32 rounding-order differences between two engines are ~1e-5 in the logits; a smaller gap could
# flip a greedy token.
MIN_GREEDY_MARGIN = 1e-3

BASE_CONFIG = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_local_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    rms_norm_eps=1e-5,
)

LLMC = ("llmcompressor", "0.14.0.1"), ("compressed-tensors", "0.19.0")
LLMC09 = ("llmcompressor", "0.9.0.5"), ("compressed-tensors", "0.13.0")
GPTQ7 = (("gptqmodel", "7.7.0"),)
GPTQ5 = (("gptqmodel", "5.4.2"),)
BNB = (("bitsandbytes", "0.50.2"),)
AWQ = (("autoawq", "0.2.9"),)

# name -> (pinned packages, writer, writer options, notes)
FIXTURES = {
    "ct-w4a16-g32-sym": (LLMC, "llmc", dict(kind="int", bits=4, group=32, sym=True, actorder=None),
                         "llm-compressor GPTQModifier, int4 group 32 symmetric, no act-order (pack-quantized)"),
    "ct-w4a16-g32-asym": (LLMC, "llmc", dict(kind="int", bits=4, group=32, sym=False, actorder=None),
                          "llm-compressor GPTQModifier, int4 group 32 asymmetric (pack-quantized with weight_zero_point)"),
    "ct-w4a16-g32-actorder": (LLMC, "llmc", dict(kind="int", bits=4, group=32, sym=True, actorder="weight"),
                              "llm-compressor GPTQModifier, int4 group 32 symmetric, actorder weight (static: no g_idx stored)"),
    "ct013-w4a16-g32-group-actorder": (LLMC09, "llmc", dict(kind="int", bits=4, group=32, sym=True, actorder="group"),
                                       "llm-compressor 0.9 GPTQModifier, int4 group 32 symmetric, actorder group (weight_g_idx stored)"),
    "ct-w8a16-channel": (LLMC, "llmc", dict(kind="int", bits=8, group=None, sym=True, actorder=None),
                         "llm-compressor GPTQModifier, int8 per output channel symmetric (pack-quantized)"),
    "ct-fp8-channel": (LLMC, "llmc", dict(kind="fp8", scheme="FP8_DYNAMIC"),
                       "llm-compressor QuantizationModifier scheme FP8_DYNAMIC: FP8 weights per channel (float-quantized)"),
    "ct-fp8-tensor": (LLMC, "llmc", dict(kind="fp8", scheme="FP8"),
                      "llm-compressor QuantizationModifier scheme FP8: FP8 weights per tensor, static input scale (float-quantized)"),
    "gptqmodel7-g32-sym": (GPTQ7, "gptqmodel", dict(desc_act=False, sym=True),
                           "GPTQModel 4-bit group 32 symmetric, desc_act false"),
    "gptqmodel7-g32-asym": (GPTQ7, "gptqmodel", dict(desc_act=False, sym=False),
                            "GPTQModel 4-bit group 32 asymmetric, desc_act false"),
    "gptqmodel7-g32-descact-sym": (GPTQ7, "gptqmodel", dict(desc_act=True, sym=True),
                                   "GPTQModel 4-bit group 32 symmetric, desc_act true (g_idx)"),
    "gptqmodel7-g32-descact-asym": (GPTQ7, "gptqmodel", dict(desc_act=True, sym=False),
                                    "GPTQModel 4-bit group 32 asymmetric, desc_act true (g_idx)"),
    "gptqmodel5-g32-asym": (GPTQ5, "gptqmodel", dict(desc_act=False, sym=False),
                            "GPTQModel 5.4 4-bit group 32 asymmetric, desc_act false (unpadded safetensors header)"),
    "gptqmodel5-g32-descact-sym": (GPTQ5, "gptqmodel", dict(desc_act=True, sym=True),
                                   "GPTQModel 5.4 4-bit group 32 symmetric, desc_act true (unpadded safetensors header)"),
    "gptqmodel7-awq-gemm-g32": (GPTQ7, "gptqmodel_awq", dict(),
                                "GPTQModel AWQ 4-bit group 32 (zero points), GEMM layout (AutoAWQ's packing)"),
    "autoawq-gemm-g32": (AWQ, "autoawq", dict(),
                         "AutoAWQ 4-bit group 32 with zero points, version GEMM"),
    "bnb-nf4": (BNB, "bnb", dict(quant_type="nf4"),
                "transformers BitsAndBytesConfig load_in_4bit nf4, double quant, save_pretrained"),
    "bnb-fp4": (BNB, "bnb", dict(quant_type="fp4"),
                "transformers BitsAndBytesConfig load_in_4bit fp4, double quant, save_pretrained"),
}


def versions(pins):
    found = {}
    for package, want in pins:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            # AutoAWQ's sdist does not build with current setuptools; its package may have been
            # copied into site-packages without metadata.
            module = {"autoawq": "awq"}.get(package)
            spec = importlib.util.find_spec(module) if module else None
            found[package] = getattr(importlib.import_module(module), "__version__", None) if spec else None
    return found


def library_label(pins):
    return " / ".join(f"{p} {v}" for p, v in pins)


# ----------------------------------------------------------------------------------------------
# Base model and data


def make_fixtures_module():
    spec = importlib.util.spec_from_file_location("make_fixtures", ROOT / "scripts/make-fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(BASE_CONFIG["vocab_size"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="t1", eos_token="t2", unk_token="t0", pad_token="t0")


def make_base(out_dir):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    mf = make_fixtures_module()
    config = MixtralConfig(**BASE_CONFIG)
    model = MixtralForCausalLM(config)
    mf.init_weights(model, BASE_SEED, tied=False)
    model = model.to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.save_pretrained(out_dir)
    tokenizer().save_pretrained(out_dir)


def seeded_ids(seed, count, length):
    import torch

    gen = torch.Generator().manual_seed(seed)
    vocab = BASE_CONFIG["vocab_size"]
    return [[1] + torch.randint(3, vocab, (length - 1,), generator=gen).tolist() for _ in range(count)]


def calibration():
    return seeded_ids(CALIB_SEED, CALIB_SAMPLES, CALIB_LEN)


# ----------------------------------------------------------------------------------------------
# Writers: run the library on the base model, save into out_dir


def write_llmc(base, out_dir, opts):
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    # The router: `mlp.gate` under transformers 5, `block_sparse_moe.gate` (a Linear) under 4.x.
    ignore = ["lm_head", "re:.*mlp.gate$", "re:.*block_sparse_moe.gate$"]
    samples = calibration()
    ds = Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(s) for s in samples]})
    if opts["kind"] == "fp8":
        recipe = QuantizationModifier(targets="Linear", scheme=opts["scheme"], ignore=ignore)
    else:
        weights = QuantizationArgs(
            num_bits=opts["bits"],
            type="int",
            symmetric=opts["sym"],
            strategy="group" if opts["group"] else "channel",
            group_size=opts["group"],
        )
        scheme = QuantizationScheme(targets=["Linear"], weights=weights)
        recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=ignore, actorder=opts["actorder"])
    oneshot(
        model=model,
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=len(samples),
        max_seq_length=CALIB_LEN,
        processor=tokenizer(),
    )
    model.save_pretrained(out_dir, save_compressed=True)


def gptqmodel_import():
    if importlib.metadata.version("gptqmodel").startswith("5."):
        os.cpu_count = lambda: 4  # see the module doc
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import gptqmodel

    return gptqmodel


def write_gptqmodel(base, out_dir, opts):
    import torch

    gptqmodel = gptqmodel_import()
    # A fixed relative offload folder (the run's working directory is a temporary one), so that
    # the path the config records does not change from run to run.
    extra = {"offload_to_disk_path": "gptqmodel_offload"}
    if gptqmodel.__version__.startswith("5."):
        # 5.4's lazy ("turtle") loading asserts an accelerator; load the model whole instead.
        extra["offload_to_disk"] = False
        # 5.4's Mixtral definition names its expert modules with an `{expert_index}` template but
        # does not say which config key counts the experts, so the template is never expanded.
        from gptqmodel.models.definitions.mixtral import MixtralQModel

        MixtralQModel.dynamic_expert_index = "num_local_experts"
    qc = gptqmodel.QuantizeConfig(bits=4, group_size=32, desc_act=opts["desc_act"], sym=opts["sym"], **extra)
    model = gptqmodel.GPTQModel.load(str(base), qc, device="cpu")
    samples = [
        {"input_ids": torch.tensor([s]), "attention_mask": torch.ones(1, len(s), dtype=torch.long)}
        for s in calibration()
    ]
    model.quantize(samples, batch_size=1)
    model.save(str(out_dir))


def write_gptqmodel_awq(base, out_dir, opts):
    import torch

    gptqmodel = gptqmodel_import()
    from gptqmodel.quantization.config import FORMAT, METHOD

    qc = gptqmodel.QuantizeConfig(
        bits=4,
        group_size=32,
        quant_method=METHOD.AWQ,
        format=FORMAT.GEMM,
        sym=False,
        offload_to_disk_path="gptqmodel_offload",
    )
    model = gptqmodel.GPTQModel.load(str(base), qc, device="cpu")
    samples = [
        {"input_ids": torch.tensor([s]), "attention_mask": torch.ones(1, len(s), dtype=torch.long)}
        for s in calibration()
    ]
    model.quantize(samples, batch_size=1)
    model.save(str(out_dir))


def write_autoawq(base, out_dir, opts):
    from awq import AutoAWQForCausalLM

    model = AutoAWQForCausalLM.from_pretrained(str(base), device_map="cpu")
    samples = calibration()  # token ids, which AutoAWQ takes as they are
    model.quantize(
        tokenizer(),
        quant_config={"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM"},
        calib_data=samples,
        max_calib_samples=len(samples),
        max_calib_seq_len=CALIB_LEN,
    )
    model.save_quantized(str(out_dir))


def write_bnb(base, out_dir, opts):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=opts["quant_type"],
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb_config, dtype=torch.bfloat16, device_map="cpu")
    model.save_pretrained(out_dir)


WRITERS = {"llmc": write_llmc, "gptqmodel": write_gptqmodel, "gptqmodel_awq": write_gptqmodel_awq,
           "autoawq": write_autoawq, "bnb": write_bnb}


# ----------------------------------------------------------------------------------------------
# Readers: the library's own dequantization of the saved files -> {name: f32 tensor}


def read_tensors(model_dir):
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def read_llmc(model_dir):
    import torch
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    qc = json.loads((Path(model_dir) / "config.json").read_text())["quantization_config"]
    groups = qc["config_groups"]
    if len(groups) != 1:
        raise RuntimeError(f"expected one config group, got {list(groups)}")
    group = next(iter(groups.values()))
    scheme = QuantizationScheme.model_validate({k: v for k, v in group.items() if k != "format"})
    compressor = BaseCompressor.get_value_from_registry(group.get("format") or qc["format"])
    if hasattr(compressor, "decompress_weight"):  # compressed-tensors before 0.14: per-weight API

        def decompress(local):
            return compressor(config=None).decompress_weight(local, quantization_args=scheme.weights)

    else:

        def decompress(local):
            return compressor.decompress(local, scheme)["weight"]

    tensors = read_tensors(model_dir)
    # Weight-only: the activation `input_scale` is not passed on.
    side = ("weight", "weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
    prefixes = sorted({n.rsplit(".", 1)[0] for n in tensors if n.endswith(".weight_scale")})
    dense = {}
    for prefix in prefixes:
        local = {n[len(prefix) + 1 :]: t for n, t in tensors.items() if n.startswith(prefix + ".")}
        local = {k: v for k, v in local.items() if k in side}
        local["weight_scale"] = local["weight_scale"].to(torch.float32)
        dense[prefix + ".weight"] = decompress(local).to(torch.float32)
    for name, t in tensors.items():
        if name.rsplit(".", 1)[0] not in prefixes:
            dense[name] = t.to(torch.float32)
    return dense


def read_gptqmodel(model_dir):
    import torch

    gptqmodel = gptqmodel_import()
    # Its torch kernel takes f16 or bf16 only; f16 holds the stored f16 scales exactly, and the
    # scales are upcast to f32 before dequantizing (codes and zeros are small integers, exact in f16).
    model = gptqmodel.GPTQModel.load(str(model_dir), device="cpu", backend=gptqmodel.BACKEND.TORCH, dtype=torch.float16)
    stored = read_tensors(model_dir)
    dense = {}
    with torch.no_grad():
        for name, module in model.model.named_modules():
            if not hasattr(module, "dequantize_weight"):
                continue
            if not torch.equal(module.scales, stored[name + ".scales"]):
                raise RuntimeError(f"{name}: loaded scales differ from the file")
            module.scales = module.scales.to(torch.float32)
            w = module.dequantize_weight()  # [in, out]
            if tuple(w.shape) != (module.in_features, module.out_features) or w.dtype != torch.float32:
                raise RuntimeError(f"{name}: dequantized {w.dtype} {tuple(w.shape)}")
            dense[name + ".weight"] = w.T.contiguous()
    quantized = {n[: -len(".weight")] for n in dense}
    # Everything else as stored (a name the library loaded under another name than the file's
    # would leave qweight & co. here, which `reference` refuses).
    for name, t in stored.items():
        if name.rsplit(".", 1)[0] not in quantized:
            dense[name] = t.to(torch.float32)
    return dense


def read_awq(model_dir):
    """AWQ GEMM checkpoints through the writing library's `dequantize_gemm`."""
    import torch

    if importlib.util.find_spec("awq") is not None:
        from awq.utils.packing_utils import dequantize_gemm
    else:
        gptqmodel_import()
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    qc = json.loads((Path(model_dir) / "config.json").read_text())["quantization_config"]
    stored = read_tensors(model_dir)
    dense = {}
    for name in stored:
        if not name.endswith(".qweight"):
            continue
        prefix = name[: -len(".qweight")]
        w = dequantize_gemm(
            qweight=stored[prefix + ".qweight"],
            qzeros=stored[prefix + ".qzeros"],
            scales=stored[prefix + ".scales"].to(torch.float32),
            bits=qc["bits"],
            group_size=qc["group_size"],
        )  # [in, out]
        dense[prefix + ".weight"] = w.to(torch.float32).T.contiguous()
    for name, t in stored.items():
        if name.rsplit(".", 1)[0] + ".weight" not in dense:
            dense[name] = t.to(torch.float32)
    return dense


def read_bnb(model_dir):
    import bitsandbytes.functional as F
    import torch

    tensors = read_tensors(model_dir)
    bases = sorted({n.split(".weight.")[0] for n in tensors if ".weight." in n})
    dense = {}
    for base in bases:
        qs = {n[len(base) + len(".weight.") :]: t for n, t in tensors.items() if n.startswith(base + ".weight.")}
        state = F.QuantState.from_dict(qs, device=torch.device("cpu"))
        state.dtype = torch.float32
        dense[base + ".weight"] = F.dequantize_4bit(tensors[base + ".weight"], state).to(torch.float32)
    for name, t in tensors.items():
        if any(name == b + ".weight" or name.startswith(b + ".weight.") for b in bases):
            continue
        dense[name] = t.to(torch.float32)
    return dense


READERS = {"llmc": read_llmc, "gptqmodel": read_gptqmodel, "gptqmodel_awq": read_awq, "autoawq": read_awq,
           "bnb": read_bnb}


# ----------------------------------------------------------------------------------------------
# Reference forward on the dequantized weights


EXPERT_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3", "w1": "w1", "w2": "w2", "w3": "w3"}


def classic_name(name):
    """The classic Mixtral tensor name of a name a library wrote or loaded."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight", name)
    if m:
        return f"model.layers.{m[1]}.block_sparse_moe.experts.{m[2]}.{EXPERT_NAMES[m[3]]}.weight"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.gate\.weight", name)
    if m:
        return f"model.layers.{m[1]}.block_sparse_moe.gate.weight"
    return name


def fused_to_classic(dense):
    """Fused 3-D experts as transformers 5 holds them -> per-expert classic matrices."""
    out = {}
    inter = BASE_CONFIG["intermediate_size"]
    for name, t in dense.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", name)
        if not m:
            out[classic_name(name)] = t
            continue
        for e in range(t.shape[0]):
            prefix = f"model.layers.{m[1]}.block_sparse_moe.experts.{e}"
            if m[2] == "gate_up_proj":
                out[prefix + ".w1.weight"] = t[e, :inter].contiguous()
                out[prefix + ".w3.weight"] = t[e, inter:].contiguous()
            else:
                out[prefix + ".w2.weight"] = t[e].contiguous()
    return out


def load_reference(model_dir):
    import torch
    import transformers
    from transformers import MixtralForCausalLM

    kwargs = dict(attn_implementation="eager", output_loading_info=True)
    if int(transformers.__version__.split(".")[0]) >= 5:
        kwargs.update(dtype=torch.float32, experts_implementation="eager")
    else:
        kwargs.update(torch_dtype=torch.float32)
    model, info = MixtralForCausalLM.from_pretrained(model_dir, **kwargs)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        if info.get(kind):
            raise RuntimeError(f"loading the dequantized checkpoint reported {kind}: {info[kind]}")
    return model.eval()


def reference(dense, base):
    import torch
    from safetensors.torch import save_file

    # GPTQModel 5.4 also saves the rotary buffer `model.rotary_emb.inv_freq`; transformers
    # recomputes it from the config.
    dense = fused_to_classic({n: t for n, t in dense.items() if not n.endswith("rotary_emb.inv_freq")})
    base_names = set(fused_to_classic({n: t for n, t in read_tensors(base).items()}))
    if set(dense) != base_names:
        raise RuntimeError(f"dequantized names differ from the base: {sorted(set(dense) ^ base_names)[:8]}")
    score_ids = seeded_ids(SCORE_SEED, 1, SCORE_LEN)[0]
    prompt = score_ids[:PROMPT_LEN]
    with tempfile.TemporaryDirectory() as tmp:
        save_file(dense, str(Path(tmp) / "model.safetensors"))
        config = json.loads((Path(base) / "config.json").read_text())
        config.pop("quantization_config", None)
        config["dtype"] = "float32"
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        model = load_reference(tmp)
    with torch.no_grad():
        logits = model(torch.tensor([score_ids])).logits[0].to(torch.float64)
        lp = torch.log_softmax(logits[:-1], dim=-1)[torch.arange(len(score_ids) - 1), torch.tensor(score_ids[1:])]
        ids = torch.tensor([prompt])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            eos_token_id=None,
            pad_token_id=0,
        )
        greedy = out[0, len(prompt) :].tolist()
        full = model(torch.tensor([prompt + greedy])).logits[0]
    rows = full[len(prompt) - 1 : len(prompt) - 1 + NEW_TOKENS]
    if rows.argmax(dim=-1).tolist() != greedy:
        raise RuntimeError("greedy ids differ from the argmax of a full forward")
    top2 = torch.topk(rows, 2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).min().item()
    logprobs = [float(x) for x in lp]
    return {
        "score_ids": score_ids,
        "token_logprobs": logprobs,
        "perplexity": math.exp(-sum(logprobs) / len(logprobs)),
        "prompt_ids": prompt,
        "greedy_ids": greedy,
        "min_greedy_margin": margin,
    }


# ----------------------------------------------------------------------------------------------


KEEP = ("config.json", "model.safetensors", "quantize_config.json")


def quant_format(model_dir):
    config = json.loads((Path(model_dir) / "config.json").read_text())
    qc = config.get("quantization_config", {})
    method = qc.get("quant_method")
    fmt = qc.get("format") or qc.get("checkpoint_format") or qc.get("bnb_4bit_quant_type")
    return f"{method} {fmt}"


def make_one(name, base):
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    pins, writer, opts, notes = FIXTURES[name]
    with tempfile.TemporaryDirectory() as tmp:
        written = Path(tmp) / name
        # The tokenizer files are re-saved by this transformers (an older one cannot read a newer
        # one's tokenizer_config.json); the weights and config are the base's.
        source = Path(tmp) / "base"
        shutil.copytree(base, source)
        tokenizer().save_pretrained(source)
        WRITERS[writer](source, written, opts)
        dense = READERS[writer](written)
        expected = reference(dense, base)
        if expected["min_greedy_margin"] < MIN_GREEDY_MARGIN:
            raise RuntimeError(f"{name}: greedy margin {expected['min_greedy_margin']} < {MIN_GREEDY_MARGIN}")
        out = OUT / name
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for f in KEEP:
            if (written / f).exists():
                shutil.copy(written / f, out / f)
        expected = {
            "name": name,
            "library": library_label(pins),
            "format": quant_format(out),
            "notes": notes,
            "torch_version": torch.__version__.split("+")[0],
            "transformers_version": transformers.__version__,
            "base_sha256": hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest(),
            **expected,
        }
        (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"{name}: {size} bytes, perplexity {expected['perplexity']:.4f}, margin {expected['min_greedy_margin']:.4f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="fixture names (default: all)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument(
        "--base",
        help="use this base model directory (made by --save-base) instead of building one; needed "
        "where transformers is older than 5, whose Mixtral draws the weights in another order",
    )
    parser.add_argument("--save-base", help="build the base model into this directory and stop")
    args = parser.parse_args()
    if args.save_base:
        make_base(Path(args.save_base))
        return
    if args.one:
        make_one(args.one, Path(args.base))
        return
    names = args.only or list(FIXTURES)
    unknown = [n for n in names if n not in FIXTURES]
    if unknown:
        sys.exit(f"unknown fixtures {unknown}; known: {list(FIXTURES)}")
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.base:
            base = Path(args.base)
        else:
            import transformers

            if int(transformers.__version__.split(".")[0]) < 5:
                sys.exit("transformers < 5: pass --base DIR made by --save-base in a transformers 5 environment")
            base = Path(tmp) / "base"
            make_base(base)
        for name in names:
            pins = FIXTURES[name][0]
            found = versions(pins)
            wrong = {p: found[p] for p, v in pins if found[p] != v}
            if wrong:
                print(f"{name}: skipped, needs {library_label(pins)} (found {wrong})")
                continue
            # One process per fixture: the libraries patch transformers when imported.
            # In a temporary working directory: the libraries leave logs and offload folders there.
            with tempfile.TemporaryDirectory() as cwd:
                script = str(Path(__file__).resolve())
                run = subprocess.run([sys.executable, script, "--one", name, "--base", str(base.resolve())], cwd=cwd)
            if run.returncode != 0:
                failed.append(name)
    if failed:
        sys.exit(f"failed: {failed}")


if __name__ == "__main__":
    main()
