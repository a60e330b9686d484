#!/usr/bin/env python3
"""Writes the audio-input fixtures the tests compare against, made and read by independent tools.

Dev-only: needs soundfile (libsndfile) and scipy. CI reads what this writes:

  tools/reference/fixtures/audio/
    tone-<kind>.<ext>       0.4 s of two different sines per channel (stereo), written by libsndfile:
                            u8/s16/s24/s32/f32 WAV at 22050 Hz, FLAC, Ogg Vorbis and MP3 at 44100 Hz
    tone-<kind>.ref.f32     what soundfile.read gives for it, mixed to mono (mean of the channels), f32 LE
    resample-<rate>.f32     scipy.signal.resample_poly of `signal(rate)` to 24000 Hz, f32 LE
    index.json              each file's rate and frames

signal(rate, seconds=0.25): sum of sines at 220, 1000, 3150 and 5900 Hz (amplitudes 0.3, 0.2, 0.15, 0.1,
phases 0, 0.5, 1.0, 1.5), sampled at `rate` from t = 0; the Rust test computes it the same way.

usage: make_audio_fixtures.py [OUT_DIR]
"""
import json
import math
import os
import sys

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

HERE = os.path.dirname(os.path.abspath(__file__))
SINES = [(220.0, 0.3, 0.0), (1000.0, 0.2, 0.5), (3150.0, 0.15, 1.0), (5900.0, 0.1, 1.5)]
TARGET = 24000


def signal(rate, seconds=0.25):
    t = np.arange(int(round(rate * seconds)), dtype=np.float64) / rate
    return sum(a * np.sin(2 * math.pi * f * t + p) for f, a, p in SINES)


def stereo(rate, seconds=0.4):
    t = np.arange(int(round(rate * seconds)), dtype=np.float64) / rate
    left = 0.5 * np.sin(2 * math.pi * 440.0 * t)
    right = 0.3 * np.sin(2 * math.pi * 660.0 * t + 0.7)
    return np.stack([left, right], axis=1)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "fixtures", "audio")
    os.makedirs(out, exist_ok=True)
    index = {}
    kinds = [
        ("u8", "wav", "WAV", "PCM_U8", 22050),
        ("s16", "wav", "WAV", "PCM_16", 22050),
        ("s24", "wav", "WAV", "PCM_24", 22050),
        ("s32", "wav", "WAV", "PCM_32", 22050),
        ("f32", "wav", "WAV", "FLOAT", 22050),
        ("flac", "flac", "FLAC", "PCM_16", 44100),
        ("vorbis", "ogg", "OGG", "VORBIS", 44100),
        ("mp3", "mp3", "MP3", "MPEG_LAYER_III", 44100),
    ]
    for kind, ext, fmt, subtype, rate in kinds:
        path = os.path.join(out, f"tone-{kind}.{ext}")
        sf.write(path, stereo(rate), rate, format=fmt, subtype=subtype)
        data, got_rate = sf.read(path, dtype="float32", always_2d=True)
        data.mean(axis=1).astype("<f4").tofile(os.path.join(out, f"tone-{kind}.ref.f32"))
        index[f"tone-{kind}.{ext}"] = {"rate": got_rate, "frames": len(data), "ref": f"tone-{kind}.ref.f32"}
    for rate in [16000, 22050, 44100, 48000]:
        g = math.gcd(rate, TARGET)
        resampled = resample_poly(signal(rate), TARGET // g, rate // g)
        resampled.astype("<f4").tofile(os.path.join(out, f"resample-{rate}.f32"))
        index[f"resample-{rate}.f32"] = {"from": rate, "to": TARGET, "frames": len(resampled)}
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
