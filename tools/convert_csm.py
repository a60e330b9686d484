#!/usr/bin/env python3
"""Converts a CSM checkpoint (original torchtune naming or HF-transformers naming) to our CSM GGUF.

    convert_csm.py CHECKPOINT --tokenizer tokenizer.json --out model.gguf [--type f32|f16|q8_0] [--config cfg.json]
                   [--mimi SRC [--mimi-config moshi-config.json] [--mimi-type f32|f16|q8_0]]

CHECKPOINT is a .safetensors file or a directory holding model.safetensors (and, for HF checkpoints,
config.json). Without --config, an HF directory's config.json is read, else CSM-1B's hyperparameters
are assumed. The RoPE pair layout is recorded in `csm.rope_layout`: `normal` for the original
(interleaved pairs), `neox` for HF (q/k rows permuted to halves).

With --mimi, the Mimi codec (any source tools/convert_mimi.py reads) is embedded: its `mimi.*` metadata
and its tensors prefixed `codec.`, so the one file speaks.
"""
import argparse
import json
import os
import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples"))
import csm_checkpoint as ckpt  # noqa: E402
import safetensors_io  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convert_mimi  # noqa: E402

LLAMA3_PRE = "llama-bpe"


def detect_naming(keys):
    if "backbone.layers.0.attn.q_proj.weight" in keys:
        return "original"
    if "backbone_model.layers.0.self_attn.q_proj.weight" in keys:
        return "hf"
    sys.exit("error: neither the original nor the HF CSM naming (no backbone layer 0 q_proj found)")


