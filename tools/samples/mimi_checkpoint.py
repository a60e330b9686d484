"""Synthetic Mimi checkpoints in moshi's naming (the published spelling: fused `in_proj_weight`,
`out_proj.weight`), with random weights, for the sample codecs. Numpy only (no torch).

A config is moshi's form: {"sample_rate", "frame_rate", "seanet": {...}, "quantizer": {...},
"transformer": {...}}, what tools/convert_mimi.py --config reads.
"""
import numpy as np


def moshi_config(hidden, filters, n_q, bins, dim, layers, heads, ffn, context, ratios=(8, 6, 5, 4), sample_rate=24000):
    return {
        "sample_rate": sample_rate,
        "frame_rate": 12.5,
        "seanet": {"channels": 1, "dimension": hidden, "n_filters": filters, "n_residual_layers": 1, "ratios": list(ratios), "kernel_size": 7,
                   "residual_kernel_size": 3, "last_kernel_size": 3, "dilation_base": 2, "compress": 2, "true_skip": True, "pad_mode": "constant"},
        "quantizer": {"dimension": dim, "n_q": n_q, "bins": bins, "input_dimension": hidden, "output_dimension": hidden},
        "transformer": {"d_model": hidden, "num_heads": heads, "num_layers": layers, "layer_scale": 0.01, "context": context,
                        "max_period": 10000, "dim_feedforward": ffn, "norm": "layer_norm", "gating": "none", "positional_embedding": "rope"},
    }


# tiny-mimi: Mimi's structure (32 codebooks, 1920 samples per frame, a 250-step window) at toy widths,
# with 64 codes per codebook to pair with tiny-csm's audio vocabulary (65, the last one never a code).
# Heads of 32 so every KV cache type applies to its transformer.
TINY_MIMI = moshi_config(hidden=64, filters=4, n_q=32, bins=64, dim=16, layers=2, heads=2, ffn=128, context=250)

# micro-mimi, the loader fuzz target's codec seed: every structure at the smallest size (a 100 Hz "audio
# rate" keeps the upsampling stride at 2 with two ratios of 2).
MICRO_MIMI = moshi_config(hidden=32, filters=2, n_q=2, bins=8, dim=8, layers=1, heads=1, ffn=32, context=4, ratios=(2, 2), sample_rate=100)

# Mimi's published shape (for speed measurements: make mimi-shape).
MIMI = moshi_config(hidden=512, filters=64, n_q=32, bins=2048, dim=256, layers=8, heads=8, ffn=2048, context=250)


def synthetic_moshi(config, seed):
    """{name: float32 array} of a random Mimi (both paths and the quantizer) in moshi's naming."""
    rng = np.random.default_rng(seed)
    s, q, t = config["seanet"], config["quantizer"], config["transformer"]

    def uniform(shape, fan_in):
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, size=shape).astype(np.float32)

    out = {}

    def conv(name, c_out, c_in, k, transposed=False):
        shape = (c_in, c_out, k) if transposed else (c_out, c_in, k)
        out[name + ".weight"] = uniform(shape, c_in * k)
        out[name + ".bias"] = uniform((c_out,), c_in * k)

    def transformer(side):
        """One of the two transformers' layers (the same draws in the same order for each)."""
        for l in range(t["num_layers"]):
            p = f"{side}.transformer.layers.{l}."
            out[p + "self_attn.in_proj_weight"] = uniform((3 * d, d), d)
            out[p + "self_attn.out_proj.weight"] = uniform((d, d), d)
            for norm in ("norm1", "norm2"):
                out[p + norm + ".weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
                out[p + norm + ".bias"] = (0.1 * rng.standard_normal(d)).astype(np.float32)
            out[p + "linear1.weight"] = uniform((t["dim_feedforward"], d), d)
            out[p + "linear2.weight"] = uniform((d, t["dim_feedforward"]), t["dim_feedforward"])
            out[p + "layer_scale_1.scale"] = rng.uniform(0.2, 1.0, size=d).astype(np.float32)
            out[p + "layer_scale_2.scale"] = rng.uniform(0.2, 1.0, size=d).astype(np.float32)

    d, dim = s["dimension"], q["dimension"]
    for group, count in [("rvq_first", 1), ("rvq_rest", q["n_q"] - 1)]:
        for i in range(count):
            p = f"quantizer.{group}.vq.layers.{i}._codebook."
            out[p + "embedding_sum"] = rng.standard_normal((q["bins"], dim)).astype(np.float32)
            out[p + "cluster_usage"] = rng.uniform(0.5, 2.0, size=(q["bins"],)).astype(np.float32)
            out[p + "_initialized"] = np.ones((1,), dtype=np.float32)
        out[f"quantizer.{group}.output_proj.weight"] = uniform((d, dim, 1), dim)
    stride = int(round(config["sample_rate"] / np.prod(s["ratios"]) / config["frame_rate"]))
    out["upsample.convtr.convtr.convtr.weight"] = uniform((d, 1, 2 * stride), 2 * stride)
    transformer("decoder_transformer")
    mult = 2 ** len(s["ratios"])
    f = s["n_filters"]
    conv("decoder.model.0.conv.conv", mult * f, d, s["kernel_size"])
    n = 1
    for ratio in s["ratios"]:
        c = mult * f
        conv(f"decoder.model.{n + 1}.convtr.convtr", c // 2, c, 2 * ratio, transposed=True)
        conv(f"decoder.model.{n + 2}.block.1.conv.conv", c // 2 // s["compress"], c // 2, s["residual_kernel_size"])
        conv(f"decoder.model.{n + 2}.block.3.conv.conv", c // 2, c // 2 // s["compress"], 1)
        n += 3
        mult //= 2
    conv(f"decoder.model.{n + 1}.conv.conv", s["channels"], f, s["last_kernel_size"])
    # The encode path, drawn after the decoder's (whose weights stay what they were without it).
    conv("encoder.model.0.conv.conv", f, s["channels"], s["kernel_size"])
    n, c = 1, f
    for ratio in reversed(s["ratios"]):
        conv(f"encoder.model.{n}.block.1.conv.conv", c // s["compress"], c, s["residual_kernel_size"])
        conv(f"encoder.model.{n}.block.3.conv.conv", c, c // s["compress"], 1)
        conv(f"encoder.model.{n + 2}.conv.conv", 2 * c, c, 2 * ratio)
        n += 3
        c *= 2
    conv(f"encoder.model.{n + 1}.conv.conv", d, c, s["last_kernel_size"])
    transformer("encoder_transformer")
    out["downsample.conv.conv.conv.weight"] = uniform((d, d, 2 * stride), d * 2 * stride)
    for group in ("rvq_first", "rvq_rest"):
        out[f"quantizer.{group}.input_proj.weight"] = uniform((dim, d, 1), d)
    return out
