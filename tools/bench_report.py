#!/usr/bin/env python3
"""Renders docs/benchmarks.md from the raw results of tools/bench.sh: speed side by side with llama.cpp's
llama-bench when tools/bench.sh could run it (docs/data/peer-compare.jsonl, one interleaved run), and
accuracy beside llama.cpp's KLD from shared/notes/targets.md."""
import json
import sys
from pathlib import Path

LLAMA_CPP_KLD_512 = {"q8_0/q8_0": (0.00366, 96.81), "q4_0/q4_0": (0.05547, 87.79), "q4_1/q4_1": (0.04997, 88.93), "q8_0/q4_0": (0.00964, 95.54)}


def test_name(r):
    base = f"pp{r['n_prompt']}" if r["test"] == "pp" else f"tg{r['n_gen']}"
    return f"{base} @ d{r['depth']}" if r["depth"] else base


def machine(data):
    """The CPU model and the kernels that ran, from bench.sh's system.txt ("unrecorded" before it kept one)."""
    path = data / "system.txt"
    if not path.exists():
        return "unrecorded"
    lines = path.read_text().splitlines()
    field = lambda key: next((l.split(": ", 1)[1] for l in lines if l.startswith(key + ": ")), "?")
    return f"{lines[0] if lines else '?'}; ggml's CPU features: {field('cpu features')}; our kernels: {field('own kernels')}"


