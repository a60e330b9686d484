#!/usr/bin/env python3
"""Aggregate decode speed of the HTTP servers with concurrent streaming clients, ccsm beside llama-server.

    tools/bench_server.py MODEL [--clients 1,2,4,8] [--tokens 128] [--reps 3] [--peer DIR] [-o FILE.jsonl]

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


def start(kind, model, n, threads, port, peer):
    if kind == "ccsm":
        binary = os.path.join(HERE, "..", "target", "release", "ccsm-infer")
        cmd = [binary, "serve", model, "--port", str(port), "--parallel", str(n), "-t", str(threads), "-c", "1024", "-q"]
    else:
        cmd = [os.path.join(peer, "llama-server"), "-m", model, "--port", str(port), "-np", str(n), "-t", str(threads),
               "-c", str(1024 * n), "--no-webui", "-ctk", "f16", "-ctv", "f16"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc)
    return proc, url


def stream_one(url, prompt, tokens, out):
    body = json.dumps({"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True}).encode()
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer", default=os.path.expanduser("~/.cache/ccsm-peer/build/bin"))
    ap.add_argument("-o", "--output")
    args = ap.parse_args()
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
