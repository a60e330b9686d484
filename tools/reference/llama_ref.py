#!/usr/bin/env python3
"""Independent numpy reference of a Llama forward pass over a GGUF file (f64 throughout).

Written from the model definition, not from the Rust code: weights are read and dequantized with the
`gguf` package, and every step (RMSNorm, RoPE incl. llama3 frequency scaling, GQA causal attention,
SwiGLU) is plain numpy.

    llama_ref.py MODEL.gguf --tokens 1,2,3 --out logits.f64      # logits [n_tokens, vocab], raw f64
"""
import argparse
import math

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize

# When set, products with quantized weights see the activations as ggml's CPU kernels do: rounded to
# 8-bit blocks of 32 (Q8_0 for Q4_0/Q8_0 weights, Q8_1 for Q4_1: q = rint(x · 127/amax), d = amax/127
# stored in f16), or to f16 for f16 weights. This is the documented math of ggml's dot products, so
# the reference then models the engine's arithmetic, not just the model.
EMULATE_ACTIVATIONS = False


def as_ggml_sees(x, weight_type):
    if not EMULATE_ACTIVATIONS or weight_type == Q.F32:
        return x
    if weight_type in (Q.F16, Q.BF16):
        return x.astype(np.float16).astype(np.float64)
    blocks = x.reshape(*x.shape[:-1], -1, 32).astype(np.float32)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    d = amax / np.float32(127)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    q = np.rint(blocks * inv)  # x·(127/amax), rounded half to even, in f32
    return (q * d.astype(np.float16).astype(np.float32)).reshape(x.shape).astype(np.float64)


class Weight:
    """A weight matrix with the type it is stored in; `x @ w` multiplies as y = x W^T."""

    __array_ufunc__ = None  # make numpy defer `ndarray @ Weight` to __rmatmul__

    def __init__(self, values, ggml_type):
        self.values, self.type = values, ggml_type

    def __rmatmul__(self, x):
        return as_ggml_sees(x, self.type) @ self.values.T


class Gguf:
    def __init__(self, path):
        self.reader = GGUFReader(path)
        self.tensors = {t.name: t for t in self.reader.tensors}

    def value(self, key, default=None):
        field = self.reader.fields.get(key)
        if field is None:
            return default
        return field.contents()

    def weight(self, name):
        return Weight(self.tensor(name), self.tensors[name].tensor_type)

    def tensor(self, name):
        """The tensor as float64 in numpy order (ggml's [ne0, ne1] becomes [ne1, ne0])."""
        t = self.tensors[name]
        return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(
            [int(d) for d in reversed(t.shape)]
        )


