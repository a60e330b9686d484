"""A small deterministic byte-level BPE vocabulary for the sample models.

Tokens are in GPT-2's byte-to-unicode alphabet, as GGUF stores them. Merges are learned greedily
(most frequent adjacent pair, ties broken by the pair itself) from a fixed corpus, split into words
with their leading space, so the same run always gives the same vocabulary.
"""
import re
from collections import Counter

CORPUS = """
The quick brown fox jumps over the lazy dog. Hello there, how are you today?
In 1983 the Jargon File was printed as a book; the 4th edition has 2,000 entries!
Speech models turn text into audio frames: 12.5 frames per second, 24 kHz, 32 codebooks.
She said: "it's fine, we'll see", and they're sure that I'd come. Café, naïve, résumé, 東京, Привет.
Tabs\tand  double  spaces, newlines

and more newlines. Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 12345.
"""

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def bytes_to_unicode():
    """GPT-2's reversible map from bytes to printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def train(n_merges, corpus=CORPUS, specials=SPECIAL_TOKENS):
    """Returns (tokens, merges, token_types): specials, the 256 byte tokens, then merged tokens."""
    byte_map = bytes_to_unicode()
    words = Counter(re.findall(r" ?[^\s]+|\s+", corpus))
    seqs = {w: [byte_map[b] for b in w.encode("utf-8")] for w in words}
    tokens = list(specials) + [byte_map[b] for b in range(256)]
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[(a, b)] += words[w]
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    return tokens, merges, types


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>"]
LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def llama3_tokenizer_json(n_merges, pad_to=None):
    """A tokenizer.json in HF's format with Llama 3's pre-tokenizer and special tokens (specials last,
    as in Llama 3), optionally padded with unused tokens to `pad_to` entries."""
    tokens, merges, _ = train(n_merges, specials=[])
    pad = max(0, (pad_to or 0) - len(tokens) - len(LLAMA3_SPECIALS))
    tokens += [f"<|reserved_{i}|>" for i in range(pad)]
    vocab = {t: i for i, t in enumerate(tokens)}
    added = [{"id": len(tokens) + i, "content": t, "special": True} for i, t in enumerate(LLAMA3_SPECIALS)]
    return {
        "model": {"type": "BPE", "vocab": vocab, "merges": merges},
        "added_tokens": added,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
    }
