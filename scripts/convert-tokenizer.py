"""Builds tokenizer.json for Mixtral-8x7B / Mistral-7B-v0.1 from mistral-common's tokenizer.model.v1
(the sentencepiece model those checkpoints were released with), in the form the Hub's files use:
normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer, BPE with byte fallback, a "<s> $A"
post-processor (one BOS), and the Replace/ByteFallback/Fuse/Strip decoder.

Usage: python scripts/convert-tokenizer.py models/tiny-mixtral/tokenizer.json
Needs: pip install mistral-common transformers sentencepiece protobuf tokenizers
Checks itself against sentencepiece on a few strings; the known difference (runs of spaces in front of a
word, e.g. code indentation) is one the Hub's own file shares."""
import json, os, shutil, sys, tempfile
import mistral_common, sentencepiece as spm
from tokenizers import Tokenizer
from transformers import LlamaTokenizer

src = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
tmp = tempfile.mkdtemp()
shutil.copy(src, os.path.join(tmp, "tokenizer.model"))
LlamaTokenizer.from_pretrained(tmp, legacy=True).save_pretrained(tmp + "/out")
j = json.load(open(tmp + "/out/tokenizer.json"))
j["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                   {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
j["pre_tokenizer"] = None
j["post_processor"] = {"type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
    "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
             {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
    "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
out = sys.argv[1] if len(sys.argv) > 1 else "tokenizer.json"
json.dump(j, open(out, "w"), ensure_ascii=False)
sp, t = spm.SentencePieceProcessor(model_file=src), Tokenizer.from_file(out)
for s in ["Hello world!", "Bonjour, ça va? Übergrößenträger 日本語 🤗", "tabs\tand\nnewlines\n\n", "  two leading"]:
    assert sp.encode(s) == t.encode(s, add_special_tokens=False).ids, s
assert t.encode("Hello", add_special_tokens=True).ids[0] == 1
print("wrote", out)
