#!/usr/bin/env python3
"""Trains models/mini-mixtral: a small Mixtral-architecture model on Python's documentation.

Data: the reStructuredText sources of the Python 3.11 documentation as shipped by the Debian
package `python3.11-doc` version 3.11.2-6+deb12u7 (bookworm), files
`/usr/share/doc/python3.11/html/_sources/**/*.rst.txt`. The documentation is licensed under the
PSF License Agreement (Python Software Foundation License Version 2).

The script downloads the package with `apt-get download` (or takes `--deb FILE`), extracts it,
splits the documents into train and held-out by a seeded shuffle (2% of the documents held out,
whole documents only), tokenizes with the Mixtral tokenizer of models/tiny-mixtral, trains a
`MixtralForCausalLM` from scratch in f32 on CPU (AdamW, linear warmup, cosine decay, a wall-clock
budget), and writes the bf16 weights, config, tokenizer files, `heldout.txt` (a piece of held-out
text that fits the training context) and a README with the figures of the run to the output
directory. At the end it reloads the written directory with transformers and prints the
perplexity of `heldout.txt` (BOS + its tokens, one trailing line break removed, as
`mixtral-run --perplexity` scores it).

    /work/pyenv/torch/bin/python scripts/train-mini-mixtral.py            # full run (35 min budget)
    /work/pyenv/torch/bin/python scripts/train-mini-mixtral.py --quick    # smoke test to /tmp
"""

import argparse
import glob
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import MixtralConfig, MixtralForCausalLM

PACKAGE = "python3.11-doc"
PACKAGE_VERSION = "3.11.2-6+deb12u7"
SOURCES = "usr/share/doc/python3.11/html/_sources"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(REPO, "models", "tiny-mixtral")
BOS, EOS = 1, 2


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "models", "mini-mixtral"))
    p.add_argument("--deb", help="an already downloaded python3.11-doc .deb")
    p.add_argument("--budget-min", type=float, default=35.0, help="wall-clock training budget")
    p.add_argument("--max-steps", type=int, default=100000)
    p.add_argument("--seq", type=int, default=512, help="training context")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--heldout-tokens", type=int, default=500, help="size of heldout.txt")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny budget, output in /tmp")
    p.add_argument("--rescore", action="store_true",
                   help="only recompute the transformers perplexity of OUT/heldout.txt into training.json")
    a = p.parse_args()
    if a.quick:
        a.budget_min = 0.5
        a.max_steps = 20
        a.warmup = 5
        if a.out == os.path.join(REPO, "models", "mini-mixtral"):
            a.out = os.path.join(tempfile.gettempdir(), "mini-mixtral-quick")
    return a


def model_config():
    return MixtralConfig(
        vocab_size=32000,
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=BOS,
        eos_token_id=EOS,
        output_router_logits=False,
        router_aux_loss_coef=0.01,
        sliding_window=None,
        attention_dropout=0.0,
        initializer_range=0.02,
    )


def fetch_documents(deb):
    """Returns [(relative path, text)] of the documentation sources, sorted by path."""
    work = tempfile.mkdtemp(prefix="pydoc-")
    if deb is None:
        subprocess.run(["apt-get", "download", f"{PACKAGE}={PACKAGE_VERSION}"], cwd=work, check=True)
        deb = glob.glob(os.path.join(work, "*.deb"))[0]
    subprocess.run(["dpkg-deb", "-x", deb, os.path.join(work, "x")], check=True)
    root = os.path.join(work, "x", SOURCES)
    docs = []
    for path in sorted(glob.glob(os.path.join(root, "**", "*.rst.txt"), recursive=True)):
        with open(path, encoding="utf-8") as f:
            text = clean(f.read())
        if len(text) > 200:
            docs.append((os.path.relpath(path, root), text))
    shutil.rmtree(work)
    return docs


