#!/usr/bin/env python3
"""Decode speed when the cores are shared: each engine alone, beside a busy loop, and two copies at once.

A server rarely owns its cores. This runs SmolLM2 decode (tg) with ccsm's `bench` and llama.cpp's
`llama-bench`, and tiny-csm frames/s with ccsm's, in three situations:
  alone  - one process with -t THREADS on a quiet machine;
  busy   - the same beside BUSY single-threaded busy loops (another program's CPU-bound thread);
  two    - two copies of the same engine started together (their speeds summed).
With --server, also each engine's server (`ccsm-infer serve`, `llama-server`): one client streaming
a completion, decode tokens/s between its first and last token.
Rounds interleave every engine and situation; the table gives medians over the rounds and the
ratios busy/alone and two/alone. Whole-process figures, each engine measured by its own bench.

usage: tools/bench_shared_cores.py [--ccsm NAME=BIN ...] [--peer DIR] [--rounds 3] [--tg 64] [--server]
"""
import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2 = os.path.join(ROOT, "models/SmolLM2-135M-Instruct.Q4_1.gguf")
TINY_CSM = os.path.join(ROOT, "models/tiny-csm.gguf")


def ccsm_cmd(binary, model, n, threads):
    return [binary, "bench", model, "-p", "0", "-n", str(n), "-r", "3", "-t", str(threads), "-o", "jsonl", "-q"]


def peer_cmd(binary, model, n, threads):
    return [binary, "-m", model, "-p", "0", "-n", str(n), "-r", "3", "-t", str(threads), "-o", "jsonl"]


def server_cmd(binary, n, threads):
    """This script serving one streamed completion through `binary` (ccsm-infer or llama-server)."""
    return [sys.executable, os.path.abspath(__file__), "--serve-one", binary, "--tg", str(n), "--threads", str(threads)]


def serve_one(binary, n, threads):
    """Starts a server on SmolLM2, streams 3 completions of `n` tokens, prints bench-shaped JSON rows."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    if os.path.basename(binary) == "llama-server":
        cmd = [binary, "-m", SMOLLM2, "--port", str(port), "-np", "1", "-t", str(threads), "-c", "1024", "--no-webui"]
    else:
        cmd = [binary, "serve", SMOLLM2, "--port", str(port), "--parallel", "1", "-t", str(threads), "-c", "1024", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except Exception:
                time.sleep(0.1)
        speeds = []
        for _ in range(3):
            body = json.dumps({"prompt": "The history of the", "max_tokens": n, "temperature": 0, "stream": True,
                               "ignore_eos": True, "cache_prompt": False}).encode()
            req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
            times = []
            try:
                r = urllib.request.urlopen(req, timeout=600)
            except urllib.error.HTTPError as e:
                sys.exit(f"{binary} answered {e.code}: {e.read()[:400]!r}")
            with r:
                for line in r:
                    if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0].get("text"):
                        times.append(time.perf_counter())
            speeds.append((len(times) - 1) / (times[-1] - times[0]))
        print(json.dumps({"n_gen": n, "avg_ts": statistics.mean(speeds)}))
    finally:
        proc.terminate()
        proc.wait()


def speed(output):
    rows = [json.loads(line) for line in output.splitlines() if line.strip().startswith("{")]
    rows = [r for r in rows if r.get("n_gen", 0) > 0]
    if not rows:
        raise RuntimeError(f"no decode row in:\n{output[-600:]}")
    return rows[-1]["avg_ts"]


def run_together(cmds):
    """Starts every command at once; returns each one's decode speed."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    outs = [p.communicate() for p in procs]
    for p, (out, err), c in zip(procs, outs, cmds):
        if p.returncode != 0:
            sys.exit(f"failed ({p.returncode}): {' '.join(c)}\n{err[-800:]}")
    return [speed(out) for out, _ in outs]


