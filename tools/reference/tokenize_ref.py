#!/usr/bin/env python3
"""Reference token ids from the `tokenizers` Python package, built from a GGUF's vocabulary and merges
with the pre-tokenizers of the original models' tokenizer.json files (independent of the engine).

    tokenize_ref.py MODEL.gguf < texts.json > ids.json      # JSON list of strings → list of id lists
"""
import json
import sys

from gguf import GGUFReader
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def build(path):
    fields = GGUFReader(path).fields
    get = lambda k: fields[k].contents() if k in fields else None
    tokens, merges, types = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.merges"), get("tokenizer.ggml.token_type")
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges])
    tok = Tokenizer(bpe)
    pre = get("tokenizer.ggml.pre")
    if pre == "smollm":  # SmolLM2's tokenizer.json
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    elif pre == "llama-bpe":  # Llama 3's tokenizer.json
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    else:
        sys.exit(f"no reference for pre-tokenizer {pre}")
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t, ty in zip(tokens, types) if ty == 3])
    return tok


def main():
    tok = build(sys.argv[1])
    texts = json.load(sys.stdin)
    json.dump([tok.encode(t, add_special_tokens=False).ids for t in texts], sys.stdout)


if __name__ == "__main__":
    main()
