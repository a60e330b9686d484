#!/usr/bin/env python3
"""Renders docs/benchmarks.md from the raw results of tools/bench.sh, beside llama.cpp's numbers
measured on a machine of this kind (shared/notes/targets.md)."""
import json
import sys
from pathlib import Path

# llama.cpp (commit 0c1e570, AVX-512, 2 threads, flash attention), SmolLM2-135M Q4_1.
LLAMA_CPP_SPEED = {  # (cache, test) -> t/s
    ("f16", "pp512"): 278.9, ("f16", "pp512 @ d2048"): 171.6, ("f16", "tg128"): 76.4, ("f16", "tg128 @ d2048"): 36.9,
    ("q8_0", "pp512"): 212.5, ("q8_0", "pp512 @ d2048"): 78.4, ("q8_0", "tg128"): 81.2, ("q8_0", "tg128 @ d2048"): 40.5,
    ("q4_0", "pp512"): 185.1, ("q4_0", "pp512 @ d2048"): 47.4, ("q4_0", "tg128"): 81.2, ("q4_0", "tg128 @ d2048"): 30.2,
}
LLAMA_CPP_KLD_512 = {"q8_0/q8_0": (0.00366, 96.81), "q4_0/q4_0": (0.05547, 87.79), "q4_1/q4_1": (0.04997, 88.93), "q8_0/q4_0": (0.00964, 95.54)}


def test_name(r):
    base = f"pp{r['n_prompt']}" if r["test"] == "pp" else f"tg{r['n_gen']}"
    return f"{base} @ d{r['depth']}" if r["depth"] else base


def main():
    data = Path(sys.argv[1])
    rows = [json.loads(l) for l in (data / "bench.jsonl").read_text().splitlines() if l.strip()]
    kld = [json.loads(l) for l in (data / "kld.jsonl").read_text().splitlines() if l.strip()]
    base = json.loads((data / "ppl-f32.json").read_text())
    print("# Benchmarks\n")
    print("Made by `make bench` (tools/bench.sh): SmolLM2-135M-Instruct Q4_1, 2 threads, on the 2-core")
    print("development machine. llama.cpp's numbers are from the same kind of machine (commit 0c1e570, AVX-512,")
    print("flash attention). Runs on this shared machine vary by 5–15 %.\n")
    print("## Speed (tokens/s, avg ± stddev of 3 runs)\n")
    if rows and "kv_rotated" not in rows[0]:
        print("These speed rows predate rotated caches (quantized rows stored plain); rotation's cost is below this")
        print("machine's noise (`docs/kv-rotation.md`).\n")
    print("| cache | test | ccsm t/s | llama.cpp t/s | ratio | KV cache MiB | peak RSS MiB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        cache = r["k_type"] if r["k_type"] == r["v_type"] else f"{r['k_type']}/{r['v_type']}"
        name = test_name(r)
        peer = LLAMA_CPP_SPEED.get((cache, name))
        ratio = f"{r['avg_ts'] / peer:.2f}×" if peer else "—"
        rss = f"{r['peak_rss_bytes'] / 2**20:.1f}" if r.get("peak_rss_bytes") else "—"
        print(f"| {cache} | {name} | {r['avg_ts']:.1f} ± {r['stddev_ts']:.1f} | {peer if peer else '—'} | {ratio} | {r['kv_bytes'] / 2**20:.2f} | {rss} |")
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
