#!/usr/bin/env python3
"""Generates the project's sample models (deterministic random weights, real tensor names).

    make_samples.py OUT_DIR        # writes OUT_DIR/tiny-llama.gguf and OUT_DIR/tiny-llama3.gguf

Written with the `gguf` package (not with the engine's own writer), so the engine's reader is tested
against files it did not make.
"""
import argparse
import os
import sys

import numpy as np
from gguf import GGUFWriter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples"))
import tiny_bpe  # noqa: E402


def llama_stack(writer, rng, prefix, n_layer, n_embd, n_head, n_head_kv, n_ff):
    """Random Llama block weights under `prefix` (numpy shapes are ggml's reversed)."""
    head_dim = n_embd // n_head

    def matrix(name, rows, cols):
        writer.add_tensor(name, (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32))

    def norm(name, n):
        writer.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    for l in range(n_layer):
        b = f"{prefix}blk.{l}."
        norm(b + "attn_norm.weight", n_embd)
        matrix(b + "attn_q.weight", n_head * head_dim, n_embd)
        matrix(b + "attn_k.weight", n_head_kv * head_dim, n_embd)
        matrix(b + "attn_v.weight", n_head_kv * head_dim, n_embd)
        matrix(b + "attn_output.weight", n_embd, n_head * head_dim)
        norm(b + "ffn_norm.weight", n_embd)
        matrix(b + "ffn_gate.weight", n_ff, n_embd)
        matrix(b + "ffn_up.weight", n_ff, n_embd)
        matrix(b + "ffn_down.weight", n_embd, n_ff)
    norm(prefix + "output_norm.weight", n_embd)


def tiny_llama(path, pre="smollm"):
    """A 2-layer Llama (width 128, 4 heads over 2 KV heads of 32) with a SmolLM2-style tokenizer and
    llama3 RoPE scaling (so frequency factors are exercised at test lengths)."""
    rng = np.random.default_rng(20261129)
    tokens, merges, types = tiny_bpe.train(200)
    n_embd, n_head, n_head_kv, n_ff, n_layer = 128, 4, 2, 256, 2
    w = GGUFWriter(path, "llama")
    w.add_name("tiny-llama")
    w.add_block_count(n_layer)
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_freq_base(10000.0)
    w.add_string("llama.rope.scaling.type", "llama3")
    w.add_float32("llama.rope.scaling.factor", 8.0)
    w.add_float32("llama.rope.scaling.low_freq_factor", 1.0)
    w.add_float32("llama.rope.scaling.high_freq_factor", 4.0)
    w.add_uint32("llama.rope.scaling.original_context_length", 64)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    # Small enough that the tied output head gives a spread-out distribution (logit std ≈ 1).
    w.add_tensor("token_embd.weight", (0.1 * rng.standard_normal((len(tokens), n_embd))).astype(np.float32))
    llama_stack(w, rng, "", n_layer, n_embd, n_head, n_head_kv, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    tiny_llama(os.path.join(args.out_dir, "tiny-llama.gguf"))
    # The same model with Llama 3's pre-tokenizer (CSM's text tokenizer).
    tiny_llama(os.path.join(args.out_dir, "tiny-llama3.gguf"), pre="llama-bpe")


if __name__ == "__main__":
    main()
