#!/usr/bin/env python3
"""Writes one synthetic CSM checkpoint in both namings (original: safetensors + our config JSON; HF:
a directory with model.safetensors and a transformers-style config.json), converts each with
tools/convert_csm.py, and leaves OUT_DIR/original.gguf and OUT_DIR/hf.gguf. Used by the converter test.

    make_csm_pair.py OUT_DIR [--type f32|f16|q8_0]
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import convert_csm  # noqa: E402
import csm_checkpoint  # noqa: E402
import safetensors_io  # noqa: E402
import tiny_bpe  # noqa: E402
from make_samples import TINY_CSM  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--type", default="f32")
    args = ap.parse_args()
    out = args.out_dir
    os.makedirs(os.path.join(out, "hf"), exist_ok=True)
    tok = tiny_bpe.llama3_tokenizer_json(150)
    tok_path = os.path.join(out, "tokenizer.json")
    with open(tok_path, "w") as f:
        json.dump(tok, f)
    config = {**TINY_CSM, "text_vocab_size": len(tok["model"]["vocab"]) + len(tok["added_tokens"])}
    weights = csm_checkpoint.synthetic_original(config, seed=99)

    cfg_path = os.path.join(out, "config.json")
    csm_checkpoint.save_config(cfg_path, config)
    safetensors_io.save(os.path.join(out, "original.safetensors"), weights)
    convert_csm.convert(os.path.join(out, "original.safetensors"), tok_path, os.path.join(out, "original.gguf"), args.type, cfg_path)

    safetensors_io.save(os.path.join(out, "hf", "model.safetensors"), csm_checkpoint.to_hf(weights, config))
    csm_checkpoint.save_config(os.path.join(out, "hf", "config.json"), csm_checkpoint.hf_config(config))
    convert_csm.convert(os.path.join(out, "hf"), tok_path, os.path.join(out, "hf.gguf"), args.type)


if __name__ == "__main__":
    main()
