#!/usr/bin/env python3
"""An independent numpy (float64) Mimi decoder reading our Mimi GGUF: codes -> samples, stage by stage.

    mimi_ref.py MODEL.gguf --codes codes.json --out samples.f64 [--stages DIR]

codes.json: {"codes": [[code per frame] per codebook]}. Writes the samples as raw little-endian f64 and,
with --stages, each stage's output (latent, upsampled, transformer, SEANet blocks) as .npy files.
Written from the architecture (moshi's modules), not from the engine's graph code.
"""
import argparse
import json
import os

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def read(path, prefix=""):
    r = GGUFReader(path)
    meta = {}
    for k, f in r.fields.items():
        if not k.startswith("mimi."):
            continue
        v = f.parts[f.data[0]] if len(f.data) == 1 else [f.parts[i] for i in f.data]
        if isinstance(v, list):
            meta[k] = [int(x[0]) for x in v]
        elif f.types[0].name == "STRING":
            meta[k] = bytes(v).decode()
        else:
            meta[k] = v[0].item()
    tensors = {}
    for t in r.tensors:
        if t.name.startswith(prefix):
            shape = tuple(int(x) for x in reversed(t.shape))
            tensors[t.name[len(prefix):]] = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float64)
    return meta, tensors


def elu(x):
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0)))


def gelu(x):
    from math import erf, sqrt
    return 0.5 * x * (1 + np.vectorize(erf)(x / sqrt(2)))


def causal_conv(x, w, b, dilation=1):
    """x [Cin, T]; w (Cout, K, Cin): y[:, t] = sum_k w[:, k, :] @ x[:, t - (K-1-k)·d] (zeros before 0)."""
    cout, k, cin = w.shape
    pad = (k - 1) * dilation
    xp = np.concatenate([np.zeros((cin, pad)), x], axis=1)
    t = x.shape[1]
    y = np.zeros((cout, t))
    for j in range(k):
        y += w[:, j, :] @ xp[:, j * dilation:j * dilation + t]
    return y + b[:, None]


def conv_transpose(x, w, b, stride):
    """x [Cin, T]; w (K, Cout, Cin): full transposed conv, the last K - stride samples trimmed (causal)."""
    k, cout, _ = w.shape
    t = x.shape[1]
    y = np.zeros((cout, (t - 1) * stride + k))
    for j in range(k):
        y[:, j:j + (t - 1) * stride + 1:stride] += w[j] @ x
    return y[:, :t * stride] + b[:, None]


def layer_norm(x, w, b, eps):
    mu = x.mean(axis=0, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=0, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w[:, None] + b[:, None]


def rope(x, positions, theta, neox):
    """x [T, H, D] rotated at absolute positions; interleaved pairs, or halves (neox)."""
    d = x.shape[-1]
    freqs = theta ** (-np.arange(0, d // 2) * 2.0 / d)
    ang = positions[:, None, None] * freqs[None, None, :]
    cos, sin = np.cos(ang), np.sin(ang)
    if neox:
        a, b = x[..., :d // 2], x[..., d // 2:]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


def decode(meta, w, codes, stages=None):
    def keep(name, value):
        if stages is not None:
            np.save(os.path.join(stages, name + ".npy"), value)
        return value

    m = lambda k: meta["mimi." + k]  # noqa: E731
    n_sem, size = m("semantic_codebook_count"), m("codebook_size")
    k_used, frames = codes.shape
    book = w["quantizer.codebooks.weight"]  # (n_q * size, dim)
    emb = np.stack([book[codes[k] + k * size] for k in range(k_used)])  # [K, T, dim]
    latent = w["quantizer.semantic_proj.weight"] @ emb[:n_sem].sum(axis=0).T
    if k_used > n_sem:
        latent += w["quantizer.acoustic_proj.weight"] @ emb[n_sem:].sum(axis=0).T
    keep("latent", latent)
    taps = w["upsample.weight"]  # (K, C)
    stride = m("upsample_stride")
    x = np.zeros((latent.shape[0], (frames - 1) * stride + taps.shape[0]))
    for j in range(taps.shape[0]):
        x[:, j:j + (frames - 1) * stride + 1:stride] += taps[j][:, None] * latent
    x = keep("upsampled", x[:, :frames * stride])

    steps = x.shape[1]
    heads, kv_heads, hd = m("transformer.head_count"), m("transformer.head_count_kv"), m("transformer.key_length")
    context, eps, theta = m("transformer.context_length"), m("transformer.layer_norm_epsilon"), m("transformer.rope.freq_base")
    neox = m("rope_layout") == "neox"
    pos = np.arange(steps, dtype=np.float64)
    delta = pos[:, None] - pos[None, :]
    allowed = (delta >= 0) & (delta < context)
    for l in range(m("transformer.block_count")):
        p = f"transformer.blk.{l}."
        h = layer_norm(x, w[p + "attn_norm.weight"], w[p + "attn_norm.bias"], eps).T  # [T, d]
        qkv = w[p + "attn_qkv.weight"]
        wq, wk, wv = qkv[:heads * hd], qkv[heads * hd:(heads + kv_heads) * hd], qkv[(heads + kv_heads) * hd:]
        q = rope((h @ wq.T).reshape(steps, heads, hd), pos, theta, neox)
        k = rope((h @ wk.T).reshape(steps, kv_heads, hd), pos, theta, neox)
        v = (h @ wv.T).reshape(steps, kv_heads, hd)
        out = np.zeros((steps, heads, hd))
        for hh in range(heads):
            g = hh // (heads // kv_heads)
            s = q[:, hh] @ k[:, g].T / np.sqrt(hd)
            s = np.where(allowed, s, -np.inf)
            s = np.exp(s - s.max(axis=1, keepdims=True))
            out[:, hh] = (s / s.sum(axis=1, keepdims=True)) @ v[:, g]
        attn = out.reshape(steps, heads * hd) @ w[p + "attn_output.weight"].T
        x = x + (attn * w[p + "attn_scale.weight"]).T
        h = layer_norm(x, w[p + "ffn_norm.weight"], w[p + "ffn_norm.bias"], eps).T
        ff = gelu(h @ w[p + "ffn_up.weight"].T) @ w[p + "ffn_down.weight"].T
        x = x + (ff * w[p + "ffn_scale.weight"]).T
    keep("transformer", x)

    x = causal_conv(x, w["decoder.conv_in.weight"], w["decoder.conv_in.bias"])
    for i, ratio in enumerate(m("seanet.ratios")):
        x = conv_transpose(elu(x), w[f"decoder.up.{i}.weight"], w[f"decoder.up.{i}.bias"], ratio)
        for j in range(m("seanet.residual_layers")):
            p = f"decoder.res.{i}.{j}."
            hdn = causal_conv(elu(x), w[p + "conv1.weight"], w[p + "conv1.bias"], m("seanet.dilation_base") ** j)
            x = x + causal_conv(elu(hdn), w[p + "conv2.weight"], w[p + "conv2.bias"])
        keep(f"seanet{i}", x)
    x = causal_conv(elu(x), w["decoder.conv_out.weight"], w["decoder.conv_out.bias"])
    return x[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--codes", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--prefix", default="", help="tensor name prefix (`codec.` inside a CSM GGUF)")
    ap.add_argument("--stages")
    args = ap.parse_args()
    meta, w = read(args.model, args.prefix)
    with open(args.codes) as f:
        codes = np.array(json.load(f)["codes"], dtype=np.int64)
    if args.stages:
        os.makedirs(args.stages, exist_ok=True)
    decode(meta, w, codes, args.stages).astype("<f8").tofile(args.out)


if __name__ == "__main__":
    main()
