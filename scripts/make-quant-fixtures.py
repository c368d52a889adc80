#!/usr/bin/env python3
"""Writes small pre-quantized checkpoints under tests/fixtures/quant/ and the logits that a plain
float32 transformers forward computes on their dequantized weights.

Run: /work/pyenv/torch/bin/python scripts/make-quant-fixtures.py   (any Python with torch,
transformers 5, safetensors and numpy). Output is a pure function of this file and the base
fixture: quantization is deterministic, the act-order permutation comes from a seeded generator,
torch runs in one thread with deterministic algorithms.

Base: tests/fixtures/gqa-bf16-sharded-window (MixtralForCausalLM, bf16, hidden 64, intermediate
96, 2 layers, 4 experts top-2, vocab 512). Only the attention projections (q/k/v/o) and the expert
matrices (w1/w2/w3) are quantized; the router, norms, embedding and LM head stay bf16 as stored.

Fixtures (each directory: config.json with a `quantization_config`, generation_config.json,
model.safetensors, expected.json):
  fp8-tensor     compressed-tensors layout: `<p>.weight` F8_E4M3 [out, in], `<p>.weight_scale` F32 [1]
                 (amax / 448 over the tensor), `<p>.input_scale` F32 [1] (a static activation scale,
                 recorded but not used by a weight-only dequantization)
  fp8-channel    as fp8-tensor with `<p>.weight_scale` F32 [out, 1] (amax / 448 per output row), no
                 input_scale
  int8-channel   compressed-tensors `int-quantized` layout: `<p>.weight` I8 [out, in] (round half to
                 even of w / scale, clamped to +-127), `<p>.weight_scale` F32 [out, 1] (amax / 127)
  gptq           AutoGPTQ layout, 4 bits, group_size 32, desc_act false, sym false:
                 `<p>.qweight` I32 [in/8, out], `<p>.qzeros` I32 [groups, out/8], `<p>.scales` F16
                 [groups, out], `<p>.g_idx` I32 [in] = k // 32. checkpoint_format "gptq": the stored
                 zero is zero - 1 (zeros are kept in 1..15 so that zero - 1 is a valid nibble)
  gptq-actorder  as gptq with desc_act true and sym true: inputs are assigned to groups in a seeded
                 random order (g_idx[perm[j]] = j // 32, the shape act-order gives), one order per
                 input (shared by q/k/v of a layer and by w1/w3 of an expert, as GPTQ's Hessian of
                 that input makes them), every zero is 8 (stored 7)
Codes: FP8 by torch's float8_e4m3fn cast (round to nearest even) of w / scale clamped to +-448;
4-bit by round-to-nearest with the f16 scale (no Hessian: the layout, not GPTQ's error feedback,
is what the loader must read).

expected.json:
  {"name", "notes", "torch_version", "transformers_version",
   "ids": [int],              the base golden's prompt_ids + greedy_ids
   "last_logits": [float],    logits at the last position (vocab values)
   "token_logprobs": [float], log p(ids[i] | ids[:i]), i = 1 .. len(ids)-1
   "perplexity": float}       exp(-mean(token_logprobs))
computed by dequantizing the STORED tensors with numpy (FP8 / INT8: code value * scale; GPTQ:
scales[g_idx[k], n] * (nibble(qweight) - (nibble(qzeros) + 1))), writing a float32 checkpoint
without quantization_config and running MixtralForCausalLM (eager attention and experts, float32)
over `ids` in one forward.
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import MixtralForCausalLM

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "tests/fixtures/gqa-bf16-sharded-window"
OUT = ROOT / "tests/fixtures/quant"
GROUP = 32
FP8_MAX = 448.0


def is_quantized(name):
    return name.endswith(".weight") and (".self_attn." in name or ".experts." in name)


def base_tensors():
    index = json.loads((BASE / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(BASE / shard)))
    return tensors


# ----------------------------------------------------------------------------------------------
# Quantizers (write the stored tensors)


def fp8(w, per_channel):
    w = w.to(torch.float32)
    if per_channel:
        scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX
    else:
        scale = (w.abs().max() / FP8_MAX).reshape(1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, scale.to(torch.float32)


def int8(w):
    w = w.to(torch.float32)
    scale = w.abs().amax(dim=1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
    return codes, scale


def pack_rows(q):
    """[k, n] nibbles -> [k/8, n] int32, row 8r+j in bits 4j of word row r."""
    k, n = q.shape
    q = q.astype(np.uint32).reshape(k // 8, 8, n)
    words = np.zeros((k // 8, n), dtype=np.uint32)
    for j in range(8):
        words |= q[:, j, :] << np.uint32(4 * j)
    return torch.from_numpy(words.view(np.int32).copy())


def pack_cols(z):
    """[g, n] nibbles -> [g, n/8] int32, column 8c+j in bits 4j of word column c."""
    g, n = z.shape
    z = z.astype(np.uint32).reshape(g, n // 8, 8)
    words = np.zeros((g, n // 8), dtype=np.uint32)
    for j in range(8):
        words |= z[:, :, j] << np.uint32(4 * j)
    return torch.from_numpy(words.view(np.int32).copy())


def input_key(name):
    """The matrices that read the same input share it: q/k/v of a layer, w1/w3 of an expert. GPTQ's
    act-order permutation sorts the diagonal of the Hessian of that input, so they share it too."""
    base = name[: -len(".weight")]
    for shared in ("q_proj", "k_proj", "v_proj"):
        if base.endswith("self_attn." + shared):
            return base[: -len(shared)] + "qkv"
    for shared in ("w1", "w3"):
        if base.endswith("." + shared):
            return base[: -len(shared)] + "w13"
    return base


def gptq(w, act_order, sym, perm_for):
    """RTN 4-bit in the AutoGPTQ layout; returns qweight, qzeros, scales (f16), g_idx. `perm_for(in)`
    gives the act-order permutation of the input."""
    w = w.to(torch.float32).numpy().astype(np.float64)  # [out, in]
    out_f, in_f = w.shape
    groups = in_f // GROUP
    if act_order:
        perm = perm_for(in_f)
        g_idx = np.empty(in_f, dtype=np.int64)
        g_idx[perm] = np.arange(in_f) // GROUP
    else:
        g_idx = np.arange(in_f) // GROUP
    scales = np.zeros((groups, out_f), dtype=np.float16)
    zeros = np.zeros((groups, out_f), dtype=np.int64)
    q = np.zeros((in_f, out_f), dtype=np.int64)
    for g in range(groups):
        cols = np.nonzero(g_idx == g)[0]
        block = w[:, cols]  # [out, group]
        if sym:
            amax = np.abs(block).max(axis=1)
            scale = np.where(amax > 0, 2 * amax / 15, 1.0)
            zero = np.full(out_f, 8)
        else:
            lo = np.minimum(block.min(axis=1), 0)
            hi = np.maximum(block.max(axis=1), 0)
            scale = np.where(hi > lo, (hi - lo) / 15, 1.0)
            zero = np.clip(np.round(-lo / scale), 1, 15).astype(np.int64)
        s16 = scale.astype(np.float16)
        s = s16.astype(np.float64)
        scales[g] = s16
        zeros[g] = zero
        q[cols, :] = np.clip(np.round(block / s[:, None]) + zero[:, None], 0, 15).T
    return (
        pack_rows(q),
        pack_cols(zeros - 1),
        torch.from_numpy(scales),
        torch.from_numpy(g_idx.astype(np.int32)),
    )


# ----------------------------------------------------------------------------------------------
# Reference dequantization (from the stored tensors only)


def nibbles_rows(words):
    u = words.numpy().view(np.uint32)
    return np.stack([(u >> np.uint32(4 * j)) & 0xF for j in range(8)], axis=1).reshape(-1, u.shape[1])


def nibbles_cols(words):
    u = words.numpy().view(np.uint32)
    return np.stack([(u >> np.uint32(4 * j)) & 0xF for j in range(8)], axis=2).reshape(u.shape[0], -1)


def dequantize(stored):
    out = {}
    for name, t in stored.items():
        if name.endswith(("_scale", ".qzeros", ".scales", ".g_idx")):
            continue
        if name.endswith(".qweight"):
            base = name[: -len(".qweight")]
            q = nibbles_rows(t).astype(np.float32)  # [in, out]
            z = nibbles_cols(stored[base + ".qzeros"]).astype(np.float32) + 1  # [groups, out]
            s = stored[base + ".scales"].numpy().astype(np.float32)
            g = stored[base + ".g_idx"].numpy().astype(np.int64)
            w = s[g, :] * (q - z[g, :])  # [in, out]
            out[base + ".weight"] = torch.from_numpy(np.ascontiguousarray(w.T))
        elif t.dtype in (torch.float8_e4m3fn, torch.int8):
            out[name] = t.to(torch.float32) * stored[name + "_scale"].to(torch.float32)
        else:
            out[name] = t.to(torch.float32)
    return out


# ----------------------------------------------------------------------------------------------


def quantization_config(kind):
    if kind == "int8-channel":
        weights = {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True, "dynamic": False}
        return {
            "quant_method": "compressed-tensors",
            "format": "int-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
            "ignore": ["lm_head", "re:.*block_sparse_moe.gate"],
        }
    if kind.startswith("fp8"):
        strategy = "tensor" if kind == "fp8-tensor" else "channel"
        group = {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False},
        }
        if kind == "fp8-tensor":
            group["input_activations"] = {
                "num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False,
            }
        return {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "config_groups": {"group_0": group},
            "ignore": ["lm_head", "re:.*block_sparse_moe.gate"],
        }
    return {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": GROUP,
        "desc_act": kind == "gptq-actorder",
        "sym": kind == "gptq-actorder",
        "checkpoint_format": "gptq",
    }


def build(kind, tensors):
    gen = torch.Generator().manual_seed(7)
    perms = {}
    stored = {}
    for name in sorted(tensors):
        t = tensors[name]
        if not is_quantized(name):
            stored[name] = t.clone()
        elif kind == "int8-channel":
            stored[name], stored[name + "_scale"] = int8(t)
        elif kind.startswith("fp8"):
            codes, scale = fp8(t, per_channel=kind == "fp8-channel")
            stored[name] = codes
            stored[name + "_scale"] = scale
            if kind == "fp8-tensor":
                base = name[: -len(".weight")]
                stored[base + ".input_scale"] = torch.tensor([0.05], dtype=torch.float32)
        else:
            base = name[: -len(".weight")]
            key = input_key(name)
            if key not in perms:
                perms[key] = torch.randperm(t.shape[1], generator=gen).numpy()
            act_order = kind == "gptq-actorder"
            qw, qz, sc, gi = gptq(t, act_order=act_order, sym=act_order, perm_for=lambda _: perms[key])
            stored[base + ".qweight"], stored[base + ".qzeros"] = qw, qz
            stored[base + ".scales"], stored[base + ".g_idx"] = sc, gi
    return stored


def reference(stored, config, ids):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_file({k: v.contiguous() for k, v in dequantize(stored).items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps({**config, "dtype": "float32"}))
        model, info = MixtralForCausalLM.from_pretrained(
            tmp, dtype=torch.float32, attn_implementation="eager",
            experts_implementation="eager", output_loading_info=True,
        )
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
            if info.get(kind):
                raise RuntimeError(f"loading reported {kind}: {info[kind]}")
        model.eval()
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].to(torch.float32)
    lp = torch.log_softmax(logits[:-1].double(), dim=-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    return logits[-1], lp


def f32_list(t):
    return [float(str(np.float32(x))) for x in t.reshape(-1).tolist()]


NOTES = {
    "fp8-tensor": "FP8 E4M3, compressed-tensors layout, one weight_scale per tensor ([1]) and an input_scale",
    "fp8-channel": "FP8 E4M3, compressed-tensors layout, weight_scale per output channel ([out, 1])",
    "int8-channel": "INT8, compressed-tensors int-quantized layout, weight_scale per output channel ([out, 1])",
    "gptq": "GPTQ 4-bit (AutoGPTQ layout, checkpoint_format gptq: stored zero = zero - 1), group 32, asymmetric, no act-order",
    "gptq-actorder": "GPTQ 4-bit (AutoGPTQ layout, checkpoint_format gptq), group 32, symmetric (stored zero 7), act-order g_idx",
}


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    tensors = base_tensors()
    config = json.loads((BASE / "config.json").read_text())
    golden = json.loads((BASE / "golden.json").read_text())
    ids = golden["prompt_ids"] + golden["greedy_ids"]
    for kind in NOTES:
        out = OUT / kind
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        stored = build(kind, tensors)
        save_file(stored, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(
            json.dumps({**config, "quantization_config": quantization_config(kind)}, indent=2, sort_keys=True) + "\n"
        )
        shutil.copy(BASE / "generation_config.json", out / "generation_config.json")
        last, lp = reference(stored, config, ids)
        expected = {
            "name": kind,
            "notes": NOTES[kind] + "; derived from gqa-bf16-sharded-window (attention and expert projections quantized)",
            "torch_version": torch.__version__.split("+")[0],
            "transformers_version": transformers.__version__,
            "ids": ids,
            "last_logits": f32_list(last),
            "token_logprobs": f32_list(lp),
            "perplexity": float(torch.exp(-lp.mean())),
        }
        (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
        size = (out / "model.safetensors").stat().st_size
        print(f"{kind}: {size} bytes, perplexity {expected['perplexity']:.4f}", file=sys.stderr)


if __name__ == "__main__":
    main()
