#!/usr/bin/env python3
"""Streaming Mimi decoding (or, with --encode, encoding), ccsm beside moshi's own, interleaved in one run.

    bench_codec_vs_moshi.py CODEC.gguf [--frames 64] [--rounds 3] [--threads 2] [--ccsm target/release/ccsm-infer]
    bench_codec_vs_moshi.py CODEC.gguf --encode [--seconds 10] [--example target/release/examples/encode_speed]

--encode: moshi encodes SECONDS of noise whole (`encode`) and frame by frame under `streaming(1)`; ccsm
runs `cargo run --release -p ccsm --example encode_speed CODEC SECONDS THREADS` (best of 3 each).

Needs torch and moshi (a dev install, ~5 GB: not in CI). moshi decodes a Mimi of the published shape with
random weights frame by frame under `streaming(1)` (torch.set_num_threads(THREADS)); ccsm runs `bench` on
CODEC (`make mimi-shape`, any weight type) with one frame per call. Rounds alternate which goes first;
each side's best round is reported, with the ratio.
"""
import argparse
import json
import subprocess
import time

import torch
from moshi.models.loaders import get_mimi


def moshi_round(model, frames, threads):
    torch.set_num_threads(threads)
    codes = torch.randint(0, 2048, (1, 32, frames + 3))
    with torch.no_grad(), model.streaming(1):
        for t in range(3):  # warm-up
            model.decode(codes[:, :, t:t + 1])
        start = time.perf_counter()
        for t in range(3, frames + 3):
            model.decode(codes[:, :, t:t + 1])
        return time.perf_counter() - start


def ccsm_round(binary, codec, frames, threads):
    out = subprocess.run([binary, "bench", codec, "-n", str(frames), "-r", "1", "--chunk", "1", "-t", str(threads), "-o", "jsonl", "-q"],
                         check=True, capture_output=True, text=True).stdout
    row = json.loads(out.splitlines()[0])
    return frames / row["avg_ts"]


def moshi_encode_round(model, seconds, threads):
    torch.set_num_threads(threads)
    frames = int(seconds * 12.5)
    x = 0.1 * torch.randn(1, 1, frames * 1920)
    with torch.no_grad():
        model.encode(x[:, :, :1920])  # warm-up
        start = time.perf_counter()
        model.encode(x)
        batch = time.perf_counter() - start
        with model.streaming(1):
            start = time.perf_counter()
            for t in range(frames):
                model.encode(x[:, :, t * 1920:(t + 1) * 1920])
            streaming = time.perf_counter() - start
    return batch / seconds, streaming / seconds


def encode_main(args, model):
    best = {"moshi": [float("inf")] * 2, "ccsm": [float("inf")] * 2}
    for r in range(args.rounds):
        for side in (["moshi", "ccsm"] if r % 2 == 0 else ["ccsm", "moshi"]):
            if side == "moshi":
                rtf = moshi_encode_round(model, args.seconds, args.threads)
            else:
                out = subprocess.run([args.example, args.codec, str(args.seconds), str(args.threads)], check=True, capture_output=True, text=True).stdout
                row = json.loads(out)
                rtf = (row["batch_rtf"], row["streaming_rtf"])
            best[side] = [min(a, b) for a, b in zip(best[side], rtf)]
            print(f"round {r + 1} {side}: batch RTF {rtf[0]:.4f}, streaming RTF {rtf[1]:.4f}", flush=True)
    print(f"\n| encoder ({args.threads} threads, {args.seconds} s) | batch RTF | streaming RTF |\n|---|---:|---:|")
    for side in ("moshi", "ccsm"):
        print(f"| {side} | {best[side][0]:.4f} | {best[side][1]:.4f} |")
    print(f"\nccsm / moshi speed: batch {best['moshi'][0] / best['ccsm'][0]:.1f}x, streaming {best['moshi'][1] / best['ccsm'][1]:.1f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("codec")
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ccsm", default="target/release/ccsm-infer")
    ap.add_argument("--encode", action="store_true")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--example", default="target/release/examples/encode_speed")
    args = ap.parse_args()
    model = get_mimi(None, num_codebooks=32)
    model.eval()
    if args.encode:
        return encode_main(args, model)
    best = {"moshi": float("inf"), "ccsm": float("inf")}
    for r in range(args.rounds):
        order = ["moshi", "ccsm"] if r % 2 == 0 else ["ccsm", "moshi"]
        for side in order:
            seconds = moshi_round(model, args.frames, args.threads) if side == "moshi" else ccsm_round(args.ccsm, args.codec, args.frames, args.threads)
            best[side] = min(best[side], seconds)
            print(f"round {r + 1} {side}: {1000 * seconds / args.frames:.2f} ms/frame", flush=True)
    audio = args.frames / 12.5
    print(f"\n| decoder | ms per frame | real-time factor |\n|---|---:|---:|")
    for side in ("moshi", "ccsm"):
        print(f"| {side} (streaming, {args.threads} threads) | {1000 * best[side] / args.frames:.2f} | {best[side] / audio:.3f} |")
    print(f"\nccsm is {best['moshi'] / best['ccsm']:.1f}x faster than moshi's streaming decoder")


if __name__ == "__main__":
    main()
