#!/usr/bin/env python3
"""The official `openai` Python client against `mixtral-serve`, checked against `mixtral-run`.

Starts `mixtral-serve` on a free port (`--port 0`, the address read from its stderr), waits for
`/health`, then for each shipped model and prompt:

- completions, streamed and not, temperature 0: the text equals `mixtral-run`'s greedy text for the
  same prompt and token count;
- chat completions, streamed and not: the text equals `mixtral-run --chat`'s;
- per model, every prompt's completion twice more, all sent at once (batched by the server): the
  same text;
- the streamed completion's log-probabilities (`logprobs=0`) equal `mixtral-run --perplexity`'s
  per-token values within 1e-5, on BOS + the prompt + the generated text. Perplexity re-tokenizes
  that text, so its ids are compared with `mixtral-run`'s prompt and generated ids first; only the
  positions where the two agree are compared (at least one generated token per prompt, and every
  generated token for at least one prompt per model).

Why 1e-5: both sides are the same CPU engine (incremental decode vs one scoring prefill), which the
crate keeps bitwise equal independent of batching, chunking and prefix caching; the log-softmax is
f64 on both sides, and the serving core rounds it to f32 (half an f32 ulp: below 1e-6 for
log-probabilities above -16, below 1e-5 above -128), which JSON then carries exactly.
Anything larger is a real bug; 1e-5 is the issue's bound.

Usage: check.py --serve BIN --run BIN --model DIR [--model DIR ...]
"""

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

import openai

# Prompts per model. The random-weight tiny model's greedy tokens often do not survive
# re-tokenization (its first token glues onto the prompt's last word), so its prompts are ones whose
# continuation does; the trained mini model writes text that re-tokenizes.
PROMPTS = {
    "mini-mixtral": ["To install a package, run", "The os module provides", "def main():"],
    "tiny-mixtral": ["The capital of France is", "1, 2, 3,", "a b c d"],
}
DEFAULT_PROMPTS = ["The capital of France is", "To install a package, run"]
MAX_TOKENS = 12
TOLERANCE = 1e-5


def run_json(run_bin, args):
    """Runs mixtral-run --json with `args`; returns the parsed lines."""
    out = subprocess.run(
        [run_bin, "--json", *args], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"mixtral-run {args} failed: {out.stderr}")
    return [json.loads(line) for line in out.stdout.splitlines()]


def greedy(run_bin, model, prompt, chat):
    """mixtral-run's greedy `done` event (prompt_ids, generated_ids, text)."""
    args = ["--model", model, "--prompt", prompt, "-n", str(MAX_TOKENS)]
    if chat:
        args.append("--chat")
    lines = run_json(run_bin, args)
    done = lines[-1]
    assert done["event"] == "done", done
    return done


