#!/usr/bin/env python3
"""Converts a Mimi codec checkpoint (the decoder path, and the encoder path when the checkpoint has it) to our
Mimi GGUF.

    convert_mimi.py SRC -o OUT.gguf [--outtype f32|f16|q8_0] [--config moshi-config.json]

SRC is one of
  - a transformers folder (`kyutai/mimi`: config.json + model.safetensors),
  - a `sesame/csm-1b` transformers folder, whose codec sits under `codec_model.` (its config.json has
    `codec_config`; the weights may be sharded with a model.safetensors.index.json),
  - a moshi `.safetensors` file (e.g. tokenizer-e351c8d8-checkpoint125.safetensors, which CSM's reference
    code loads). It holds no hyperparameters: Mimi's published ones are assumed unless `--config` gives a
    JSON object in moshi's form ({"sample_rate", "frame_rate", "seanet": {...}, "quantizer": {...},
    "transformer": {...}}, any key left out keeps the published value).

What the GGUF holds: `general.architecture = "mimi"`, hyperparameters under `mimi.*`, and tensors in
ggml's layouts (numpy shapes are ggml's reversed):
  quantizer.codebooks.weight        (n_q * size, dim)  centroids = embed_sum / max(usage, 1e-5), semantic first
  quantizer.{semantic,acoustic}_proj.weight  (hidden, dim)
  upsample.weight                   (2 * stride, hidden)  depthwise taps
  transformer.blk.L.{attn_norm,ffn_norm}.{weight,bias}, attn_qkv.weight (rows q, k, v), attn_output.weight,
                    ffn_up/ffn_down.weight,
                    attn_scale.weight, ffn_scale.weight (LayerScale)
  decoder.conv_in / decoder.conv_out / decoder.res.I.J.conv1 / conv2  (Cout, K, Cin) + .bias  (causal convs)
  decoder.up.I                      (K, Cout, Cin) + .bias  (transposed convs)
and, when the checkpoint has the encoder (a file without it still decodes):
  encoder.conv_in / encoder.res.I.J.conv1 / conv2 / encoder.down.I (strided, K = 2·stride) / encoder.conv_out
                                    (Cout, K, Cin) + .bias
  encoder.transformer.blk.L.*       as transformer.blk.L.*, the encoder transformer's own weights
  encoder.downsample.weight         (C, 2·stride, C)  learnt downsampling conv, no bias
  quantizer.{semantic,acoustic}_in_proj.weight  (dim, hidden)  the quantizer's input projections
The fused q/k/v of moshi is split; the RoPE pair layout is recorded in `mimi.rope_layout` (`normal` for
moshi's interleaved pairs, `neox` for transformers' permuted q/k); weight norm (weight_g / weight_v) is
folded. `convert_csm.py --mimi SRC` embeds the same tensors, prefixed `codec.`, in a CSM GGUF.
"""
import argparse
import copy
import json
import os
import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples"))
import safetensors_io  # noqa: E402

# Mimi's published hyperparameters, in moshi's form (moshi/models/loaders.py).
PUBLISHED = {
    "sample_rate": 24000,
    "frame_rate": 12.5,
    "seanet": {"channels": 1, "dimension": 512, "n_filters": 64, "n_residual_layers": 1, "ratios": [8, 6, 5, 4], "kernel_size": 7,
               "residual_kernel_size": 3, "last_kernel_size": 3, "dilation_base": 2, "compress": 2, "true_skip": True, "pad_mode": "constant"},
    "quantizer": {"dimension": 256, "n_q": 32, "bins": 2048, "input_dimension": 512, "output_dimension": 512},
    "transformer": {"d_model": 512, "num_heads": 8, "num_layers": 8, "layer_scale": 0.01, "context": 250, "max_period": 10000,
                    "dim_feedforward": 2048, "norm": "layer_norm", "gating": "none", "positional_embedding": "rope"},
}
CODEBOOK_EPSILON = 1e-5


