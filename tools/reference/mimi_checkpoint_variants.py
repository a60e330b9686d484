#!/usr/bin/env python3
"""Rewrites the Mimi fixture into the other layouts tools/convert_mimi.py reads, without torch:

    mimi_checkpoint_variants.py FIXTURES OUT_DIR

  OUT_DIR/csm-1b/      a sesame/csm-1b-style transformers folder: the codec under `codec_model.` beside other
                       tensors, its config under "codec_config", the weights in two shards with an index
  OUT_DIR/weight-norm.safetensors
                       the moshi file with every SEANet convolution weight-normed (weight_g, weight_v)
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "samples"))
import safetensors_io  # noqa: E402


def main():
    fixtures, out = sys.argv[1], sys.argv[2]
    csm = os.path.join(out, "csm-1b")
    os.makedirs(csm, exist_ok=True)
    hf = safetensors_io.load(os.path.join(fixtures, "hf", "model.safetensors"))
    tensors = {f"codec_model.{k}": np.asarray(v, dtype=np.float32) for k, v in hf.items()}
    tensors["backbone_model.layers.0.self_attn.q_proj.weight"] = np.zeros((4, 4), dtype=np.float32)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, keys in shards.items():
        safetensors_io.save(os.path.join(csm, shard), {k: tensors[k] for k in keys})
        weight_map.update({k: shard for k in keys})
    with open(os.path.join(csm, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(fixtures, "hf", "config.json")) as f:
        codec = json.load(f)
    with open(os.path.join(csm, "config.json"), "w") as f:
        json.dump({"model_type": "csm", "codec_config": codec}, f)

    moshi = {k: np.asarray(v, dtype=np.float32) for k, v in safetensors_io.load(os.path.join(fixtures, "moshi.safetensors")).items()}
    rng = np.random.default_rng(5)
    for name in [k for k in moshi if k.startswith("decoder.model.") and k.endswith(".weight")]:
        w = moshi.pop(name)
        # w = g · v / ‖v‖ over every dim but the first: any v along w's direction, g = ‖w‖ per slice.
        v = w * rng.uniform(0.5, 2.0, size=(w.shape[0],) + (1,) * (w.ndim - 1)).astype(np.float32)
        g = np.sqrt(np.sum(w.astype(np.float64) ** 2, axis=tuple(range(1, w.ndim)), keepdims=True)).astype(np.float32)
        moshi[name[: -len("weight")] + "weight_g"] = g
        moshi[name[: -len("weight")] + "weight_v"] = v
    safetensors_io.save(os.path.join(out, "weight-norm.safetensors"), moshi)


if __name__ == "__main__":
    main()
