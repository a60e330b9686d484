#!/usr/bin/env python3
"""KLD against an f32 cache, per cache layout, ours and llama.cpp's side by side (docs/kv-planner.md).

    tools/kv_planner_table.py --profile PROFILE --text jargon=data/jargon.txt --text fortunes=FILE \
        [--ctx 512,2048] [--tokens 4096] [--out results.json]

Both engines run the same model with its weight matrices in f32 (ours: `--weights f32`; llama.cpp: an
f32 GGUF written from the same file with the `gguf` package), so a KLD measures the cache alone: with
quantized weights ggml rounds activations to 8 bits and any change to the cache, even an exact rotation,
costs a floor of ~0.003. For every text and context: an f32-cache reference per engine, every fixed type
of ours and of llama.cpp, and the planner at a range of bits per element (the profile must come from a
text other than these). Writes the rows as JSON (for `make plot-kv-planner`) and prints markdown.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TYPES = ["q8_0", "q5_1", "q5_0", "q4_1", "iq4_nl", "q4_0", "mxfp4"]
# llama.cpp's cache types among them (its -ctk/-ctv take no mxfp4).
PEER_TYPES = ["q8_0", "q5_1", "q5_0", "q4_1", "iq4_nl", "q4_0"]
# Bits per element of each type (block scales included), from ggml's block sizes.
BITS = {"f16": 16.0, "q8_0": 8.5, "q5_1": 6.0, "q5_0": 5.5, "q4_1": 5.0, "iq4_nl": 4.5, "q4_0": 4.5, "mxfp4": 4.25}
PLAN_BITS = [4.25, 4.5, 5.0, 5.5, 6.0, 7.0, 8.5]
# Fixed types with a recent window of f16 cells (--kv-recent), whose bits depend on the context.
WINDOWED = [("q4_0", 8), ("q4_0", 32), ("mxfp4", 32), ("q8_0", 8)]


def run(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return out


def f32_gguf(model, cache_dir):
    """The model with every tensor dequantized to f32, for llama.cpp (made once)."""
    path = os.path.join(cache_dir, os.path.basename(model).replace(".gguf", ".f32.gguf"))
    if os.path.exists(path):
        return path
    import numpy as np
    import gguf
    from gguf import quants

    reader = gguf.GGUFReader(model)
    writer = gguf.GGUFWriter(path, reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(name, field.contents(), kind, sub_type=field.types[1])
        else:
            writer.add_key_value(name, field.contents(), kind)
    for t in reader.tensors:
        writer.add_tensor(t.name, quants.dequantize(t.data, t.tensor_type).astype(np.float32), raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def ours(args, text, ctx, chunks, extra, kl=None, base=None):
    cmd = [args.bin, "perplexity", args.model, "--weights", "f32", "-f", text, "-c", str(ctx), "--chunks", str(chunks), "-t", "2", "--json", "-q", *extra]
    cmd += ["--kl", kl] if kl else ["--kl-base", base]
    return json.loads(run(cmd).stdout)


def peer(args, model_f32, text, ctx, chunks, t, base, make_base=False):
    cmd = [os.path.join(args.peer, "llama-perplexity"), "-m", model_f32, "-f", text, "-c", str(ctx), "--chunks", str(chunks),
           "-fa", "on", "-t", "2", "-ctk", t, "-ctv", t, "--kl-divergence-base", base]
    if not make_base:
        cmd.append("--kl-divergence")
    done = run(cmd)
    out = done.stdout + done.stderr
    if make_base:
        return None
    m = re.search(r"Mean\s+KLD:\s+([0-9.]+)", out)
    return float(m.group(1)) if m else None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(ROOT, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--profile", required=True)
    p.add_argument("--text", action="append", required=True, help="NAME=PATH")
    p.add_argument("--ctx", default="512,2048")
    p.add_argument("--tokens", type=int, default=4096, help="tokens evaluated per text and context (whole chunks)")
    p.add_argument("--tokens-long", type=int, default=2048, help="the same for contexts of 2048 and more")
    p.add_argument("--bin", default=os.path.join(ROOT, "target/release/ccsm-infer"))
    p.add_argument("--peer", default=os.path.expanduser("~/.cache/ccsm-peer/build/bin"))
    p.add_argument("--out", default="kv-planner-results.json")
    args = p.parse_args()
    cache_dir = os.path.expanduser("~/.cache/ccsm-kv-planner")
    os.makedirs(cache_dir, exist_ok=True)
    have_peer = os.path.exists(os.path.join(args.peer, "llama-perplexity"))
    model_f32 = f32_gguf(args.model, cache_dir) if have_peer else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.text:
            name, text = spec.split("=", 1)
            for ctx in [int(c) for c in args.ctx.split(",")]:
                chunks = max(1, (args.tokens_long if ctx >= 2048 else args.tokens) // ctx)
                # Fixed types' results and the references are kept between runs (keyed by the text and
                # the binary), so a run after a planner change re-measures only the plans.
                memo_path = os.path.join(cache_dir, "ours-kld.json")
                memo = json.load(open(memo_path)) if os.path.exists(memo_path) else {}
                stamp = f"{os.path.abspath(text)}|{os.path.getsize(text)}|{ctx}|{chunks}"
                base = os.path.join(cache_dir, f"ref-{name}-{ctx}-{chunks}-{os.path.getsize(text)}.kld")
                if f"{stamp}|ref" not in memo or not os.path.exists(base):
                    memo[f"{stamp}|ref"] = ours(args, text, ctx, chunks, ["--kv-quant", "f32"], base=base)["ppl"]["mean"]
                ref = {"ppl": {"mean": memo[f"{stamp}|ref"]}}
                row = lambda engine, layout, bits, kld, predicted=None: rows.append(
                    {"text": name, "ctx": ctx, "chunks": chunks, "engine": engine, "layout": layout, "bits": bits, "kld": kld, "predicted": predicted, "ppl_f32": ref["ppl"]["mean"]})
                for t in TYPES:
                    if f"{stamp}|{t}" not in memo:
                        memo[f"{stamp}|{t}"] = ours(args, text, ctx, chunks, ["--kv-quant", t], kl=base)["kl"]["kld"]["mean"]
                        json.dump(memo, open(memo_path, "w"), indent=1)
                    row("ccsm", t, BITS[t], memo[f"{stamp}|{t}"])
                    print(f"{name} ctx {ctx}: ccsm {t}: {memo[f'{stamp}|{t}']:.5f}", file=sys.stderr)
                for t, n in WINDOWED:
                    key = f"{stamp}|{t}+r{n}"
                    if key not in memo:
                        r = ours(args, text, ctx, chunks, ["--kv-quant", t, "--kv-recent", str(n)], kl=base)
                        memo[key] = [r["cache"]["bits_per_element"], r["kl"]["kld"]["mean"]]
                        json.dump(memo, open(memo_path, "w"), indent=1)
                    bits, kld = memo[key]
                    row("ccsm", f"{t} + f16×{n}", bits, kld)
                    print(f"{name} ctx {ctx}: ccsm {t} + {n} f16 cells ({bits:.3f} bits): {kld:.5f}", file=sys.stderr)
                for b in PLAN_BITS:
                    key = f"{stamp}|plan|{b}|{os.path.getsize(args.profile)}|{os.path.getmtime(args.bin)}"
                    if key not in memo:
                        r = ours(args, text, ctx, chunks, ["--kv-plan", "auto", "--kv-profile", args.profile, "--kv-bits", str(b)], kl=base)
                        # Bits over the cells asked for (a plan below the smallest layout keeps fewer).
                        bits = r["cache"]["bits_per_element"] * min(1.0, r["kv_plan"]["capacity"] / ctx)
                        spec = r["kv_plan"]["spec"] + (f" + f16×{r['kv_plan']['recent']}" if r["kv_plan"].get("recent") else "")
                        memo[key] = [spec, bits, r["kl"]["kld"]["mean"], r["kv_plan"]["predicted_kld"]]
                        json.dump(memo, open(memo_path, "w"), indent=1)
                    spec, bits, kld, predicted = memo[key]
                    row("ccsm plan", spec, bits, kld, predicted)
                    print(f"{name} ctx {ctx}: plan {b} bits: {kld:.5f} (predicted {predicted:.5f})", file=sys.stderr)
                if have_peer:
                    # llama.cpp's numbers depend on nothing of ours: kept between runs.
                    peer_path = os.path.join(cache_dir, "peer-kld.json")
                    peer_memo = json.load(open(peer_path)) if os.path.exists(peer_path) else {}
                    key = lambda t: f"{stamp}|{t}"
                    peer_base = os.path.join(tmp, f"peer-{name}-{ctx}.kld")
                    if any(key(t) not in peer_memo for t in PEER_TYPES):
                        peer(args, model_f32, text, ctx, chunks, "f32", peer_base, make_base=True)
                    for t in PEER_TYPES:
                        if key(t) not in peer_memo:
                            peer_memo[key(t)] = peer(args, model_f32, text, ctx, chunks, t, peer_base)
                            json.dump(peer_memo, open(peer_path, "w"), indent=1)
                        row("llama.cpp", t, BITS[t], peer_memo[key(t)])
                        print(f"{name} ctx {ctx}: llama.cpp {t}: {peer_memo[key(t)]}", file=sys.stderr)
                json.dump(rows, open(args.out, "w"), indent=1)
    print_table(rows)


def print_table(rows):
    """One row per layout (fixed types: ours and llama.cpp's; the planner per budget), one column pair
    per text and context."""
    groups = sorted({(r["text"], r["ctx"]) for r in rows}, key=lambda g: (g[1], g[0]))
    find = lambda engine, layout, g: next((r for r in rows if (r["text"], r["ctx"]) == g and r["engine"] == engine and r["layout"] == layout), None)
    fmt = lambda r: "-" if r is None or r["kld"] is None else f"{r['kld']:.5f}"
    head = " | ".join(f"{t} {c}: ccsm | llama.cpp" for t, c in groups)
    print(f"| layout | bits | {head} |")
    print("|---|---:|" + "---:|---:|" * len(groups))
    for t in TYPES:
        cells = " | ".join(f"{fmt(find('ccsm', t, g))} | {fmt(find('llama.cpp', t, g))}" for g in groups)
        print(f"| {t} | {BITS[t]:g} | {cells} |")
    for t, n in WINDOWED:
        cells = []
        for g in groups:
            r = find("ccsm", f"{t} + f16×{n}", g)
            cells += [f"{fmt(r)} ({r['bits']:.3f} bits)" if r else "-", ""]
        print(f"| {t} + {n} f16 cells | {BITS[t]:g} + {n} × 16 / ctx | " + " | ".join(cells) + " |")
    # The planner's rows come in PLAN_BITS order within each group.
    plans = {g: [r for r in rows if (r["text"], r["ctx"]) == g and r["engine"] == "ccsm plan"] for g in groups}
    for i, b in enumerate(PLAN_BITS):
        cells = []
        for g in groups:
            r = plans[g][i] if i < len(plans[g]) else None
            cells.append(f"{fmt(r)} ({r['bits']:.3f} bits, pred. {r['predicted']:.5f})" if r else "-")
            cells.append("")
        print(f"| planner at {b:g} bits | ≤ {b:g} | " + " | ".join(cells) + " |")
    print()
    for g in groups:
        for b, r in zip(PLAN_BITS, plans[g]):
            print(f"- {g[0]} ctx {g[1]}, planner at {b:g} bits: `{r['layout']}`")


if __name__ == "__main__":
    main()