def perplexity(run_bin, model, text):
    """mixtral-run --perplexity on `text` (the file gets one more line break, which mixtral-run
    removes as it removes an editor's)."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write(text + "\n")
        path = f.name
    try:
        (line,) = run_json(run_bin, ["--model", model, "--perplexity", path])
    finally:
        os.unlink(path)
    return line


class Server:
    """mixtral-serve on a free port, stopped on exit."""

    def __init__(self, serve_bin, model):
        self.proc = subprocess.Popen(
            [serve_bin, "--model", model, "--port", "0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.url = None
        deadline = time.monotonic() + 120
        while self.url is None:
            line = self.proc.stderr.readline()
            if not line:
                raise SystemExit(f"mixtral-serve exited with {self.proc.wait()} before listening")
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                self.url = m.group(1)
            if time.monotonic() > deadline:
                raise SystemExit("mixtral-serve did not start within 120 s")
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("/health did not answer 200 within 120 s")
            time.sleep(0.1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def check_model(serve_bin, run_bin, model):
    model_id = os.path.basename(os.path.normpath(model))
    full_logprob_checks = 0
    prompts = PROMPTS.get(model_id, DEFAULT_PROMPTS)
    compared = 0
    max_diff = 0.0
    with Server(serve_bin, model) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        listed = [m.id for m in client.models.list().data]
        assert listed == [model_id], listed
        prompts = PROMPTS.get(model_id, DEFAULT_PROMPTS)
        wants = {}
        for prompt in prompts:
            want = greedy(run_bin, model, prompt, chat=False)
            wants[prompt] = want["text"]

            # Streamed, with log-probabilities.
            text, logprobs = "", []
            stream = client.completions.create(
                model=model_id, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                stream=True, logprobs=0,
            )
            for chunk in stream:
                for choice in chunk.choices:
                    text += choice.text
                    if choice.logprobs is not None:
                        logprobs += choice.logprobs.token_logprobs
            assert text == want["text"], (model_id, prompt, text, want["text"])
            assert len(logprobs) == len(want["generated_ids"]), (len(logprobs), want)

            whole = client.completions.create(
                model=model_id, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
            )
            assert whole.choices[0].text == want["text"], (whole, want["text"])
            assert whole.usage.prompt_tokens == len(want["prompt_ids"]), whole.usage
            assert whole.usage.completion_tokens == len(want["generated_ids"]), whole.usage

            # Log-probabilities against --perplexity on the same ids.
            scored = perplexity(run_bin, model, prompt + want["text"])
            ids = want["prompt_ids"] + want["generated_ids"]
            agree = 0
            while agree < min(len(ids), len(scored["ids"])) and ids[agree] == scored["ids"][agree]:
                agree += 1
            prompt_len = len(want["prompt_ids"])
            usable = agree - prompt_len  # generated tokens whose whole context agrees
            assert usable >= 1, (model_id, prompt, ids, scored["ids"])
            for k in range(usable):
                got = logprobs[k]
                ref = scored["token_logprobs"][prompt_len - 1 + k]
                assert abs(got - ref) <= TOLERANCE, (model_id, prompt, k, got, ref)
                max_diff = max(max_diff, abs(got - ref))
                compared += 1
            if usable == len(want["generated_ids"]):
                full_logprob_checks += 1

            # Chat through the model's template.
            want_chat = greedy(run_bin, model, prompt, chat=True)
            messages = [{"role": "user", "content": prompt}]
            text = ""
            for chunk in client.chat.completions.create(
                model=model_id, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                stream=True,
            ):
                for choice in chunk.choices:
                    text += choice.delta.content or ""
            assert text == want_chat["text"], (model_id, prompt, text, want_chat["text"])
            whole = client.chat.completions.create(
                model=model_id, messages=messages, max_tokens=MAX_TOKENS, temperature=0
            )
            assert whole.choices[0].message.content == want_chat["text"]
            assert whole.usage.prompt_tokens == len(want_chat["prompt_ids"]), whole.usage

        # Every prompt at once, each twice (batched together, the second served partly from the
        # prefix cache when its prompt fills a KV block): still mixtral-run's text.
        def complete(prompt):
            reply = client.completions.create(
                model=model_id, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
            )
            return prompt, reply.choices[0].text

        with concurrent.futures.ThreadPoolExecutor(max_workers=2 * len(prompts)) as pool:
            for prompt, text in pool.map(complete, prompts * 2):
                assert text == wants[prompt], (model_id, prompt, text, wants[prompt])

        # An unknown model is the client's NotFoundError.
        try:
            client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
            raise AssertionError("unknown model accepted")
        except openai.NotFoundError:
            pass
    assert full_logprob_checks >= 1, f"{model_id}: no prompt re-tokenized to the same ids"
    print(
        f"{model_id}: {len(prompts)} prompts x (completion, chat) x (streamed, whole), and all at "
        f"once, equal "
        f"mixtral-run; {compared} log-probabilities within {TOLERANCE} of --perplexity "
        f"({full_logprob_checks} prompts in full; largest difference {max_diff:.3g})"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--model", action="append", required=True)
    a = parser.parse_args()
    for model in a.model:
        check_model(a.serve, a.run, model)
    print("openai client check passed")


if __name__ == "__main__":
    sys.exit(main())