def fail(message):
    sys.exit(f"error: {message}")


def from_moshi(c):
    s, q, t = c["seanet"], c["quantizer"], c["transformer"]
    if not s.get("true_skip", True) or s.get("pad_mode", "constant") != "constant":
        fail("only true-skip residual units and constant (zero) causal padding are supported")
    if t.get("gating", "none") != "none" or t.get("norm", "layer_norm") != "layer_norm" or t.get("positional_embedding", "rope") != "rope":
        fail("the decoder transformer must use LayerNorm, RoPE and a plain GELU MLP")
    if t["d_model"] != s["dimension"] or q.get("output_dimension", s["dimension"]) != s["dimension"]:
        fail("the transformer width and the quantizer output must equal the SEANet dimension")
    return {
        "sample_rate": c["sample_rate"], "frame_rate": c["frame_rate"], "channels": s["channels"], "hidden": s["dimension"],
        "filters": s["n_filters"], "ratios": list(s["ratios"]), "kernel_size": s["kernel_size"], "last_kernel_size": s["last_kernel_size"],
        "residual_kernel_size": s["residual_kernel_size"], "residual_layers": s["n_residual_layers"], "dilation_base": s["dilation_base"],
        "compress": s["compress"], "n_q": q["n_q"], "n_semantic": 1, "codebook_size": q["bins"], "codebook_dim": q["dimension"],
        "n_layer": t["num_layers"], "n_head": t["num_heads"], "n_head_kv": t["num_heads"], "ffn": t["dim_feedforward"],
        "context": t["context"], "norm_eps": 1e-5, "rope_theta": float(t["max_period"]),
    }


def from_hf(c):
    if c.get("use_conv_shortcut") or c.get("pad_mode", "constant") != "constant" or c.get("hidden_act", "gelu") != "gelu":
        fail("only true-skip residual units, constant causal padding and GELU are supported")
    if c.get("codebook_dim", 256) != c.get("vector_quantization_hidden_dimension", 256):
        fail("codebook_dim and vector_quantization_hidden_dimension differ")
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    return {
        # transformers writes `frame_rate` (older) or `_frame_rate` (newer); Mimi's is 12.5 Hz.
        "sample_rate": c["sampling_rate"], "frame_rate": c.get("frame_rate") or c.get("_frame_rate") or 12.5, "channels": c["audio_channels"], "hidden": hidden,
        "filters": c["num_filters"], "ratios": list(c["upsampling_ratios"]), "kernel_size": c["kernel_size"],
        "last_kernel_size": c["last_kernel_size"], "residual_kernel_size": c["residual_kernel_size"],
        "residual_layers": c["num_residual_layers"], "dilation_base": c["dilation_growth_rate"], "compress": c["compress"],
        "n_q": c["num_quantizers"], "n_semantic": c["num_semantic_quantizers"], "codebook_size": c["codebook_size"],
        "codebook_dim": c["codebook_dim"], "n_layer": c["num_hidden_layers"], "n_head": heads,
        "n_head_kv": c.get("num_key_value_heads", heads), "head_dim": c.get("head_dim") or hidden // heads, "ffn": c["intermediate_size"],
        "context": c["sliding_window"], "norm_eps": c["norm_eps"], "rope_theta": float(c["rope_theta"]),
    }


def merged(base, override):
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merged(out[k], v)
        else:
            out[k] = v
    return out


def load_safetensors(path):
    """One file, or a folder's model.safetensors, or its shards (model.safetensors.index.json)."""
    if os.path.isfile(path):
        return safetensors_io.load(path)
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return safetensors_io.load(single)
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.exists(index):
        fail(f"{path}: no model.safetensors or model.safetensors.index.json")
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    tensors = {}
    for shard in shards:
        tensors.update(safetensors_io.load(os.path.join(path, shard)))
    return tensors