def busy_cpu_seconds():
    """CPU seconds every process on the machine has spent so far (/proc/stat, idle and iowait excluded)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(cmd, situation, busy, max_foreign=0.05, tries=5):
    """`measure_once`, again while other programs used more than `max_foreign` of a core meanwhile."""
    for attempt in range(tries):
        started, ours = busy_cpu_seconds(), children_cpu_seconds()
        wall = -os.times().elapsed
        value = measure_once(cmd, situation, busy)
        wall += os.times().elapsed
        foreign = (busy_cpu_seconds() - started) - (children_cpu_seconds() - ours)
        if foreign <= max_foreign * wall:
            return value
        print(f"  other programs used {foreign / wall:.0%} of a core meanwhile: again", file=sys.stderr, flush=True)
    sys.exit("the machine is not quiet: other programs keep using the cores")


def measure_once(cmd, situation, busy):
    if situation == "two":
        return sum(run_together([cmd, cmd]))
    loops = []
    if situation == "busy":
        loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        return run_together([cmd])[0]
    finally:
        for p in loops:
            p.kill()
            p.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ccsm", action="append", default=[], help="NAME=BINARY of a ccsm-infer to measure (repeatable)")
    ap.add_argument("--peer", default=os.path.expanduser("~/.cache/ccsm-peer/build/bin"), help="folder of llama-bench")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tg", type=int, default=64, help="tokens (frames for tiny-csm) per decode test")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--busy", type=int, default=1, help="busy loops beside the engine in the `busy` situation")
    ap.add_argument("--situations", default="alone,busy,two")
    ap.add_argument("--server", action="store_true", help="also measure each engine's server")
    ap.add_argument("--serve-one", metavar="BINARY", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_one:
        return serve_one(args.serve_one, args.tg, args.threads)
    engines = [tuple(e.split("=", 1)) for e in args.ccsm] or [("ccsm", os.path.join(ROOT, "target/release/ccsm-infer"))]
    tests = []
    for name, binary in engines:
        tests.append((name, "SmolLM2 tg", ccsm_cmd(binary, SMOLLM2, args.tg, args.threads)))
    peer = os.path.join(args.peer, "llama-bench")
    if os.access(peer, os.X_OK):
        tests.append(("llama.cpp", "SmolLM2 tg", peer_cmd(peer, SMOLLM2, args.tg, args.threads)))
    else:
        print(f"(no {peer}: llama.cpp not measured; ../shared/peer/build_peer.sh builds it)", file=sys.stderr)
    if args.server:
        for name, binary in engines:
            tests.append((name, "SmolLM2 server tg", server_cmd(binary, args.tg, args.threads)))
        if os.access(peer, os.X_OK):
            tests.append(("llama.cpp", "SmolLM2 server tg", server_cmd(os.path.join(args.peer, "llama-server"), args.tg, args.threads)))
    for name, binary in engines:
        tests.append((name, "tiny-csm frames", ccsm_cmd(binary, TINY_CSM, args.tg, args.threads)))
    situations = args.situations.split(",")
    got = {}
    for r in range(args.rounds):
        order = [(t, s) for t in tests for s in situations]
        if r % 2:
            order.reverse()
        for (name, test, cmd), situation in order:
            value = measure(cmd, situation, args.busy)
            got.setdefault((name, test, situation), []).append(value)
            print(f"round {r + 1}: {name} {test} {situation}: {value:.1f}/s", file=sys.stderr, flush=True)
    print(f"Decode per second, median of {args.rounds} interleaved rounds, -t {args.threads}, {args.busy} busy loop(s)\n")
    head = " | ".join(situations)
    ratios = " | ".join(f"{s}/alone" for s in situations if s != "alone")
    print(f"| engine | test | {head} | {ratios} |")
    print("|---|---|" + "---:|" * (len(situations) * 2 - 1))
    for name, test, _ in tests:
        med = {s: statistics.median(got[(name, test, s)]) for s in situations}
        cells = " | ".join(f"{med[s]:.1f}" for s in situations)
        rel = " | ".join(f"{med[s] / med['alone']:.2f}" for s in situations if s != "alone") if "alone" in med else ""
        print(f"| {name} | {test} | {cells} | {rel} |")


if __name__ == "__main__":
    main()
