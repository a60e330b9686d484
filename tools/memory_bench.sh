#!/usr/bin/env bash
# The memory optimizer on SmolLM2: 2048-token chunks of the Jargon File under budgets of about 50 %,
# 25 % and 10 % of the f32 cache (90 MiB at 2048 cells), per prune policy, against an unconstrained
# f32 run. Writes docs/data/memory.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/ccsm-infer}
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
CHUNKS=${CHUNKS:-2}
out=docs/data
mkdir -p "$out"
base=$(mktemp)
trap 'rm -f "$base"' EXIT
"$BIN" perplexity "$MODEL" -f data/jargon.txt -c 2048 --chunks "$CHUNKS" -t 2 --kl-base "$base" --json -q > "$out/memory-base.json"
: > "$out/memory.jsonl"
for mb in 45 23 9; do
  for policy in sink-recent attention; do
    echo "budget $mb MiB, $policy" >&2
    "$BIN" perplexity "$MODEL" -f data/jargon.txt -c 2048 --chunks "$CHUNKS" -t 2 --kv-quant f32 \
      --max-memory-mb "$mb" --prune-policy "$policy" --kl "$base" --json -q | \
      python3 -c "import json,sys; d=json.load(sys.stdin); d['budget_mb']=$mb; d['policy']='$policy'; print(json.dumps(d))" >> "$out/memory.jsonl"
  done
done