class StackConfig:
    def __init__(self, g, prefix, neox=False):
        k = lambda name, default=None: g.value(f"{prefix}.{name}", default)
        self.n_layer = int(k("block_count"))
        self.n_embd = int(k("embedding_length"))
        self.n_head = int(k("attention.head_count"))
        self.n_head_kv = int(k("attention.head_count_kv", self.n_head))
        self.head_dim = int(k("attention.key_length", self.n_embd // self.n_head))
        self.eps = float(k("attention.layer_norm_rms_epsilon"))
        self.base = float(k("rope.freq_base", 10000.0))
        self.n_rot = int(k("rope.dimension_count", self.head_dim))
        self.neox = neox
        self.scaling = None
        if k("rope.scaling.type") == "llama3":
            self.scaling = dict(
                factor=float(k("rope.scaling.factor")),
                low=float(k("rope.scaling.low_freq_factor")),
                high=float(k("rope.scaling.high_freq_factor")),
                orig=float(k("rope.scaling.original_context_length")),
            )

    def inv_freq(self):
        """Rotation speed of each dimension pair, after llama3 scaling when configured."""
        freqs = self.base ** (-np.arange(0, self.n_rot, 2, dtype=np.float64) / self.n_rot)
        if self.scaling is None:
            return freqs
        s = self.scaling
        out = []
        for f in freqs:
            wavelen = 2 * math.pi / f
            if wavelen < s["orig"] / s["high"]:
                out.append(f)
            elif wavelen > s["orig"] / s["low"]:
                out.append(f / s["factor"])
            else:
                smooth = (s["orig"] / wavelen - s["low"]) / (s["high"] - s["low"])
                out.append((1 - smooth) * f / s["factor"] + smooth * f)
        return np.array(out)


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, positions, cfg):
    """x: [n, heads, head_dim]. Normal layout rotates pairs (2i, 2i+1); NeoX pairs (i, i + n_rot/2)."""
    angles = np.outer(positions, cfg.inv_freq())  # [n, n_rot/2]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    out = x.copy()
    half = cfg.n_rot // 2
    if cfg.neox:
        a, b = x[..., :half], x[..., half : cfg.n_rot]
        out[..., :half] = a * cos - b * sin
        out[..., half : cfg.n_rot] = a * sin + b * cos
    else:
        a, b = x[..., 0 : cfg.n_rot : 2], x[..., 1 : cfg.n_rot : 2]
        out[..., 0 : cfg.n_rot : 2] = a * cos - b * sin
        out[..., 1 : cfg.n_rot : 2] = a * sin + b * cos
    return out


class Stack:
    """A Llama transformer stack with a KV cache of plain arrays (positions kept per entry)."""

    def __init__(self, g, cfg, prefix=""):
        self.cfg = cfg
        name = lambda l, n: f"{prefix}blk.{l}.{n}.weight"
        norms = ("attn_norm", "ffn_norm")
        matrices = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
        self.layers = [
            {**{n: g.tensor(name(l, n)) for n in norms}, **{n: g.weight(name(l, n)) for n in matrices}}
            for l in range(cfg.n_layer)
        ]
        self.out_norm = g.tensor(f"{prefix}output_norm.weight")
        self.reset()

    def reset(self):
        self.keys = [np.zeros((0, self.cfg.n_head_kv, self.cfg.head_dim)) for _ in self.layers]
        self.values = [np.zeros((0, self.cfg.n_head_kv, self.cfg.head_dim)) for _ in self.layers]
        self.positions = np.zeros(0, dtype=np.int64)

    def forward(self, x, positions):
        """x: [n, n_embd] embeddings of new tokens at `positions` → final-normed hidden [n, n_embd]."""
        c = self.cfg
        n = x.shape[0]
        all_pos = np.concatenate([self.positions, positions])
        group = c.n_head // c.n_head_kv
        for l, L in enumerate(self.layers):
            h = rms_norm(x, L["attn_norm"], c.eps)
            q = rope((h @ L["attn_q"]).reshape(n, c.n_head, c.head_dim), positions, c)
            k = rope((h @ L["attn_k"]).reshape(n, c.n_head_kv, c.head_dim), positions, c)
            v = (h @ L["attn_v"]).reshape(n, c.n_head_kv, c.head_dim)
            self.keys[l] = np.concatenate([self.keys[l], k])
            self.values[l] = np.concatenate([self.values[l], v])
            out = np.zeros((n, c.n_head, c.head_dim))
            for head in range(c.n_head):
                kv = head // group
                scores = q[:, head, :] @ self.keys[l][:, kv, :].T / math.sqrt(c.head_dim)
                scores = np.where(all_pos[None, :] <= positions[:, None], scores, -np.inf)
                scores -= scores.max(axis=1, keepdims=True)
                p = np.exp(scores)
                p /= p.sum(axis=1, keepdims=True)
                out[:, head, :] = p @ self.values[l][:, kv, :]
            x = x + out.reshape(n, -1) @ L["attn_output"]
            h = rms_norm(x, L["ffn_norm"], c.eps)
            gate = h @ L["ffn_gate"]
            x = x + (gate / (1 + np.exp(-gate)) * (h @ L["ffn_up"])) @ L["ffn_down"]
        self.positions = all_pos
        return rms_norm(x, self.out_norm, c.eps)


def text_logits(path, tokens, steps=None):
    """Logits [n, vocab] of a `llama` GGUF for `tokens`, evaluated in chunks of `steps` sizes."""
    g = Gguf(path)
    stack = Stack(g, StackConfig(g, "llama"))
    embd = g.tensor("token_embd.weight")
    head = g.weight("output.weight" if "output.weight" in g.tensors else "token_embd.weight")
    tokens = np.asarray(tokens)
    out, start = [], 0
    for size in steps or [len(tokens)]:
        chunk = tokens[start : start + size]
        hidden = stack.forward(embd[chunk], np.arange(start, start + len(chunk)))
        out.append(hidden @ head)
        start += len(chunk)
    return np.concatenate(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--tokens", required=True, help="comma-separated token ids")
    ap.add_argument("--emulate-activations", action="store_true", help="round activations as ggml's quantized dot products do")
    ap.add_argument("--out", required=True, help="where to write the logits (raw little-endian float64, row-major)")
    args = ap.parse_args()
    global EMULATE_ACTIVATIONS
    EMULATE_ACTIVATIONS = args.emulate_activations
    tokens = [int(t) for t in args.tokens.split(",")]
    text_logits(args.model, tokens).astype("<f8").tofile(args.out)


if __name__ == "__main__":
    main()
