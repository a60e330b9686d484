#!/usr/bin/env python3
"""Aggregate decode speed of the HTTP servers with concurrent streaming clients, ccsm beside llama-server.

    tools/bench_server.py MODEL [--clients 1,2,4,8] [--tokens 128] [--reps 3] [--peer DIR] [-o FILE.jsonl]
    tools/bench_server.py CSM_MODEL --codec MIMI [--clients 1,2,4] [--audio-ms 2000]   (speech, ccsm only)
        [--ccsm NAME=BIN ...]   (speech: several ccsm builds side by side, interleaved, with ratios to the first)

Both servers run with the same threads, cache type (f16) and parallel slots as clients; for each client
count the two are measured alternately (ours, theirs, ours, ...), and the best of --reps is kept. A round
starts N clients at once, each streaming one completion of --tokens tokens from its own prompt; aggregate
decode tokens/s = tokens generated after each client's first token / (last token time - first token
time). Prints a table of both and their ratio; -o writes every round as JSON lines.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = [
    "Count from one to one thousand in words: one, two, three, four, five,",
    "The Jargon File is a glossary of hacker slang. Its entries begin with",
    "Here is a long list of fruits and vegetables: apple, banana, carrot,",
    "Write out the multiplication table of seven: 7, 14, 21, 28, 35,",
    "A list of programming languages, one per line: C, Lisp, Fortran, COBOL,",
    "The alphabet spelled out, letter by letter: a, b, c, d, e, f, g,",
    "Some of the largest cities of the world are Tokyo, Delhi, Shanghai,",
    "Even numbers from two upwards: 2, 4, 6, 8, 10, 12, 14, 16, 18,",
]


def wait_healthy(url, proc, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.2)
    raise RuntimeError("server never became healthy")


def start(kind, model, n, threads, port, peer, codec=None, binary=None):
    if kind == "ccsm":
        binary = binary or os.path.join(HERE, "..", "target", "release", "ccsm-infer")
        cmd = [binary, "serve", model, "--port", str(port), "--parallel", str(n), "-t", str(threads), "-c", "1024", "-q"]
        if codec:
            cmd += ["--codec", codec]
    else:
        cmd = [os.path.join(peer, "llama-server"), "-m", model, "--port", str(port), "-np", str(n), "-t", str(threads),
               "-c", str(1024 * n), "--no-webui", "-ctk", "f16", "-ctv", "f16"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc)
    return proc, url


def stream_one(url, prompt, tokens, out):
    # cache_prompt off: llama-server would otherwise reuse the cache of the same prompt from the last round.
    body = json.dumps({"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True, "cache_prompt": False}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    times = []
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0].get("text"):
                times.append(time.perf_counter())
    out.append(times)


def round_(url, n, tokens):
    results = []
    threads = [threading.Thread(target=stream_one, args=(url, PROMPTS[i % len(PROMPTS)], tokens, results)) for i in range(n)]
    started = time.perf_counter()
    [t.start() for t in threads]
    [t.join() for t in threads]
    firsts = [t[0] for t in results if t]
    lasts = [t[-1] for t in results if t]
    decoded = sum(len(t) - 1 for t in results if t)
    span = max(lasts) - min(firsts)
    return {"clients": n, "tokens": sum(len(t) for t in results), "decode_tps": decoded / span if span > 0 else 0.0,
            "ttft_ms": 1000 * (max(firsts) - started), "wall_s": max(lasts) - started}


def speak_one(url, i, audio_ms, out):
    body = json.dumps({"input": PROMPTS[i % len(PROMPTS)], "voice": str(i % 4), "response_format": "pcm", "seed": i,
                       "max_audio_ms": audio_ms}).encode()
    req = urllib.request.Request(url + "/v1/audio/speech", data=body, headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    first, total = None, 0
    with urllib.request.urlopen(req, timeout=1200) as r:
        while True:
            chunk = r.read1(65536)
            if not chunk:
                break
            first = first or time.perf_counter()
            total += len(chunk)
    out.append((started, first, time.perf_counter(), total / 3840))


def speech_round(url, n, audio_ms):
    results = []
    threads = [threading.Thread(target=speak_one, args=(url, i, audio_ms, results)) for i in range(n)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    start, end = min(r[0] for r in results), max(r[2] for r in results)
    frames = sum(r[3] for r in results)
    ttfa = sorted(1000 * (r[1] - r[0]) for r in results)
    # Steady state: frames after each stream's first, over the time from the last first audio to the end.
    steady = (frames - n) / max(end - max(r[1] for r in results), 1e-9)
    return {"clients": n, "frames": frames, "frames_per_s": steady, "whole_frames_per_s": frames / (end - start),
            "ttfa_ms_median": ttfa[len(ttfa) // 2], "ttfa_ms_max": ttfa[-1], "wall_s": end - start}


def speech_builds(args):
    """Each build's servers measured alternately per client count; the best of --reps per build."""
    builds = [b.split("=", 1) for b in args.ccsm]
    print("| clients | " + " | ".join(f"{name} frames/s" for name, _ in builds) + " | " +
          " | ".join(f"{name} / {builds[0][0]}" for name, _ in builds[1:]) + " | " + " | ".join(f"{name} TTFA ms" for name, _ in builds) + " |")
    print("|---:|" + "---:|" * (3 * len(builds) - 1))
    for n in [int(c) for c in args.clients.split(",")]:
        servers = [start("ccsm", args.model, n, args.threads, 18650 + i, args.peer, codec=args.codec, binary=b) for i, (_, b) in enumerate(builds)]
        best = [None] * len(builds)
        try:
            for _ in range(args.reps):
                for i, (_, url) in enumerate(servers):
                    r = speech_round(url, n, args.audio_ms)
                    if best[i] is None or r["frames_per_s"] > best[i]["frames_per_s"]:
                        best[i] = r
        finally:
            for proc, _ in servers:
                proc.terminate()
                proc.wait()
        base = best[0]["frames_per_s"]
        print(f"| {n} | " + " | ".join(f"{b['frames_per_s']:.2f}" for b in best) + " | " +
              " | ".join(f"{b['frames_per_s'] / base:.2f}" for b in best[1:]) + " | " + " | ".join(f"{b['ttfa_ms_median']:.0f}" for b in best) + " |",
              flush=True)


