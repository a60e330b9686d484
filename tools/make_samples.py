#!/usr/bin/env python3
"""Generates the project's sample models (deterministic random weights, real tensor names).

    make_samples.py OUT_DIR                  # tiny-llama.gguf, tiny-llama3.gguf, tiny-mimi.gguf, and
                                             # tiny-csm.gguf (tiny-mimi embedded: one file that speaks)
    make_samples.py OUT_DIR --csm-1b-shape   # csm-1b-shape.gguf: CSM-1B's dimensions, random q8_0 weights
    make_samples.py OUT_DIR --mimi-shape     # mimi-shape.gguf: Mimi's dimensions, random q8_0 weights
    make_samples.py OUT_DIR --llama-1b-shape q8_0|q4_0   # llama-1b-shape-TYPE.gguf: Llama-3.2-1B's dimensions
    make_samples.py OUT_DIR --fuzz-seeds     # micro-llama.gguf, micro-csm.gguf, micro-mimi.gguf: the fuzz seeds

Written with the `gguf` package (not with the engine's own writer), so the engine's reader is tested
against files it did not make.
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np
from gguf import GGUFWriter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples"))
import csm_checkpoint  # noqa: E402
import mimi_checkpoint  # noqa: E402
import safetensors_io  # noqa: E402
import tiny_bpe  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convert_csm  # noqa: E402
import convert_mimi  # noqa: E402

# tiny-csm: CSM's structure (2 transformers, 32 codebooks, llama3 RoPE) at toy sizes. Head dims are
# multiples of 32 so every KV cache type applies.
TINY_CSM = {
    "backbone": {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_head_kv": 2, "head_dim": 32, "n_ff": 256},
    "decoder": {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_head_kv": 1, "head_dim": 32, "n_ff": 128},
    "rms_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context": 64},
    "max_seq_len": 256,
    "audio_vocab_size": 65,
    "audio_num_codebooks": 32,
}

# The fuzz seeds: the smallest models with every structure of the real ones, so that mutations land
# in metadata and tensor infos rather than in weight bytes.
MICRO_LLAMA = {"n_embd": 32, "n_head": 2, "n_head_kv": 1, "n_ff": 32, "n_layer": 1, "n_merges": 8, "wtype": np.float16}
MICRO_STACK = {"n_layer": 1, "n_embd": 32, "n_head": 1, "n_head_kv": 1, "head_dim": 32, "n_ff": 32}
MICRO_CSM = {**TINY_CSM, "backbone": MICRO_STACK, "decoder": MICRO_STACK, "max_seq_len": 64, "audio_vocab_size": 8, "audio_num_codebooks": 4}


def llama_stack(writer, rng, prefix, n_layer, n_embd, n_head, n_head_kv, n_ff, wtype=np.float32, matrix=None):
    """Random Llama block weights under `prefix` (numpy shapes are ggml's reversed); `matrix(name,
    rows, cols)` writes each product's weights (default: f32 normals in `wtype`)."""
    head_dim = n_embd // n_head

    def normal_matrix(name, rows, cols):
        writer.add_tensor(name, (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(wtype))

    matrix = matrix or normal_matrix

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


def llama_writer(path, name, n_layer, n_embd, n_head, n_head_kv, n_ff, context, freq_base, tokenizer, pre, rope_keys=None):
    """A GGUF writer with a Llama model's metadata: its shape, RoPE base (then `rope_keys(writer)`, if
    given), and a BPE `tokenizer` (tokens, merges, types) with BOS 1 and EOS 2."""
    tokens, merges, types = tokenizer
    w = GGUFWriter(path, "llama")
    w.add_name(name)
    w.add_block_count(n_layer)
    w.add_context_length(context)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_freq_base(freq_base)
    if rope_keys:
        rope_keys(w)
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
    return w


def tiny_llama(path, pre="smollm", name="tiny-llama", n_embd=128, n_head=4, n_head_kv=2, n_ff=256, n_layer=2, n_merges=200, wtype=np.float32):
    """A 2-layer Llama (width 128, 4 heads over 2 KV heads of 32) with a SmolLM2-style tokenizer and
    llama3 RoPE scaling (so frequency factors are exercised at test lengths)."""
    rng = np.random.default_rng(20261129)
    tokens, merges, types = tiny_bpe.train(n_merges)

    def llama3_scaling(w):
        w.add_string("llama.rope.scaling.type", "llama3")
        w.add_float32("llama.rope.scaling.factor", 8.0)
        w.add_float32("llama.rope.scaling.low_freq_factor", 1.0)
        w.add_float32("llama.rope.scaling.high_freq_factor", 4.0)
        w.add_uint32("llama.rope.scaling.original_context_length", 64)

    w = llama_writer(path, name, n_layer, n_embd, n_head, n_head_kv, n_ff, 256, 10000.0, (tokens, merges, types), pre, llama3_scaling)
    # Small enough that the tied output head gives a spread-out distribution (logit std ≈ 1).
    w.add_tensor("token_embd.weight", (0.1 * rng.standard_normal((len(tokens), n_embd))).astype(wtype))
    llama_stack(w, rng, "", n_layer, n_embd, n_head, n_head_kv, n_ff, wtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def mimi_source(tmp, config, seed):
    """A synthetic moshi-naming Mimi checkpoint and its config JSON in `tmp`."""
    ckpt_path, cfg_path = os.path.join(tmp, "mimi.safetensors"), os.path.join(tmp, "mimi-config.json")
    safetensors_io.save(ckpt_path, mimi_checkpoint.synthetic_moshi(config, seed))
    with open(cfg_path, "w") as f:
        json.dump(config, f)
    return ckpt_path, cfg_path


def mimi(path, config, name, seed=20261201, dtype="f32"):
    """A synthetic moshi-naming Mimi checkpoint converted by tools/convert_mimi.py."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_path, cfg_path = mimi_source(tmp, config, seed)
        w = GGUFWriter(path, "mimi")
        w.add_name(name)
        convert_mimi.add_mimi(w, ckpt_path, dtype, cfg_path)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()


def tiny_csm(path, seed=20261130, shape=TINY_CSM, name="tiny-csm", n_merges=200, dtype="f32", codec=None):
    """A synthetic checkpoint in the original naming, converted by tools/convert_csm.py; with `codec`
    (a moshi-form Mimi config) a synthetic codec is embedded."""
    with tempfile.TemporaryDirectory() as tmp:
        tok = tiny_bpe.llama3_tokenizer_json(n_merges)
        tok_path = os.path.join(tmp, "tokenizer.json")
        with open(tok_path, "w") as f:
            json.dump(tok, f)
        config = {**shape, "text_vocab_size": len(tok["model"]["vocab"]) + len(tok["added_tokens"])}
        cfg_path = os.path.join(tmp, "config.json")
        csm_checkpoint.save_config(cfg_path, config)
        ckpt_path = os.path.join(tmp, "model.safetensors")
        safetensors_io.save(ckpt_path, csm_checkpoint.synthetic_original(config, seed))
        embedded = None
        if codec is not None:
            mimi_ckpt, mimi_cfg = mimi_source(tmp, codec, 20261201)
            embedded = (mimi_ckpt, "f32", mimi_cfg)
        convert_csm.convert(ckpt_path, tok_path, path, dtype, cfg_path, name=name, mimi=embedded)


def random_q8_0(rng, rows, cols, scale):
    """Raw Q8_0 blocks of random int8 values under one scale (`scale` = the largest value)."""
    blocks = rows * cols // 32
    raw = np.empty((blocks, 34), dtype=np.uint8)
    raw[:, :2] = np.full((blocks, 1), scale / 127, dtype=np.float16).view(np.uint8)
    raw[:, 2:] = rng.integers(-127, 128, size=(blocks, 32), dtype=np.int8).view(np.uint8)
    return raw.reshape(rows, cols // 32 * 34)


def random_q4_0(rng, rows, cols, scale):
    """Raw Q4_0 blocks of random nibbles under one scale."""
    blocks = rows * cols // 32
    raw = np.empty((blocks, 18), dtype=np.uint8)
    raw[:, :2] = np.full((blocks, 1), scale / 8, dtype=np.float16).view(np.uint8)
    raw[:, 2:] = rng.integers(0, 256, size=(blocks, 16), dtype=np.uint8)
    return raw.reshape(rows, cols // 32 * 18)


# Llama-3.2-1B's dimensions (its config.json): the CSM backbone's shape, as a text model.
LLAMA_1B = {"n_vocab": 128256, "n_embd": 2048, "n_layer": 16, "n_head": 32, "n_head_kv": 8, "n_ff": 8192}


def llama3_rope_divisors(head_dim, base, factor, low, high, original_context):
    """Llama 3's RoPE scaling as a divisor per frequency: none for short wavelengths, `factor` for long
    ones, a smooth blend between."""
    out = []
    for i in range(head_dim // 2):
        wavelength = 2 * np.pi * base ** (2 * i / head_dim)
        if wavelength < original_context / high:
            out.append(1.0)
        elif wavelength > original_context / low:
            out.append(factor)
        else:
            smooth = (original_context / wavelength - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def llama_1b_shape(path, wtype="q8_0", seed=11):
    """Llama-3.2-1B's dimensions and RoPE (θ 500,000, llama3 scaling ×32 as `rope_freqs`) with random weights, written
    block by block: the layers' products in `wtype` (q8_0 or q4_0), the tied embedding in q8_0 (as
    llama.cpp's own Q4_0 files keep it wide), the norms f32. A tiny BPE padded with reserved tokens to
    the real vocabulary, so the output head has its real size. For speed measurements only."""
    from gguf import GGMLQuantizationType

    rng = np.random.default_rng(seed)
    c = LLAMA_1B
    tokens, merges, types = tiny_bpe.train(200)
    types = list(types) + [3] * (c["n_vocab"] - len(tokens))  # CONTROL
    tokens = list(tokens) + [f"<|reserved_special_token_{i}|>" for i in range(c["n_vocab"] - len(tokens))]
    e, head_dim = c["n_embd"], c["n_embd"] // c["n_head"]
    w = llama_writer(path, f"llama-1b-shape-{wtype}", c["n_layer"], e, c["n_head"], c["n_head_kv"], c["n_ff"], 131072, 500000.0,
                     (tokens, merges, types), "llama-bpe")

    def matrix(name, rows, cols, kind=wtype):
        if kind == "q4_0":
            raw, qtype = random_q4_0(rng, rows, cols, 2.0 / np.sqrt(cols)), GGMLQuantizationType.Q4_0
        else:
            raw, qtype = random_q8_0(rng, rows, cols, 2.0 / np.sqrt(cols)), GGMLQuantizationType.Q8_0
        w.add_tensor(name, raw, raw_shape=(rows, raw.shape[-1]), raw_dtype=qtype)

    matrix("token_embd.weight", c["n_vocab"], e, "q8_0")
    # llama3 RoPE scaling as llama.cpp reads it: per-frequency divisors in `rope_freqs.weight`
    # (factor 32, low 1, high 4, original context 8192), which both engines apply.
    w.add_tensor("rope_freqs.weight", llama3_rope_divisors(head_dim, 500000.0, 32.0, 1.0, 4.0, 8192))
    llama_stack(w, rng, "", c["n_layer"], e, c["n_head"], c["n_head_kv"], c["n_ff"], matrix=matrix)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()


def csm_1b_shape(path, seed=7, decoder_type="q8_0"):
    """CSM-1B's dimensions with random q8_0 weights, written block by block (no f32 copy of 1.5 B
    parameters): for speed measurements only. `decoder_type` q4_0 stores the decoder's products
    (its layers, the projection into it and the audio heads) in q4_0."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter

    rng = np.random.default_rng(seed)
    config = csm_checkpoint.CSM_1B
    tok = tiny_bpe.llama3_tokenizer_json(200, pad_to=config["text_vocab_size"])
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = os.path.join(tmp, "tokenizer.json")
        with open(tok_path, "w") as f:
            json.dump(tok, f)

        def in_decoder(gname):
            return gname.startswith(("decoder.", "projection", "audio_head"))

        w = GGUFWriter(path, "csm")
        convert_csm.write_metadata(w, config, "original", tok_path, "csm-1b-shape")
        for name in convert_csm.expected_original_names(config):
            shape = convert_csm.gguf_shape(name, config)
            gname = convert_csm.gguf_name(name)
            if len(shape) == 1:
                w.add_tensor(gname, (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            else:
                rows, cols = int(np.prod(shape[:-1])), shape[-1]
                if decoder_type == "q4_0" and in_decoder(gname):
                    raw, qtype = random_q4_0(rng, rows, cols, 2.0 / np.sqrt(cols)), GGMLQuantizationType.Q4_0
                else:
                    raw, qtype = random_q8_0(rng, rows, cols, 2.0 / np.sqrt(cols)), GGMLQuantizationType.Q8_0
                w.add_tensor(gname, raw, raw_shape=(*shape[:-1], raw.shape[-1]), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--csm-1b-shape", action="store_true", help="write only csm-1b-shape.gguf")
    ap.add_argument(
        "--csm-1b-shape-q4-decoder", action="store_true", help="write only csm-1b-shape-q4dec.gguf (the decoder's products in q4_0)"
    )
    ap.add_argument("--fuzz-seeds", action="store_true", help="write only the fuzz seeds micro-llama.gguf, micro-csm.gguf, micro-mimi.gguf")
    ap.add_argument("--mimi-shape", action="store_true", help="write only mimi-shape.gguf")
    ap.add_argument("--llama-1b-shape", choices=["q8_0", "q4_0"], help="write only llama-1b-shape-TYPE.gguf")
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    if args.fuzz_seeds:
        tiny_llama(os.path.join(args.out_dir, "micro-llama.gguf"), name="micro-llama", **MICRO_LLAMA)
        tiny_csm(os.path.join(args.out_dir, "micro-csm.gguf"), shape=MICRO_CSM, name="micro-csm", n_merges=8, dtype="f16")
        mimi(os.path.join(args.out_dir, "micro-mimi.gguf"), mimi_checkpoint.MICRO_MIMI, "micro-mimi", dtype="f16")
        return
    if args.csm_1b_shape:
        csm_1b_shape(os.path.join(args.out_dir, "csm-1b-shape.gguf"))
        return
    if args.csm_1b_shape_q4_decoder:
        csm_1b_shape(os.path.join(args.out_dir, "csm-1b-shape-q4dec.gguf"), decoder_type="q4_0")
        return
    if args.llama_1b_shape:
        llama_1b_shape(os.path.join(args.out_dir, f"llama-1b-shape-{args.llama_1b_shape}.gguf"), args.llama_1b_shape)
        return
    if args.mimi_shape:
        mimi(os.path.join(args.out_dir, "mimi-shape.gguf"), mimi_checkpoint.MIMI, "mimi-shape", seed=8, dtype="q8_0")
        return
    tiny_llama(os.path.join(args.out_dir, "tiny-llama.gguf"))
    # The same model with Llama 3's pre-tokenizer (CSM's text tokenizer).
    tiny_llama(os.path.join(args.out_dir, "tiny-llama3.gguf"), pre="llama-bpe")
    mimi(os.path.join(args.out_dir, "tiny-mimi.gguf"), mimi_checkpoint.TINY_MIMI, "tiny-mimi")
    tiny_csm(os.path.join(args.out_dir, "tiny-csm.gguf"), codec=mimi_checkpoint.TINY_MIMI)


if __name__ == "__main__":
    main()