def load_source(src, config_path=None):
    """(tensors without any `codec_model.` prefix, naming 'hf' or 'moshi', normalized config)."""
    tensors = load_safetensors(src)
    if any(k.startswith("codec_model.") for k in tensors):
        tensors = {k[len("codec_model."):]: v for k, v in tensors.items() if k.startswith("codec_model.")}
    if "decoder.layers.0.conv.weight" in tensors or "decoder.layers.0.conv.parametrizations.weight.original1" in tensors:
        naming = "hf"
    elif any(k.startswith("decoder.model.0.conv.conv.") for k in tensors):
        naming = "moshi"
    else:
        fail(f"{src}: neither transformers' nor moshi's Mimi naming (no decoder layer 0 conv)")
    if naming == "hf":
        cfg_file = config_path or (os.path.join(src, "config.json") if os.path.isdir(src) else None)
        if not cfg_file or not os.path.exists(cfg_file):
            fail(f"{src}: a transformers checkpoint needs its config.json")
        with open(cfg_file) as f:
            c = json.load(f)
        config = from_hf(c.get("codec_config", c))
    else:
        override = {}
        if config_path:
            with open(config_path) as f:
                override = json.load(f)
        config = from_moshi(merged(PUBLISHED, override))
    config.setdefault("head_dim", config["hidden"] // config["n_head"])
    return tensors, naming, config


def weight(tensors, prefix):
    """A conv or linear weight, weight norm folded (w = g · v / ‖v‖ over every dim but the first)."""
    if prefix + "weight" in tensors:
        return np.asarray(tensors[prefix + "weight"], dtype=np.float32)
    for g_name, v_name in [("weight_g", "weight_v"), ("parametrizations.weight.original0", "parametrizations.weight.original1")]:
        if prefix + v_name in tensors:
            g = np.asarray(tensors[prefix + g_name], dtype=np.float64)
            v = np.asarray(tensors[prefix + v_name], dtype=np.float64)
            norm = np.sqrt(np.sum(v * v, axis=tuple(range(1, v.ndim)), keepdims=True))
            return (g.reshape(norm.shape) * v / norm).astype(np.float32)
    fail(f"missing tensor {prefix}weight")


def get(tensors, name):
    if name not in tensors:
        fail(f"missing tensor {name}")
    return np.asarray(tensors[name], dtype=np.float32)


def codebooks(tensors, naming, config):
    layers = []
    groups = [(config["n_semantic"], "semantic"), (config["n_q"] - config["n_semantic"], "acoustic")]
    for count, group in groups:
        for i in range(count):
            if naming == "hf":
                p = f"quantizer.{group}_residual_vector_quantizer.layers.{i}.codebook."
                sums, usage = p + "embed_sum", p + "cluster_usage"
            else:
                p = f"quantizer.{'rvq_first' if group == 'semantic' else 'rvq_rest'}.vq.layers.{i}._codebook."
                sums = p + ("embedding_sum" if p + "embedding_sum" in tensors else "embed_sum")
                usage = p + ("cluster_usage" if p + "cluster_usage" in tensors else "cluster_size")
            layers.append(get(tensors, sums) / np.maximum(get(tensors, usage), CODEBOOK_EPSILON)[:, None])
    return np.concatenate(layers, axis=0)


def projection(tensors, naming, group):
    if naming == "hf":
        name = f"quantizer.{group}_residual_vector_quantizer.output_proj."
    else:
        name = f"quantizer.{'rvq_first' if group == 'semantic' else 'rvq_rest'}.output_proj."
    w = weight(tensors, name)
    return w.reshape(w.shape[0], w.shape[1])


def transformer_tensors(tensors, naming, config, side="decoder", ours_prefix="transformer."):
    """One of the two transformers (`side`: decoder or encoder), under `ours_prefix`."""
    out = {}
    d = config["hidden"]
    for l in range(config["n_layer"]):
        ours = f"{ours_prefix}blk.{l}."
        if naming == "hf":
            p = f"{side}_transformer.layers.{l}."
            q, k, v = (get(tensors, p + f"self_attn.{x}_proj.weight") for x in "qkv")
            o = get(tensors, p + "self_attn.o_proj.weight")
            norms = {"attn_norm": p + "input_layernorm.", "ffn_norm": p + "post_attention_layernorm."}
            up, down = get(tensors, p + "mlp.fc1.weight"), get(tensors, p + "mlp.fc2.weight")
            scales = {"attn_scale": p + "self_attn_layer_scale.scale", "ffn_scale": p + "mlp_layer_scale.scale"}
        else:
            p = f"{side}_transformer.transformer.layers.{l}."
            fused = p + "self_attn.in_proj_weight"
            qkv = get(tensors, fused if fused in tensors else p + "self_attn.in_projs.0.weight")
            q_rows, kv_rows = config["n_head"] * config["head_dim"], config["n_head_kv"] * config["head_dim"]
            q, k, v = qkv[:q_rows], qkv[q_rows:q_rows + kv_rows], qkv[q_rows + kv_rows:]
            out_name = p + "self_attn.out_proj.weight"
            o = get(tensors, out_name if out_name in tensors else p + "self_attn.out_projs.0.weight")
            norms = {"attn_norm": p + "norm1.", "ffn_norm": p + "norm2."}
            up, down = get(tensors, p + "linear1.weight"), get(tensors, p + "linear2.weight")
            scales = {"attn_scale": p + "layer_scale_1.scale", "ffn_scale": p + "layer_scale_2.scale"}
        # One product for q, k and v: rows q, then k, then v.
        out[ours + "attn_qkv.weight"] = np.concatenate([q, k, v], axis=0)
        for name, w in [("attn_output", o), ("ffn_up", up), ("ffn_down", down)]:
            out[ours + name + ".weight"] = w
        for name, p_norm in norms.items():
            out[ours + name + ".weight"] = get(tensors, p_norm + "weight")
            out[ours + name + ".bias"] = get(tensors, p_norm + "bias")
        for name, p_scale in scales.items():
            out[ours + name + ".weight"] = get(tensors, p_scale)
        if q.shape != (config["n_head"] * config["head_dim"], d):
            fail(f"layer {l}: q projection {q.shape} does not fit {config['n_head']} heads of {config['head_dim']} over width {d}")
    return out


def seanet_tensors(tensors, naming, config):
    """The SEANet decoder's convolutions at their sequential indices (the same in both namings)."""
    out = {}
    top = "decoder.layers." if naming == "hf" else "decoder.model."
    conv = ("conv." if naming == "hf" else "conv.conv.")
    convtr = ("conv." if naming == "hf" else "convtr.convtr.")

    def causal(ours, n, inner=""):
        p = f"{top}{n}.{inner}{conv}"
        w = weight(tensors, p)  # torch [Cout, Cin, K]
        out[ours + ".weight"] = np.ascontiguousarray(w.transpose(0, 2, 1))  # (Cout, K, Cin): rows are windows of K·Cin
        out[ours + ".bias"] = get(tensors, p + "bias")

    r = config["residual_layers"]
    causal("decoder.conv_in", 0)
    for i in range(len(config["ratios"])):
        base = 1 + i * (2 + r)
        p = f"{top}{base + 1}.{convtr}"
        w = weight(tensors, p)  # torch [Cin, Cout, K]
        out[f"decoder.up.{i}.weight"] = np.ascontiguousarray(w.transpose(2, 1, 0))  # (K, Cout, Cin)
        out[f"decoder.up.{i}.bias"] = get(tensors, p + "bias")
        for j in range(r):
            n = base + 2 + j
            causal(f"decoder.res.{i}.{j}.conv1", n, "block.1.")
            causal(f"decoder.res.{i}.{j}.conv2", n, "block.3.")
    causal("decoder.conv_out", 2 + len(config["ratios"]) * (2 + r))
    return out


def conv_weight(w):
    """torch [Cout, Cin, K] → ours (Cout, K, Cin): rows are windows of K·Cin."""
    return np.ascontiguousarray(w.transpose(0, 2, 1))


def has_encoder(tensors, naming):
    first = "encoder.layers.0.conv." if naming == "hf" else "encoder.model.0.conv.conv."
    down = "downsample.conv." if naming == "hf" else "downsample.conv.conv.conv."
    return any(first + x in tensors for x in ["weight", "weight_v", "parametrizations.weight.original1"]) and any(
        down + x in tensors for x in ["weight", "weight_v", "parametrizations.weight.original1"])


def encoder_tensors(tensors, naming, config):
    """The encode path: SEANet encoder convs at their sequential indices, the encoder transformer, the
    learnt downsampling conv and the quantizer's input projections."""
    out = {}
    top = "encoder.layers." if naming == "hf" else "encoder.model."
    conv = "conv." if naming == "hf" else "conv.conv."

    def causal(ours, n, inner=""):
        p = f"{top}{n}.{inner}{conv}"
        out[ours + ".weight"] = conv_weight(weight(tensors, p))
        out[ours + ".bias"] = get(tensors, p + "bias")

    r = config["residual_layers"]
    causal("encoder.conv_in", 0)
    for i in range(len(config["ratios"])):
        base = 1 + i * (2 + r)
        for j in range(r):
            causal(f"encoder.res.{i}.{j}.conv1", base + j, "block.1.")
            causal(f"encoder.res.{i}.{j}.conv2", base + j, "block.3.")
        causal(f"encoder.down.{i}", base + r + 1)
    causal("encoder.conv_out", 2 + len(config["ratios"]) * (2 + r))
    out.update(transformer_tensors(tensors, naming, config, side="encoder", ours_prefix="encoder.transformer."))
    down = weight(tensors, "downsample.conv." if naming == "hf" else "downsample.conv.conv.conv.")  # [C, C, 2·stride]
    out["encoder.downsample.weight"] = conv_weight(down)
    for group in ["semantic", "acoustic"]:
        if naming == "hf":
            name = f"quantizer.{group}_residual_vector_quantizer.input_proj."
        else:
            name = f"quantizer.{'rvq_first' if group == 'semantic' else 'rvq_rest'}.input_proj."
        w = weight(tensors, name)
        out[f"quantizer.{group}_in_proj.weight"] = w.reshape(w.shape[0], w.shape[1])
    return out


def mimi_tensors(tensors, naming, config):
    """Our tensor names → float32 numpy arrays (numpy shape = ggml's reversed)."""
    out = {"quantizer.codebooks.weight": codebooks(tensors, naming, config),
           "quantizer.semantic_proj.weight": projection(tensors, naming, "semantic"),
           "quantizer.acoustic_proj.weight": projection(tensors, naming, "acoustic")}
    up = weight(tensors, "upsample.conv." if naming == "hf" else "upsample.convtr.convtr.convtr.")  # [C, 1, K]
    out["upsample.weight"] = np.ascontiguousarray(up[:, 0, :].T)
    out.update(transformer_tensors(tensors, naming, config))
    out.update(seanet_tensors(tensors, naming, config))
    if has_encoder(tensors, naming):
        out.update(encoder_tensors(tensors, naming, config))
    else:
        print("note: the checkpoint has no encoder (or no downsampling conv): the GGUF decodes only", file=sys.stderr)
    return out


def upsample_stride(config):
    encoder_rate = config["sample_rate"] / float(np.prod(config["ratios"]))
    stride = encoder_rate / config["frame_rate"]
    if abs(stride - round(stride)) > 1e-9 or round(stride) < 1:
        fail(f"frame rate {config['frame_rate']} is not an integer fraction of the SEANet rate {encoder_rate}")
    return int(round(stride))


def write_metadata(w, config, naming):
    k = "mimi."
    w.add_uint32(k + "sample_rate", config["sample_rate"])
    w.add_uint32(k + "channels", config["channels"])
    w.add_uint32(k + "hidden_size", config["hidden"])
    w.add_uint32(k + "upsample_stride", upsample_stride(config))
    w.add_uint32(k + "codebook_count", config["n_q"])
    w.add_uint32(k + "semantic_codebook_count", config["n_semantic"])
    w.add_uint32(k + "codebook_size", config["codebook_size"])
    w.add_uint32(k + "codebook_dim", config["codebook_dim"])
    w.add_uint32(k + "transformer.block_count", config["n_layer"])
    w.add_uint32(k + "transformer.head_count", config["n_head"])
    w.add_uint32(k + "transformer.head_count_kv", config["n_head_kv"])
    w.add_uint32(k + "transformer.key_length", config["head_dim"])
    w.add_uint32(k + "transformer.feed_forward_length", config["ffn"])
    w.add_uint32(k + "transformer.context_length", config["context"])
    w.add_float32(k + "transformer.layer_norm_epsilon", config["norm_eps"])
    w.add_float32(k + "transformer.rope.freq_base", config["rope_theta"])
    w.add_string(k + "rope_layout", "normal" if naming == "moshi" else "neox")
    w.add_uint32(k + "seanet.filters", config["filters"])
    w.add_array(k + "seanet.ratios", [int(x) for x in config["ratios"]])
    w.add_uint32(k + "seanet.kernel_size", config["kernel_size"])
    w.add_uint32(k + "seanet.last_kernel_size", config["last_kernel_size"])
    w.add_uint32(k + "seanet.residual_kernel_size", config["residual_kernel_size"])
    w.add_uint32(k + "seanet.residual_layers", config["residual_layers"])
    w.add_uint32(k + "seanet.dilation_base", config["dilation_base"])
    w.add_uint32(k + "seanet.compress", config["compress"])


QUANTIZED = {"q8_0": GGMLQuantizationType.Q8_0, "q5_0": GGMLQuantizationType.Q5_0, "q4_0": GGMLQuantizationType.Q4_0}


def stored(name, arr, outtype):
    """The array in the type it is stored in: vectors and depthwise taps f32; matrices per --outtype
    (quantized where rows are whole 32-element blocks, f16 otherwise; codebooks f16, they are looked up)."""
    if arr.ndim == 1 or name == "upsample.weight" or outtype == "f32":
        return arr, None
    if name == "quantizer.codebooks.weight" or outtype == "f16" or arr.shape[-1] % 32 != 0:
        return arr.astype(np.float16), None
    q = quantize(arr, QUANTIZED[outtype])
    return q, QUANTIZED[outtype]


def add_mimi(w, src, outtype, config_path=None, prefix=""):
    """Adds the codec's metadata and tensors (names prefixed by `prefix`) to an open GGUFWriter."""
    tensors, naming, config = load_source(src, config_path)
    write_metadata(w, config, naming)
    for name, arr in mimi_tensors(tensors, naming, config).items():
        if len(prefix + name) > 63:
            fail(f"tensor name {prefix + name} is longer than ggml's 63 bytes")
        data, raw = stored(name, np.ascontiguousarray(arr, dtype=np.float32), outtype)
        if raw is None:
            w.add_tensor(prefix + name, data)
        else:
            w.add_tensor(prefix + name, data, raw_shape=data.shape, raw_dtype=raw)
    return naming, config


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--outtype", choices=["f32", "f16", "q8_0", "q5_0", "q4_0"], default="f16", help="type of the weight matrices")
    ap.add_argument("--config", help="moshi-style hyperparameters JSON (moshi checkpoints), or a transformers config.json")
    ap.add_argument("--name", default="mimi")
    args = ap.parse_args()
    w = GGUFWriter(args.out, "mimi")
    w.add_name(args.name)
    naming, config = add_mimi(w, args.src, args.outtype, args.config)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{args.src} ({naming} naming): {config['n_q']} codebooks of {config['codebook_size']}, "
          f"{config['n_layer']}-layer transformer, SEANet ratios {config['ratios']} -> {args.out}")


if __name__ == "__main__":
    main()