def speech_main(args):
    if args.ccsm:
        return speech_builds(args)
    rows = []
    for n in [int(c) for c in args.clients.split(",")]:
        proc, url = start("ccsm", args.model, n, args.threads, 18650, args.peer, codec=args.codec)
        try:
            best = max((speech_round(url, n, args.audio_ms) for _ in range(args.reps)), key=lambda r: r["frames_per_s"])
        finally:
            proc.terminate()
            proc.wait()
        rows.append(best)
        print(f"clients {n}: {best}", file=sys.stderr)
    print("| clients | aggregate frames/s (steady) | vs 1 client | real-time factor per stream | frames/s incl. prompts | TTFA median ms | TTFA max ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        per_stream = r["frames_per_s"] / r["clients"]
        print(f"| {r['clients']} | {r['frames_per_s']:.2f} | {r['frames_per_s'] / rows[0]['frames_per_s']:.2f} | {12.5 / per_stream:.2f} | "
              f"{r['whole_frames_per_s']:.2f} | {r['ttfa_ms_median']:.0f} | {r['ttfa_ms_max']:.0f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer", default=os.path.expanduser("~/.cache/ccsm-peer/build/bin"))
    ap.add_argument("-o", "--output")
    ap.add_argument("--codec", help="a Mimi GGUF: benchmark speech (ccsm only) instead of text")
    ap.add_argument("--audio-ms", type=int, default=2000)
    ap.add_argument("--ccsm", action="append", default=[], help="speech: NAME=BIN, a ccsm-infer build to compare (repeat)")
    args = ap.parse_args()
    if args.codec:
        return speech_main(args)
    rows = []
    out = open(args.output, "w") if args.output else None
    for n in [int(c) for c in args.clients.split(",")]:
        servers = {kind: start(kind, args.model, n, args.threads, 18600 + i, args.peer) for i, kind in enumerate(["ccsm", "llama.cpp"])}
        best = {}
        try:
            for _ in range(args.reps):
                for kind, (_, url) in servers.items():
                    r = round_(url, n, args.tokens)
                    r["engine"] = kind
                    if out:
                        out.write(json.dumps(r) + "\n")
                        out.flush()
                    if kind not in best or r["decode_tps"] > best[kind]["decode_tps"]:
                        best[kind] = r
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait()
        rows.append((n, best["ccsm"], best["llama.cpp"]))
        print(f"clients {n}: ccsm {best['ccsm']['decode_tps']:.1f} t/s, llama-server {best['llama.cpp']['decode_tps']:.1f} t/s", file=sys.stderr)
    one = rows[0][1]["decode_tps"]
    print("| clients | ccsm t/s | llama-server t/s | ccsm / llama-server | ccsm vs 1 client | ccsm TTFT ms | llama-server TTFT ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, ours, theirs in rows:
        print(f"| {n} | {ours['decode_tps']:.1f} | {theirs['decode_tps']:.1f} | {ours['decode_tps'] / theirs['decode_tps']:.2f} | "
              f"{ours['decode_tps'] / one:.2f} | {ours['ttft_ms']:.0f} | {theirs['ttft_ms']:.0f} |")


if __name__ == "__main__":
    main()
