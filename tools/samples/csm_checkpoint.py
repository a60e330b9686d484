"""CSM checkpoint naming, and synthetic checkpoints for tests and sample models.

Two namings exist: the original (torchtune: `backbone.layers.N.attn.q_proj.weight`, interleaved RoPE
pairs) and the HF-transformers one (`backbone_model.layers.N.self_attn.q_proj.weight`, q/k rows
permuted so that RoPE pairs dimension i with i + head_dim/2, i.e. NeoX layout).
"""
import json
import re

import numpy as np

# Hyperparameters of a checkpoint, in the converter's JSON form. CSM-1B's values are the default.
CSM_1B = {
    "backbone": {"n_layer": 16, "n_embd": 2048, "n_head": 32, "n_head_kv": 8, "head_dim": 64, "n_ff": 8192},
    "decoder": {"n_layer": 4, "n_embd": 1024, "n_head": 8, "n_head_kv": 2, "head_dim": 128, "n_ff": 8192},
    "rms_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context": 8192},
    "max_seq_len": 2048,
    "text_vocab_size": 128256,
    "audio_vocab_size": 2051,
    "audio_num_codebooks": 32,
}

# Original name -> HF name, applied in order (from the HF conversion's documented mapping).
ORIGINAL_TO_HF = [
    (r"^backbone\.layers\.(\d+)", r"backbone_model.layers.\1"),
    (r"^decoder\.layers\.(\d+)", r"depth_decoder.model.layers.\1"),
    (r"\.attn\.", r".self_attn."),
    (r"\.output_proj\.", r".o_proj."),
    (r"\.mlp\.w1\.", r".mlp.gate_proj."),
    (r"\.mlp\.w2\.", r".mlp.down_proj."),
    (r"\.mlp\.w3\.", r".mlp.up_proj."),
    (r"\.sa_norm\.scale$", r".input_layernorm.weight"),
    (r"\.mlp_norm\.scale$", r".post_attention_layernorm.weight"),
    (r"^backbone\.norm\.scale$", r"backbone_model.norm.weight"),
    (r"^decoder\.norm\.scale$", r"depth_decoder.model.norm.weight"),
    (r"^text_embeddings\.weight$", r"backbone_model.embed_tokens.embed_text_tokens.weight"),
    (r"^audio_embeddings\.weight$", r"backbone_model.embed_tokens.embed_audio_tokens.weight"),
    (r"^codebook0_head\.weight$", r"lm_head.weight"),
    (r"^audio_head$", r"depth_decoder.codebooks_head.weight"),
    (r"^projection\.weight$", r"depth_decoder.model.inputs_embeds_projector.weight"),
]


def hf_name(original):
    for pattern, replacement in ORIGINAL_TO_HF:
        original = re.sub(pattern, replacement, original)
    return original


def rope_permutation(n_head, head_dim):
    """Row order taking interleaved RoPE pairs (2i, 2i+1) to halves (i, i + head_dim/2), per head."""
    half = head_dim // 2
    per_head = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
    assert len(per_head) == 2 * half
    return np.concatenate([h * head_dim + per_head for h in range(n_head)])


def synthetic_original(config, seed):
    """Random weights with the original names and PyTorch shapes (out_features, in_features)."""
    rng = np.random.default_rng(seed)
    t = {}

    def matrix(name, rows, cols, scale=None):
        t[name] = (rng.standard_normal((rows, cols)) * (scale if scale else 1 / np.sqrt(cols))).astype(np.float32)

    def norm(name, n):
        t[name] = (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    bb, dd = config["backbone"], config["decoder"]
    n_cb, a_vocab = config["audio_num_codebooks"], config["audio_vocab_size"]
    matrix("text_embeddings.weight", config["text_vocab_size"], bb["n_embd"], scale=1.0)
    matrix("audio_embeddings.weight", a_vocab * n_cb, bb["n_embd"], scale=1.0)
    for prefix, c in (("backbone", bb), ("decoder", dd)):
        for i in range(c["n_layer"]):
            p = f"{prefix}.layers.{i}."
            norm(p + "sa_norm.scale", c["n_embd"])
            matrix(p + "attn.q_proj.weight", c["n_head"] * c["head_dim"], c["n_embd"])
            matrix(p + "attn.k_proj.weight", c["n_head_kv"] * c["head_dim"], c["n_embd"])
            matrix(p + "attn.v_proj.weight", c["n_head_kv"] * c["head_dim"], c["n_embd"])
            matrix(p + "attn.output_proj.weight", c["n_embd"], c["n_head"] * c["head_dim"])
            norm(p + "mlp_norm.scale", c["n_embd"])
            matrix(p + "mlp.w1.weight", c["n_ff"], c["n_embd"])
            matrix(p + "mlp.w3.weight", c["n_ff"], c["n_embd"])
            matrix(p + "mlp.w2.weight", c["n_embd"], c["n_ff"])
        norm(f"{prefix}.norm.scale", c["n_embd"])
    matrix("projection.weight", dd["n_embd"], bb["n_embd"])
    # Heads scaled up a little so greedy codes vary from frame to frame.
    matrix("codebook0_head.weight", a_vocab, bb["n_embd"], scale=3 / np.sqrt(bb["n_embd"]))
    t["audio_head"] = (rng.standard_normal((n_cb - 1, dd["n_embd"], a_vocab)) * 3 / np.sqrt(dd["n_embd"])).astype(np.float32)
    return t


def to_hf(original, config):
    """The same weights under HF names, q/k rows permuted for NeoX RoPE, the decoder's copy of the
    audio embeddings added, as the HF conversion does."""
    out = {}
    for name, w in original.items():
        new = hf_name(name)
        m = re.search(r"(backbone|decoder)\.layers\.\d+\.attn\.(q|k)_proj\.weight$", name)
        if m:
            c = config["backbone" if m.group(1) == "backbone" else "decoder"]
            heads = c["n_head"] if m.group(2) == "q" else c["n_head_kv"]
            w = w[rope_permutation(heads, c["head_dim"])]
        out[new] = w
    out["depth_decoder.model.embed_tokens.embed_audio_tokens.weight"] = out["backbone_model.embed_tokens.embed_audio_tokens.weight"]
    return out


def hf_config(config):
    """A transformers-style config.json for a synthetic HF checkpoint."""
    bb, dd = config["backbone"], config["decoder"]
    s = config["rope_scaling"]
    rope = {"rope_type": "llama3", "factor": s["factor"], "low_freq_factor": s["low_freq_factor"],
            "high_freq_factor": s["high_freq_factor"], "original_max_position_embeddings": s["original_context"]}

    def stack(c):
        return {"num_hidden_layers": c["n_layer"], "hidden_size": c["n_embd"], "num_attention_heads": c["n_head"],
                "num_key_value_heads": c["n_head_kv"], "head_dim": c["head_dim"], "intermediate_size": c["n_ff"],
                "rms_norm_eps": config["rms_eps"], "rope_theta": config["rope_theta"], "rope_scaling": rope}

    return {**stack(bb), "model_type": "csm", "max_position_embeddings": config["max_seq_len"],
            "text_vocab_size": config["text_vocab_size"], "vocab_size": config["audio_vocab_size"],
            "num_codebooks": config["audio_num_codebooks"],
            "depth_decoder_config": {**stack(dd), "max_position_embeddings": config["audio_num_codebooks"],
                                     "backbone_hidden_size": bb["n_embd"]}}


def save_config(path, config):
    with open(path, "w") as f:
        json.dump(config, f, indent=1)