def config_from_hf(path):
    with open(path) as f:
        c = json.load(f)
    d = c["depth_decoder_config"]

    def stack(s):
        return {"n_layer": s["num_hidden_layers"], "n_embd": s["hidden_size"], "n_head": s["num_attention_heads"],
                "n_head_kv": s["num_key_value_heads"], "head_dim": s.get("head_dim", s["hidden_size"] // s["num_attention_heads"]),
                "n_ff": s["intermediate_size"]}

    r = c.get("rope_scaling") or {}
    return {"backbone": stack(c), "decoder": stack(d), "rms_eps": c["rms_norm_eps"], "rope_theta": c["rope_theta"],
            "rope_scaling": {"factor": r["factor"], "low_freq_factor": r["low_freq_factor"], "high_freq_factor": r["high_freq_factor"],
                             "original_context": r["original_max_position_embeddings"]} if r else None,
            "max_seq_len": c["max_position_embeddings"], "text_vocab_size": c["text_vocab_size"],
            "audio_vocab_size": c["vocab_size"], "audio_num_codebooks": c["num_codebooks"]}


def load_checkpoint(path):
    """(tensors as the checkpoint names them, its naming, the HF config.json path or None)."""
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    file = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    tensors = safetensors_io.load(file)
    naming = detect_naming(tensors)
    hf_cfg = os.path.join(directory, "config.json")
    # HF keeps a copy of the audio embeddings for the depth decoder; the backbone's is the same.
    tensors.pop("depth_decoder.model.embed_tokens.embed_audio_tokens.weight", None)
    return tensors, naming, (hf_cfg if naming == "hf" and os.path.exists(hf_cfg) else None)


def tokenizer_fields(path):
    with open(path) as f:
        tok = json.load(f)
    vocab = dict(tok["model"]["vocab"])
    specials = {}
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            specials[added["content"]] = added["id"]
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [5] * n  # unused slots
    for t, i in vocab.items():
        tokens[i] = t
        types[i] = 3 if t in specials else 1
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    bos, eos = specials.get("<|begin_of_text|>"), specials.get("<|end_of_text|>")
    if bos is None or eos is None:
        sys.exit("error: the tokenizer has no <|begin_of_text|>/<|end_of_text|> special tokens (Llama 3's)")
    return tokens, types, merges, bos, eos


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--tokenizer", required=True, help="Llama 3 tokenizer.json")
    ap.add_argument("--out", required=True)
    ap.add_argument("--type", choices=["f32", "f16", "q8_0"], default="f16", help="type of the weight matrices")
    ap.add_argument("--config", help="hyperparameters as JSON (see tools/samples/csm_checkpoint.py)")
    ap.add_argument("--name", default="csm")
    ap.add_argument("--mimi", help="a Mimi checkpoint to embed (see tools/convert_mimi.py)")
    ap.add_argument("--mimi-config", help="moshi-style hyperparameters for a moshi Mimi checkpoint")
    ap.add_argument("--mimi-type", choices=["f32", "f16", "q8_0"], default="f16", help="type of the codec's weight matrices")
    args = ap.parse_args()
    mimi = (args.mimi, args.mimi_type, args.mimi_config) if args.mimi else None
    convert(args.checkpoint, args.tokenizer, args.out, args.type, args.config, args.name, mimi)


def convert(checkpoint, tokenizer, out, wtype, config_path=None, name="csm", mimi=None):
    tensors, naming, hf_cfg = load_checkpoint(checkpoint)
    if config_path:
        with open(config_path) as f:
            config = json.load(f)
    elif hf_cfg:
        config = config_from_hf(hf_cfg)
    else:
        config = ckpt.CSM_1B
    if naming == "hf":
        by_hf = {ckpt.hf_name(o): o for o in expected_original_names(config)}
        missing = [h for h in by_hf if h not in tensors]
        if missing:
            sys.exit(f"error: HF checkpoint lacks {missing[:3]}")
        tensors = {by_hf[h]: tensors[h] for h in by_hf}
    write_gguf(tensors, config, naming, tokenizer, out, wtype, name, mimi)


def expected_original_names(config):
    names = ["text_embeddings.weight", "audio_embeddings.weight", "projection.weight", "codebook0_head.weight", "audio_head",
             "backbone.norm.scale", "decoder.norm.scale"]
    for prefix in ("backbone", "decoder"):
        for i in range(config[prefix]["n_layer"]):
            p = f"{prefix}.layers.{i}."
            names += [p + s for s in ("sa_norm.scale", "mlp_norm.scale", "attn.q_proj.weight", "attn.k_proj.weight",
                                      "attn.v_proj.weight", "attn.output_proj.weight", "mlp.w1.weight", "mlp.w2.weight", "mlp.w3.weight")]
    return names


GGUF_BLOCK = {"attn.q_proj.weight": "attn_q", "attn.k_proj.weight": "attn_k", "attn.v_proj.weight": "attn_v",
              "attn.output_proj.weight": "attn_output", "mlp.w1.weight": "ffn_gate", "mlp.w3.weight": "ffn_up",
              "mlp.w2.weight": "ffn_down", "sa_norm.scale": "attn_norm", "mlp_norm.scale": "ffn_norm"}


def gguf_name(original):
    top = {"text_embeddings.weight": "token_embd.weight", "audio_embeddings.weight": "audio_embd.weight",
           "projection.weight": "projection.weight", "codebook0_head.weight": "codebook0_head.weight",
           "audio_head": "audio_head.weight", "backbone.norm.scale": "backbone.output_norm.weight",
           "decoder.norm.scale": "decoder.output_norm.weight"}
    if original in top:
        return top[original]
    prefix, _, i, rest = original.split(".", 3)
    return f"{prefix}.blk.{i}.{GGUF_BLOCK[rest]}.weight"


def gguf_shape(original, config):
    """The numpy shape a tensor has in our GGUF (ggml's shape reversed)."""
    bb, dd = config["backbone"], config["decoder"]
    n_cb, vocab = config["audio_num_codebooks"], config["audio_vocab_size"]
    top = {"text_embeddings.weight": (config["text_vocab_size"], bb["n_embd"]),
           "audio_embeddings.weight": (vocab * n_cb, bb["n_embd"]),
           "projection.weight": (dd["n_embd"], bb["n_embd"]), "codebook0_head.weight": (vocab, bb["n_embd"]),
           "audio_head": (n_cb - 1, vocab, dd["n_embd"]), "backbone.norm.scale": (bb["n_embd"],),
           "decoder.norm.scale": (dd["n_embd"],)}
    if original in top:
        return top[original]
    prefix, _, _, rest = original.split(".", 3)
    c = config[prefix]
    q, kv = c["n_head"] * c["head_dim"], c["n_head_kv"] * c["head_dim"]
    return {"sa_norm.scale": (c["n_embd"],), "mlp_norm.scale": (c["n_embd"],), "attn.q_proj.weight": (q, c["n_embd"]),
            "attn.k_proj.weight": (kv, c["n_embd"]), "attn.v_proj.weight": (kv, c["n_embd"]),
            "attn.output_proj.weight": (c["n_embd"], q), "mlp.w1.weight": (c["n_ff"], c["n_embd"]),
            "mlp.w3.weight": (c["n_ff"], c["n_embd"]), "mlp.w2.weight": (c["n_embd"], c["n_ff"])}[rest]


def write_metadata(w, config, naming, tokenizer, name):
    w.add_name(name)
    for stack in ("backbone", "decoder"):
        c, k = config[stack], f"csm.{stack}."
        w.add_uint32(k + "block_count", c["n_layer"])
        w.add_uint32(k + "embedding_length", c["n_embd"])
        w.add_uint32(k + "attention.head_count", c["n_head"])
        w.add_uint32(k + "attention.head_count_kv", c["n_head_kv"])
        w.add_uint32(k + "attention.key_length", c["head_dim"])
        w.add_uint32(k + "feed_forward_length", c["n_ff"])
        w.add_float32(k + "attention.layer_norm_rms_epsilon", config["rms_eps"])
        w.add_float32(k + "rope.freq_base", config["rope_theta"])
        w.add_uint32(k + "context_length", config["max_seq_len"] if stack == "backbone" else config["audio_num_codebooks"])
        s = config.get("rope_scaling")
        if s:
            w.add_string(k + "rope.scaling.type", "llama3")
            w.add_float32(k + "rope.scaling.factor", s["factor"])
            w.add_float32(k + "rope.scaling.low_freq_factor", s["low_freq_factor"])
            w.add_float32(k + "rope.scaling.high_freq_factor", s["high_freq_factor"])
            w.add_uint32(k + "rope.scaling.original_context_length", s["original_context"])
    w.add_uint32("csm.text_vocab_size", config["text_vocab_size"])
    w.add_uint32("csm.audio_vocab_size", config["audio_vocab_size"])
    w.add_uint32("csm.audio_num_codebooks", config["audio_num_codebooks"])
    w.add_string("csm.rope_layout", "normal" if naming == "original" else "neox")
    tokens, types, merges, bos, eos = tokenizer_fields(tokenizer)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(LLAMA3_PRE)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(False)


def write_gguf(tensors, config, naming, tokenizer, out, wtype, name, mimi=None):
    """`mimi`: (source, weight type, moshi config or None) of a codec to embed under `codec.`."""
    w = GGUFWriter(out, "csm")
    write_metadata(w, config, naming, tokenizer, name)
    if mimi:
        src, mimi_type, mimi_config = mimi
        convert_mimi.add_mimi(w, src, mimi_type, mimi_config, prefix="codec.")
    for original, arr in tensors.items():
        arr = np.asarray(arr, dtype=np.float32)
        if original == "audio_head":
            arr = np.ascontiguousarray(arr.transpose(0, 2, 1))  # rows = output codes: [n_cb-1, vocab, n_embd]
        if arr.shape != gguf_shape(original, config):
            sys.exit(f"error: {original} has shape {arr.shape}, the config says {gguf_shape(original, config)}")
        if arr.ndim == 1:
            w.add_tensor(gguf_name(original), arr)
        elif wtype == "f16":
            w.add_tensor(gguf_name(original), arr.astype(np.float16))
        elif wtype == "q8_0":
            q = quantize(arr, GGMLQuantizationType.Q8_0)
            w.add_tensor(gguf_name(original), q, raw_shape=q.shape, raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gguf_name(original), arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