def clean(text):
    """Light reST clean-up: roles like :func:`x` become `x`; runs of blank lines shrink to one."""
    text = re.sub(r":[\w:.-]+:`", "`", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def heldout_text(tok, docs, max_tokens):
    """The first paragraphs of the held-out documents that fit BOS + `max_tokens` tokens."""
    paragraphs = [p for _, t in docs for p in t.split("\n\n") if len(p.strip()) > 40]
    out = ""
    for p in paragraphs:
        candidate = (out + "\n\n" + p.strip()) if out else p.strip()
        if len(tok.encode(candidate).ids) > max_tokens:
            break
        out = candidate
    return out + "\n"


def encode_stream(tok, docs):
    """Every document as `<s> <s> text </s>`: the tokenizer's post-processor adds one BOS and
    this adds another (the run that produced the committed model did so; kept so that this
    script reproduces it)."""
    ids = []
    for enc in tok.encode_batch([t for _, t in docs]):
        ids.append(BOS)
        ids.extend(enc.ids)
        ids.append(EOS)
    return torch.tensor(ids, dtype=torch.long)


def export(model, config, out):
    """bf16 safetensors with the Mixtral checkpoint names (experts split into w1/w2/w3)."""
    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    tensors = {}
    inter = config.intermediate_size
    for k, v in sd.items():
        if k == "lm_head.weight":
            continue  # tied to the embedding
        m = re.match(r"model\.layers\.(\d+)\.mlp\.(.*)", k)
        if m is None:
            tensors[k] = v
            continue
        i, rest = m.groups()
        pre = f"model.layers.{i}.block_sparse_moe"
        if rest == "gate.weight":
            tensors[f"{pre}.gate.weight"] = v
        elif rest == "experts.gate_up_proj":
            for e in range(v.shape[0]):
                tensors[f"{pre}.experts.{e}.w1.weight"] = v[e, :inter].clone()
                tensors[f"{pre}.experts.{e}.w3.weight"] = v[e, inter:].clone()
        elif rest == "experts.down_proj":
            for e in range(v.shape[0]):
                tensors[f"{pre}.experts.{e}.w2.weight"] = v[e].clone()
        else:
            raise SystemExit(f"unexpected tensor {k}")
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    cfg = config.to_dict()
    cfg["architectures"] = ["MixtralForCausalLM"]
    cfg["torch_dtype"] = "bfloat16"
    cfg["dtype"] = "bfloat16"
    cfg["output_router_logits"] = False
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": BOS, "eos_token_id": EOS}, f, indent=2)
        f.write("\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER_DIR, name), os.path.join(out, name))


@torch.no_grad()
def heldout_loss(model, ids, seq, max_chunks):
    model.eval()
    losses = []
    n = min((len(ids) - 1) // seq, max_chunks)
    for c in range(n):
        x = ids[c * seq : (c + 1) * seq + 1].unsqueeze(0)
        losses.append(model(input_ids=x[:, :-1], labels=x[:, :-1].clone()).loss.item())
    model.train()
    return sum(losses) / max(len(losses), 1)


@torch.no_grad()
def saved_perplexity(out, tok):
    """Perplexity of heldout.txt under the written directory, reloaded by transformers (f32 math
    on the bf16 weights)."""
    model = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with open(os.path.join(out, "heldout.txt"), encoding="utf-8") as f:
        text = f.read()
    if text.endswith("\n"):
        text = text[:-1]
    ids = torch.tensor([tok.encode(text).ids])  # the post-processor puts BOS first
    assert ids[0, 0].item() == BOS and ids[0, 1].item() != BOS
    logits = model(input_ids=ids).logits[0, :-1].double()
    lp = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])
    return math.exp(-lp.mean().item()), ids.shape[1] - 1


def main():
    a = parse_args()
    torch.set_num_threads(a.threads)
    if a.rescore:
        tok = Tokenizer.from_file(os.path.join(TOKENIZER_DIR, "tokenizer.json"))
        ppl, n_scored = saved_perplexity(a.out, tok)
        path = os.path.join(a.out, "training.json")
        with open(path) as f:
            figures = json.load(f)
        figures["heldout_txt_tokens_scored"] = n_scored
        figures["heldout_txt_perplexity_transformers"] = round(ppl, 6)
        with open(path, "w") as f:
            json.dump(figures, f, indent=2)
            f.write("\n")
        print(f"transformers perplexity of heldout.txt: {ppl:.6f} over {n_scored} tokens")
        return
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    started = time.time()

    tok = Tokenizer.from_file(os.path.join(TOKENIZER_DIR, "tokenizer.json"))
    docs = fetch_documents(a.deb)
    order = list(range(len(docs)))
    random.Random(a.seed).shuffle(order)
    n_held = max(1, round(0.02 * len(docs)))
    held = sorted(order[-n_held:])
    train_docs = [docs[i] for i in sorted(order[:-n_held])]
    held_docs = [docs[i] for i in held]
    train_ids = encode_stream(tok, train_docs)
    held_ids = encode_stream(tok, held_docs)
    print(f"{len(train_docs)} train documents, {len(train_ids)} tokens; "
          f"{len(held_docs)} held-out documents, {len(held_ids)} tokens", flush=True)

    config = model_config()
    model = MixtralForCausalLM(config)
    model.config.output_router_logits = True
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params} parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=a.lr, betas=(0.9, 0.95), eps=1e-8,
    )

    budget = a.budget_min * 60.0
    train_start = time.time()
    gen = torch.Generator().manual_seed(a.seed)
    n_windows = (len(train_ids) - 1) // a.seq
    step, tokens_seen, ema = 0, 0, None
    # The cosine schedule runs over the budget's time (the step count is not known in advance).
    while step < a.max_steps:
        elapsed = time.time() - train_start
        if elapsed >= budget:
            break
        frac = elapsed / budget
        lr = a.lr * min(1.0, (step + 1) / a.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, n_windows, (a.batch,), generator=gen) * a.seq
        starts = starts + torch.randint(0, a.seq, (a.batch,), generator=gen)
        starts = starts.clamp(max=len(train_ids) - a.seq - 1)
        x = torch.stack([train_ids[s : s + a.seq] for s in starts.tolist()])
        out = model(input_ids=x, labels=x.clone())
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += x.numel()
        lm_loss = out.loss.item() - config.router_aux_loss_coef * out.aux_loss.item()
        ema = lm_loss if ema is None else 0.98 * ema + 0.02 * lm_loss
        if step % 25 == 0 or step == 1:
            print(f"step {step} loss {lm_loss:.3f} (ema {ema:.3f}) lr {lr:.2e} "
                  f"{tokens_seen} tokens {time.time() - train_start:.0f}s", flush=True)
        if step % 250 == 0:
            print(f"  held-out loss {heldout_loss(model, held_ids, a.seq, 16):.3f}", flush=True)
    train_time = time.time() - train_start

    model.config.output_router_logits = False
    final_held = heldout_loss(model, held_ids, a.seq, 64)
    print(f"done: {step} steps, {tokens_seen} tokens, {train_time:.0f}s, train loss (ema) "
          f"{ema:.3f}, held-out loss {final_held:.3f}", flush=True)

    os.makedirs(a.out, exist_ok=True)
    export(model, config, a.out)
    text = heldout_text(tok, held_docs, a.heldout_tokens)
    with open(os.path.join(a.out, "heldout.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    ppl, n_scored = saved_perplexity(a.out, tok)
    print(f"transformers perplexity of heldout.txt (reloaded bf16 weights, f32 math): "
          f"{ppl:.6f} over {n_scored} tokens", flush=True)
    figures = {
        "package": f"{PACKAGE} {PACKAGE_VERSION}",
        "train_documents": len(train_docs),
        "train_tokens": len(train_ids),
        "heldout_documents": [p for p, _ in held_docs],
        "heldout_tokens": len(held_ids),
        "parameters": n_params,
        "steps": step,
        "tokens_seen": tokens_seen,
        "train_seconds": round(train_time),
        "train_loss_ema": round(ema, 4),
        "heldout_loss": round(final_held, 4),
        "heldout_txt_tokens_scored": n_scored,
        "heldout_txt_perplexity_transformers": round(ppl, 6),
        "command": " ".join(["scripts/train-mini-mixtral.py"] + sys.argv[1:]),
        "seed": a.seed,
        "threads": a.threads,
        "torch": torch.__version__,
        "total_seconds": round(time.time() - started),
    }
    with open(os.path.join(a.out, "training.json"), "w") as f:
        json.dump(figures, f, indent=2)
        f.write("\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
