#!/usr/bin/env python3
"""Writes the Mimi decoder fixtures the tests compare against, produced by the upstream code itself.

Dev-only: needs torch, moshi and transformers (a ~5 GB install; never in CI). CI reads what this writes:

  tools/reference/fixtures/mimi/
    moshi.safetensors        one small random Mimi in moshi's naming (what CSM's reference code loads)
    moshi-config.json        its hyperparameters in moshi's form (for convert_mimi.py --config)
    hf/config.json, hf/model.safetensors
                             the same weights in transformers' naming (q/k permuted for rotate-half RoPE)
    codes.json               random codes [n_q][T]
    moshi-batch.f32          moshi's MimiModel.decode of all frames at once (little-endian f32 samples)
    moshi-stream.f32         moshi decoding frame by frame under streaming(1)
    hf-batch.f32             transformers' MimiModel.decode of all frames
  and for the encoder, per input (`speech`: tools/reference/fixtures/audio/speech-espeak.wav, espeak-ng's
  voice resampled to 24 kHz by scipy and zero-padded to whole frames; `noise`: seeded Gaussian noise):
    enc-<input>.f32          the 24 kHz input samples
    enc-<input>-moshi-latent.f32   moshi's latent before quantization [dim 32, T] (row-major, f32)
    enc-<input>-codes.json   {"moshi_batch", "moshi_stream", "hf_batch"}: codes [n_q][T] of moshi's encode,
                             moshi's encode under streaming(1) (1920 samples in, one frame out), and
                             transformers' encode
    enc-<input>-hf-latent.f32      transformers' latent before quantization (its quantizer's input)
    enc-<input>-moshi-roundtrip.f32  moshi's decode of its own batch codes (encode → decode)

The config is small and not the default one (so nothing can pass by assuming Mimi's published shape), with
a 16-step attention window so 16 frames (32 steps) run well past it. Codebooks and layer scales are
randomized: upstream initializes them to zero and 0.01, which would hide most of the decoder.

usage: make_mimi_fixtures.py [OUT_DIR]
"""
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from moshi.models.compression import MimiModel as MoshiMimi
from moshi.modules import SEANetDecoder, SEANetEncoder, transformer
from moshi.quantization import SplitResidualVectorQuantizer
from transformers import MimiConfig, MimiModel as HfMimi

SEED = 20261201
FRAMES = 16
RATIOS = [8, 6, 5, 4]
SEANET = dict(channels=1, dimension=32, causal=True, n_filters=4, n_residual_layers=1, activation="ELU", compress=2,
              dilation_base=2, disable_norm_outer_blocks=0, kernel_size=7, residual_kernel_size=3, last_kernel_size=3,
              norm="none", pad_mode="constant", ratios=RATIOS, true_skip=True)
QUANTIZER = dict(dimension=16, n_q=8, bins=64, input_dimension=32, output_dimension=32)
TRANSFORMER = dict(d_model=32, num_heads=4, num_layers=2, causal=True, layer_scale=0.01, context=16, conv_layout=True,
                   max_period=10000, gating="none", norm="layer_norm", positional_embedding="rope", dim_feedforward=64,
                   input_dimension=32, output_dimensions=[32])


def moshi_model() -> MoshiMimi:
    model = MoshiMimi(
        SEANetEncoder(**SEANET), SEANetDecoder(**SEANET), SplitResidualVectorQuantizer(**QUANTIZER),
        channels=1, sample_rate=24000, frame_rate=12.5, encoder_frame_rate=24000 / np.prod(RATIOS), causal=True,
        resample_method="conv",
        encoder_transformer=transformer.ProjectedTransformer(device="cpu", **TRANSFORMER),
        decoder_transformer=transformer.ProjectedTransformer(device="cpu", **TRANSFORMER))
    model.eval()
    return model


