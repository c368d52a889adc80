"""Writes tests/fixtures/tokenizer/golden.json: reference encodings for the tokenizer tests.

- "encode": for each text, the ids sentencepiece gives with mistral-common's tokenizer.model.v1 (the
  model Mixtral-8x7B was released with) and sentencepiece's decoding of them. tokenizer.json (the
  Hub's form) splits runs of two or more spaces in front of a word differently from sentencepiece
  (' one' -> '▁▁' 'one' instead of '▁' '▁one'); for those texts, and only those, the Python
  `tokenizers` ids are recorded as well ("tokenizers_ids").
- "chat": for each conversation, the chat_template of models/tiny-mixtral/tokenizer_config.json
  rendered by jinja2 the way transformers' apply_chat_template renders it (sandboxed environment,
  trim_blocks, lstrip_blocks, raise_exception, add_generation_prompt), the ids of that text encoded
  by the Python `tokenizers` package without adding special tokens, or the error the template
  raised; and, where mistral-common accepts the conversation, the ids of its own instruct encoding.
- "templates": templates of this script's own that use the jinja2 features Hub templates rely on
  (Python string / dict methods, namespace, loop variables, filters, whitespace control, slicing,
  raise_exception), with jinja2's rendering of each conversation (or its error).

Setup: python3 -m venv /work/pyenv/tok && /work/pyenv/tok/bin/pip install mistral-common sentencepiece tokenizers jinja2
Run from the repository root: /work/pyenv/tok/bin/python scripts/make-tokenizer-fixtures.py
"""
import json
import os
import sys

import jinja2
import jinja2.ext
import jinja2.sandbox
import mistral_common
import sentencepiece as spm
from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(ROOT, "models", "tiny-mixtral")
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizer", "golden.json")

TEXTS = [
    "Hello world!",
    "The capital of France is",
    "Bonjour, ça va? Übergrößenträger",
    "naïve café, déjà vu, señor, smørrebrød",
    "Ελληνικά και русский текст",
    "日本語のテキストです。",
    "中文分词测试，标点符号！",
    "mixed 日本 and English",
    "emoji 🤗🚀 and a family 👩‍👩‍👧",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🦀",
    "tabs\tand\nnewlines\n\n",
    "line one\r\nline two",
    "digits 1234567890, pi 3.14159, -42",
    "  two leading spaces",
    " one leading space",
    "   three leading spaces",
    "a  b",
    "def f(x):\n    return x * 2\n",
    "trailing space ",
    "a",
    "",
    "[INST] What is 2+2? [/INST]",
    "<s> and </s> are plain text here",
    "x" * 50,
    "\u00a0non-breaking and\u200bzero-width",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
    [
        {"role": "user", "content": "Explique-moi ça : 日本語 🤗"},
        {"role": "assistant", "content": "D'accord."},
        {"role": "user", "content": "Merci\n\tbeaucoup"},
        {"role": "assistant", "content": "De rien !"},
    ],
    [{"role": "user", "content": ""}],
    # The released template has no system role: expected to raise.
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    # Bad role orders: expected to raise.
    [{"role": "assistant", "content": "I speak first."}],
    [
        {"role": "user", "content": "one"},
        {"role": "user", "content": "two"},
    ],
    [{"role": "user", "content": "hi"}, {"role": "tool", "content": "{}"}],
]


# Feature templates: each line of the Hub's templates' vocabulary, none of them a real model's.
FEATURE_TEMPLATES = [
    "{{ bos_token }}{% set ns = namespace(users=0) %}{% for m in messages %}"
    "{% if m.role == 'user' %}{% set ns.users = ns.users + 1 %}{% endif %}"
    "[{{ loop.index }}/{{ loop.length }} {{ m.role.upper() }}] {{ m.content.strip() }}"
    "{% if m.content.strip().startswith('Q') %}?{% endif %}{% if m.content.endswith('!!') %}!{% endif %}"
    "{% if not loop.last %} | {% endif %}{% endfor %} users={{ ns.users }} "
    "assistants={{ (messages | selectattr('role', 'equalto', 'assistant') | list) | length }}"
    "{% if add_generation_prompt %} >{% endif %}",
    "{% for m in messages %}\n"
    "    {% if m['role'] == 'system' %}\n"
    "<<SYS>>{{ m['content'] | trim }}<</SYS>>\n"
    "    {% else %}\n"
    "{{ m['role'] }}: {{ m['content'].lstrip().rstrip('!?') }}\n"
    "    {% endif %}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n"
    "assistant:\n"
    "{% endif %}\n",
    "{% for m in messages %}{% for k, v in m.items() %}{{ k }}={{ v | length }};{% endfor %}"
    "{{ m.get('name', 'anon') }},{{ m.get('role') }},{{ m.keys() | list | length }},"
    "{{ m.values() | list | length }} {{ m.content.split() | join('_') }} "
    "{{ m.content.lower().replace('q', 'k').split('o') | length }}{{ m.content.strip(' !?Q') }}\n{% endfor %}",
    "{% if messages | length > 3 %}{{ raise_exception('at most three messages, got ' ~ messages | length) }}{% endif %}"
    "{% set rest = messages[1:] %}{{ messages[0]['content'] ~ '|' ~ rest | length }}"
    "{% if system_message is defined %}defined{% else %}undefined{% endif %}{{ eos_token }}",
]

