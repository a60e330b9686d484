#!/usr/bin/env python3
"""Two (or more) builds of ccsm-infer side by side: `ccsm-infer bench` of each, interleaved over rounds
(build A, build B, build A, ...), medians per build and test, and each build's ratio to the first.

    tools/bench_builds.py --build before=OLD/ccsm-infer --build after=target/release/ccsm-infer \\
        [--rounds 3] MODEL [BENCH ARGS ...]

BENCH ARGS go to `bench` as they are (e.g. `-p 512 -n 128 -r 3`). Rows are keyed by the bench's test
(pp512, tg128, frame16, ...) and cache type; the speed is the bench's own mean per row.
"""
import argparse
import json
import statistics
import subprocess
import sys


def run(binary, model, extra):
    out = subprocess.run([binary, "bench", model, "-o", "jsonl", "-q", *extra], check=True, capture_output=True, text=True).stdout
    rows = {}
    for line in out.splitlines():
        r = json.loads(line)
        n = r["n_prompt"] if r["test"] == "pp" else r["n_gen"]
        rows[f"{r['test']}{n} {r['k_type']}/{r['v_type']} d{r['depth']}"] = r["avg_ts"]
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", action="append", required=True, help="NAME=BIN (repeat; the first is the baseline)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("model")
    ap.add_argument("bench_args", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    builds = [b.split("=", 1) for b in args.build]
    seen = {name: {} for name, _ in builds}
    for r in range(args.rounds):
        for name, binary in builds:
            for key, value in run(binary, args.model, args.bench_args).items():
                seen[name].setdefault(key, []).append(value)
                print(f"round {r + 1}: {name} {key}: {value:.2f}", file=sys.stderr, flush=True)
    base = builds[0][0]
    print(f"| test | " + " | ".join(name for name, _ in builds) + " | " + " | ".join(f"{n} / {base}" for n, _ in builds[1:]) + " |")
    print("|---|" + "---:|" * (2 * len(builds) - 1))
    for key in seen[base]:
        medians = [statistics.median(seen[name].get(key, [float("nan")])) for name, _ in builds]
        ratios = [m / medians[0] for m in medians[1:]]
        print(f"| {key} | " + " | ".join(f"{m:.2f}" for m in medians) + " | " + " | ".join(f"{x:.2f}" for x in ratios) + " |")


if __name__ == "__main__":
    main()