def randomize(model: MoshiMimi, gen: torch.Generator):
    """Codebooks, layer scales and norms off their neutral initial values."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("embedding_sum"):
                t.copy_(torch.randn(t.shape, generator=gen))
            elif name.endswith("cluster_usage"):
                t.copy_(torch.rand(t.shape, generator=gen) * 2 + 0.25)
            elif name.endswith("_initialized"):
                t.fill_(1.0)
            elif ".scale" in name and "layer_scale" in name:
                t.copy_(torch.rand(t.shape, generator=gen) * 0.8 + 0.2)
            elif "norm" in name and name.endswith("weight"):
                t.copy_(1 + 0.3 * torch.randn(t.shape, generator=gen))
            elif "norm" in name and name.endswith("bias"):
                t.copy_(0.3 * torch.randn(t.shape, generator=gen))
        for module in model.modules():
            if hasattr(module, "_embedding"):
                module._embedding = None  # recomputed from the randomized sums


def hf_config() -> MimiConfig:
    return MimiConfig(
        sampling_rate=24000, frame_rate=12.5, audio_channels=1, hidden_size=32, num_filters=4, num_residual_layers=1,
        upsampling_ratios=RATIOS, kernel_size=7, last_kernel_size=3, residual_kernel_size=3, dilation_growth_rate=2,
        use_causal_conv=True, pad_mode="constant", compress=2, trim_right_ratio=1.0, codebook_size=64, codebook_dim=16,
        num_quantizers=8, use_conv_shortcut=False, vector_quantization_hidden_dimension=16, num_semantic_quantizers=1,
        upsample_groups=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
        head_dim=8, hidden_act="gelu", max_position_embeddings=8000, norm_eps=1e-5, rope_theta=10000.0,
        sliding_window=16, layer_scale_initial_scale=0.01, attention_bias=False)


def interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q/k for interleaved RoPE pairs → rows for rotate-half (what transformers' converter does)."""
    rows, cols = w.shape
    d = rows // n_heads
    return w.view(n_heads, d // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def to_hf(state: dict, n_layers: int, n_heads: int, n_ratios: int) -> dict:
    """moshi's state dict in transformers' naming (both paths and the quantizer)."""
    out = {}
    q = "quantizer."
    for group, hf_group in [("rvq_first", "semantic"), ("rvq_rest", "acoustic")]:
        prefix = f"{q}{group}."
        for name, t in state.items():
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            hf = f"{q}{hf_group}_residual_vector_quantizer."
            if rest.startswith("vq.layers."):
                i, leaf = rest[len("vq.layers."):].split("._codebook.")
                leaf = {"embedding_sum": "embed_sum", "cluster_usage": "cluster_usage", "_initialized": "initialized"}[leaf]
                out[f"{hf}layers.{i}.codebook.{leaf}"] = t
            elif rest.startswith(("output_proj.", "input_proj.")):
                out[hf + rest] = t
    out["upsample.conv.weight"] = state["upsample.convtr.convtr.convtr.weight"]
    out["downsample.conv.weight"] = state["downsample.conv.conv.conv.weight"]
    for side, l in [(side, l) for side in ["decoder", "encoder"] for l in range(n_layers)]:
        m = f"{side}_transformer.transformer.layers.{l}."
        h = f"{side}_transformer.layers.{l}."
        qkv = state[m + "self_attn.in_projs.0.weight"]
        qw, kw, vw = qkv.chunk(3, dim=0)
        out[h + "self_attn.q_proj.weight"] = interleaved_to_halves(qw, n_heads)
        out[h + "self_attn.k_proj.weight"] = interleaved_to_halves(kw, n_heads)
        out[h + "self_attn.v_proj.weight"] = vw
        out[h + "self_attn.o_proj.weight"] = state[m + "self_attn.out_projs.0.weight"]
        for a, b in [("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm")]:
            out[h + f"{b}.weight"] = state[m + f"{a}.weight"]
            out[h + f"{b}.bias"] = state[m + f"{a}.bias"]
        out[h + "mlp.fc1.weight"] = state[m + "linear1.weight"]
        out[h + "mlp.fc2.weight"] = state[m + "linear2.weight"]
        out[h + "self_attn_layer_scale.scale"] = state[m + "layer_scale_1.scale"]
        out[h + "mlp_layer_scale.scale"] = state[m + "layer_scale_2.scale"]
    for side in ["decoder", "encoder"]:
        for name, t in state.items():
            if not name.startswith(f"{side}.model."):
                continue
            rest = name[len(f"{side}.model."):]
            n, leaf = rest.split(".", 1)
            leaf = leaf.replace("conv.conv.", "conv.").replace("convtr.convtr.", "conv.")
            out[f"{side}.layers.{n}.{leaf}"] = t
    return out


def speech_input():
    """espeak-ng's sentence at 24 kHz (scipy's polyphase resampler), zero-padded to whole frames."""
    import soundfile as sf
    from scipy.signal import resample_poly
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "audio", "speech-espeak.wav")
    data, rate = sf.read(path, dtype="float64", always_2d=True)
    mono = data.mean(axis=1)
    g = np.gcd(rate, 24000)
    x = resample_poly(mono, 24000 // g, rate // g)
    frames = -(-len(x) // 1920)
    return np.pad(x, (0, frames * 1920 - len(x))).astype(np.float32)


def encode_fixtures(moshi, hf, gen, out_dir):
    """Latents and codes of moshi (batch, streaming) and transformers (batch) for speech and noise."""
    inputs = {"speech": speech_input(), "noise": (0.1 * torch.randn(24 * 1920, generator=gen)).numpy().astype(np.float32)}
    for name, x in inputs.items():
        x.astype("<f4").tofile(os.path.join(out_dir, f"enc-{name}.f32"))
        wav = torch.from_numpy(x)[None, None, :]
        with torch.no_grad():
            latent = moshi._encode_to_unquantized_latent(wav)[0].numpy()
            batch = moshi.encode(wav)[0].numpy()
            chunks = []
            with moshi.streaming(1):
                for t in range(x.shape[0] // 1920):
                    chunks.append(moshi.encode(wav[:, :, t * 1920:(t + 1) * 1920])[0].numpy())
            stream = np.concatenate(chunks, axis=1)
            captured = {}
            original = hf.quantizer.encode

            def capture(embeddings, *args, **kwargs):
                captured["latent"] = embeddings[0].numpy().copy()
                return original(embeddings, *args, **kwargs)

            hf.quantizer.encode = capture
            try:
                hf_codes = hf.encode(wav, num_quantizers=QUANTIZER["n_q"]).audio_codes[0].numpy()
            finally:
                hf.quantizer.encode = original
        with torch.no_grad():
            moshi.decode(torch.from_numpy(batch)[None])[0, 0].numpy().astype("<f4").tofile(os.path.join(out_dir, f"enc-{name}-moshi-roundtrip.f32"))
        latent.astype("<f4").tofile(os.path.join(out_dir, f"enc-{name}-moshi-latent.f32"))
        captured["latent"].astype("<f4").tofile(os.path.join(out_dir, f"enc-{name}-hf-latent.f32"))
        with open(os.path.join(out_dir, f"enc-{name}-codes.json"), "w") as f:
            json.dump({"moshi_batch": batch.tolist(), "moshi_stream": stream.tolist(), "hf_batch": hf_codes.tolist()}, f)
        same = lambda a, b: float(np.mean(a == b))
        print(f"{name}: {x.shape[0] // 1920} frames; latent rms {np.sqrt(np.mean(latent.astype(np.float64) ** 2)):.4f}; "
              f"moshi stream = batch {same(stream, batch):.3f}; hf = moshi {same(hf_codes, batch):.3f}; "
              f"latent SNR hf vs moshi {snr_db(latent, captured['latent']):.1f} dB")


def snr_db(reference: np.ndarray, got: np.ndarray) -> float:
    noise = np.sum((reference.astype(np.float64) - got) ** 2)
    return float("inf") if noise == 0 else 10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / noise)


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "fixtures", "mimi")
    os.makedirs(os.path.join(out_dir, "hf"), exist_ok=True)
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    moshi = moshi_model()
    randomize(moshi, gen)
    state = {k: v.contiguous() for k, v in moshi.state_dict().items()}
    # Saved in the published checkpoint's spelling (tokenizer-e351c8d8-checkpoint125.safetensors): fused
    # `in_proj_weight` and `out_proj.weight`, which moshi maps to its newer names when loading. Both paths.
    published = {k.replace("self_attn.in_projs.0.weight", "self_attn.in_proj_weight").replace("self_attn.out_projs.0.weight", "self_attn.out_proj.weight"): v
                 for k, v in state.items()}
    moshi_path = os.path.join(out_dir, "moshi.safetensors")
    save_file(published, moshi_path)

    codes = torch.randint(0, QUANTIZER["bins"], (1, QUANTIZER["n_q"], FRAMES), generator=gen)
    with torch.no_grad():
        batch = moshi.decode(codes)[0, 0].numpy()
        chunks = []
        with moshi.streaming(1):
            for t in range(FRAMES):
                chunks.append(moshi.decode(codes[:, :, t:t + 1])[0, 0].numpy())
        stream = np.concatenate(chunks)
        # The saved file loads back into moshi as the same model.
        again = moshi_model()
        again.load_state_dict({**{k: v for k, v in state.items() if not k.endswith("_transformer")}, **{
            k: v for k, v in state.items() if "_transformer." in k}, **{k: v for k, v in load_file(moshi_path).items() if "_transformer." not in k}})
        assert np.array_equal(again.decode(codes)[0, 0].numpy(), batch), "the saved moshi file is another model"

    hf_state = to_hf(state, TRANSFORMER["num_layers"], TRANSFORMER["num_heads"], len(RATIOS))
    hf = HfMimi(hf_config())
    hf.eval()
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    for module in hf.modules():
        if hasattr(module, "_embed"):
            module._embed = None
    with torch.no_grad():
        hf_batch = hf.decode(codes).audio_values[0, 0].numpy()
    hf_only = {k: v.contiguous() for k, v in hf_state.items()}
    save_file(hf_only, os.path.join(out_dir, "hf", "model.safetensors"))
    hf_config().to_json_file(os.path.join(out_dir, "hf", "config.json"))

    # moshi files carry no hyperparameters: this is what convert_mimi.py --config is given for this one.
    with open(os.path.join(out_dir, "moshi-config.json"), "w") as f:
        json.dump({"sample_rate": 24000, "frame_rate": 12.5, "seanet": SEANET, "quantizer": QUANTIZER, "transformer": TRANSFORMER}, f, indent=1)
    with open(os.path.join(out_dir, "codes.json"), "w") as f:
        json.dump({"codes": codes[0].tolist()}, f)
    for name, pcm in [("moshi-batch", batch), ("moshi-stream", stream), ("hf-batch", hf_batch)]:
        pcm.astype("<f4").tofile(os.path.join(out_dir, f"{name}.f32"))
    moshi.set_num_codebooks(QUANTIZER["n_q"]) if hasattr(moshi, "set_num_codebooks") else None
    encode_fixtures(moshi, hf, gen, out_dir)
    print(f"{FRAMES} frames -> {batch.shape[0]} samples; rms {np.sqrt(np.mean(batch.astype(np.float64) ** 2)):.4f}")
    print(f"moshi stream vs batch: SNR {snr_db(batch, stream):.1f} dB")
    print(f"hf batch vs moshi batch: SNR {snr_db(batch, hf_batch):.1f} dB")
    inside = TRANSFORMER["context"] // 2 * 1920
    print(f"first {inside} samples (inside the window): stream vs batch SNR {snr_db(batch[:inside], stream[:inside]):.1f} dB, "
          f"hf vs moshi batch SNR {snr_db(batch[:inside], hf_batch[:inside]):.1f} dB")
    print("(transformers' eager/sdpa Mimi attends causally without the sliding window; moshi's streaming ring buffer holds "
          "exactly `context` steps: both part from moshi's batch decoding past the window)")


if __name__ == "__main__":
    main()