def main():
    data = Path(sys.argv[1])
    rows = [json.loads(l) for l in (data / "bench.jsonl").read_text().splitlines() if l.strip()]
    kld = [json.loads(l) for l in (data / "kld.jsonl").read_text().splitlines() if l.strip()]
    base = json.loads((data / "ppl-f32.json").read_text())
    print("# Benchmarks\n")
    print("Made by `make bench` (tools/bench.sh): SmolLM2-135M-Instruct Q4_1, 2 threads, flash attention, on the")
    print(f"2-core development machine ({machine(data)}). Identical runs on this shared machine move 10–20 %.\n")
    peer = data / "peer-compare.jsonl"
    if peer.exists():
        side_by_side([json.loads(l) for l in peer.read_text().splitlines() if l.strip()])
    else:
        print("## Speed\n")
        print("No side-by-side run: llama.cpp's llama-bench was not found. Build it with `../shared/peer/build_peer.sh`")
        print("(about 8 minutes; or point PEER_BIN at a folder holding llama-bench) and rerun `make bench`.\n")
    print("## ccsm alone (tokens/s, avg ± stddev of 3 runs)\n")
    print("| cache | test | ccsm t/s | KV cache MiB | peak RSS MiB |")
    print("| --- | --- | ---: | ---: | ---: |")
    for r in rows:
        cache = r["k_type"] if r["k_type"] == r["v_type"] else f"{r['k_type']}/{r['v_type']}"
        rss = f"{r['peak_rss_bytes'] / 2**20:.1f}" if r.get("peak_rss_bytes") else "—"
        print(f"| {cache} | {test_name(r)} | {r['avg_ts']:.1f} ± {r['stddev_ts']:.1f} | {r['kv_bytes'] / 2**20:.2f} | {rss} |")
    print(f"\n## Accuracy on the Jargon File (ctx {base['ctx']}, {base['chunks']} chunks, {base['scored_tokens']} tokens scored)\n")
    print(f"F32-cache reference: PPL = {base['ppl']['mean']:.4f} ± {base['ppl']['stderr']:.4f}.\n")
    print("| K/V | PPL | mean KLD | same top % | Δ ln PPL | RMS Δp % | llama.cpp KLD (ctx 512) | llama.cpp same top % |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for k in kld:
        pair = f"{k['cache']['k_type']}/{k['cache']['v_type']}"
        peer = LLAMA_CPP_KLD_512.get(pair)
        kl = k["kl"]
        print(
            f"| {pair} | {k['ppl']['mean']:.4f} | {kl['kld']['mean']:.5f} ± {kl['kld']['stderr']:.5f} | "
            f"{kl['same_top_percent']['mean']:.2f} | {kl['delta_ln_ppl']['mean']:+.5f} | {kl['rms_delta_p_percent']:.3f} | "
            f"{peer[0] if peer else '—'} | {peer[1] if peer else '—'} |"
        )
    print("\nllama.cpp's KLD is measured against an f16 cache, ours against an f32 cache. Quantized halves are stored")
    print("Hadamard-rotated (the default `--kv-rotation quantized`); `docs/kv-rotation.md` has the pairs against an f16")
    print("cache, with and without rotation.")
    memory_section(data)


def side_by_side(rows):
    """ccsm and llama.cpp per cache type, depth and test, from compare_bench.sh's interleaved run."""
    def kind(r):
        return "pp" if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0 else "tg"
    got = {(r["engine"], r["cache"], r["depth"], kind(r)): r for r in rows}
    cells = sorted({(c, d, k) for (_, c, d, k) in got}, key=lambda x: (CACHE_ORDER.index(x[0]), x[1], x[2]))
    print("## Speed beside llama.cpp (one interleaved run: `../shared/peer/compare_bench.sh`, 3 repetitions each)\n")
    print("| K/V | depth | test | ccsm t/s | llama.cpp t/s | ccsm / llama.cpp |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    ours = {}
    for cache, depth, k in cells:
        a, b = got.get(("ccsm", cache, depth, k)), got.get(("llama.cpp", cache, depth, k))
        if not a or not b:
            continue
        ours[(cache, depth, k)] = a["avg_ts"]
        n = a["n_prompt"] if k == "pp" else a["n_gen"]
        print(f"| {cache} | {depth} | {k}{n} | {a['avg_ts']:.1f} ± {a['stddev_ts']:.1f} | {b['avg_ts']:.1f} ± {b['stddev_ts']:.1f} | "
              f"{a['avg_ts'] / b['avg_ts']:.2f} |")
    deepest = max((d for (_, d, _) in ours), default=0)
    print(f"\nQuantized caches against our own f16 cache at depth {deepest}:\n")
    print("| K/V | pp / f16 pp | tg / f16 tg |")
    print("| --- | ---: | ---: |")
    for cache in CACHE_ORDER:
        if cache in ("f16", "f32") or (cache, deepest, "pp") not in ours or ("f16", deepest, "pp") not in ours:
            continue
        pp = ours[(cache, deepest, "pp")] / ours[("f16", deepest, "pp")]
        tg = ours[(cache, deepest, "tg")] / ours[("f16", deepest, "tg")]
        print(f"| {cache} | {pp:.2f} | {tg:.2f} |")
    print()


CACHE_ORDER = ["f32", "f16", "q8_0", "q4_0", "q4_1"]


def memory_section(data):
    """The optimizer under budgets (tools/memory_bench.sh), when its results are there."""
    path = data / "memory.jsonl"
    if not path.exists():
        return
    base = json.loads((data / "memory-base.json").read_text())
    runs = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    print(f"\n## Memory optimizer (ctx 2048, {base['chunks']} chunks of the Jargon File)\n")
    print("Budgets are about 50 %, 25 % and 10 % of the f32 cache (90 MiB at 2048 cells); the unconstrained f32 run has")
    print(f"PPL {base['ppl']['mean']:.4f}. A full cache evicts down to three quarters of its capacity.\n")
    print("| budget MiB | policy | strategy | actions | PPL | mean KLD | same top % |")
    print("| ---: | --- | --- | --- | ---: | ---: | ---: |")
    for r in runs:
        m = r["memory_optimizer"]
        print(f"| {r['budget_mb']} | {r['policy']} | {m['strategy']} | {'; '.join(m['actions'])} | {r['ppl']['mean']:.4f} | "
              f"{r['kl']['kld']['mean']:.5f} | {r['kl']['same_top_percent']['mean']:.2f} |")


if __name__ == "__main__":
    main()