FEATURE_CONVERSATIONS = [
    [
        {"role": "system", "content": "  Be kind!  "},
        {"role": "user", "content": "  Question one?  "},
        {"role": "assistant", "content": "Answer one!!"},
        {"role": "user", "content": "Q2 split these\twords"},
    ],
    [{"role": "user", "content": "only one"}],
    [
        {"role": "user", "content": "Quoi? Ça va."},
        {"role": "assistant", "content": " Très bien!"},
    ],
]


def sentencepiece_model():
    path = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    return spm.SentencePieceProcessor(model_file=path)


def render(template_text, messages, config):
    """Renders like transformers' apply_chat_template (its jinja2 environment settings)."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template_text).render(
        messages=messages,
        bos_token=config["bos_token"],
        eos_token=config["eos_token"],
        add_generation_prompt=True,
    )


def mistral_common_ids(messages):
    """mistral-common's own instruct encoding (v1), or None where it rejects the conversation."""
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        SystemMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    kinds = {"user": UserMessage, "assistant": AssistantMessage, "system": SystemMessage}
    try:
        request = ChatCompletionRequest(
            messages=[kinds[m["role"]](content=m["content"]) for m in messages]
        )
        return MistralTokenizer.v1().encode_chat_completion(request).tokens
    except Exception:  # rejected roles or order
        return None


def main():
    sp = sentencepiece_model()
    hf = Tokenizer.from_file(os.path.join(MODEL_DIR, "tokenizer.json"))
    # Plain text: `<s>` written in a text is characters, as for sentencepiece.
    hf_plain = Tokenizer.from_file(os.path.join(MODEL_DIR, "tokenizer.json"))
    hf_plain.encode_special_tokens = True
    config = json.load(open(os.path.join(MODEL_DIR, "tokenizer_config.json")))

    encode = []
    for text in TEXTS:
        ids = sp.encode(text)
        case = {"text": text, "ids": ids, "decoded": sp.decode(ids)}
        hf_ids = hf_plain.encode(text, add_special_tokens=False).ids
        if hf_ids != ids:
            if "\u2581\u2581" not in "\u2581" + text.replace(" ", "\u2581"):
                sys.exit(f"tokenizer.json and sentencepiece disagree on {text!r} (no run of spaces)")
            case["tokenizers_ids"] = hf_ids
        encode.append(case)

    chat = []
    for messages in CONVERSATIONS:
        case = {"messages": messages}
        try:
            rendered = render(config["chat_template"], messages, config)
            case["rendered"] = rendered
            case["ids"] = hf.encode(rendered, add_special_tokens=False).ids
        except jinja2.exceptions.TemplateError as error:
            case["error"] = str(error)
        reference = mistral_common_ids(messages)
        if reference is not None and "ids" in case:
            case["mistral_common_ids"] = reference
            case["same_as_mistral_common"] = reference == case["ids"]
        chat.append(case)

    templates = []
    for template_text in FEATURE_TEMPLATES:
        outputs = []
        for messages in FEATURE_CONVERSATIONS:
            try:
                outputs.append({"messages": messages, "rendered": render(template_text, messages, config)})
            except jinja2.exceptions.TemplateError as error:
                outputs.append({"messages": messages, "error": str(error)})
        templates.append({"template": template_text, "cases": outputs})

    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(
            {
                "generator": "scripts/make-tokenizer-fixtures.py",
                "reference": "sentencepiece on mistral-common tokenizer.model.v1; jinja2 chat rendering",
                "versions": {
                    "sentencepiece": spm.__version__,
                    "mistral_common": mistral_common.__version__,
                    "jinja2": jinja2.__version__,
                },
                "encode": encode,
                "chat": chat,
                "templates": templates,
            },
            f,
            ensure_ascii=False,
            indent=1,
        )
        f.write("\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
