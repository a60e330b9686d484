#!/usr/bin/env bash
# The standard measurements on SmolLM2 (2 threads): speed per cache type and depth, and perplexity /
# KL divergence on the Jargon File per cache type against an F32-cache reference. Writes raw results
# to docs/data/ and the report to docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/ccsm-infer}
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
TEXT=data/jargon.txt
TYPES=${TYPES:-f32,f16,q8_0,q4_1,q4_0}
CHUNKS=${CHUNKS:-32}  # 16,384 tokens, as in targets.md
CTX=${CTX:-512}
out=docs/data
mkdir -p "$out"

echo "speed: $TYPES at depths 0 and 2048" >&2
"$BIN" bench "$MODEL" --kv-quant "$TYPES" -d 0,2048 -p 512 -n 128 -r 3 -t 2 -o jsonl > "$out/bench.jsonl"

echo "perplexity: F32-cache reference, $CHUNKS chunks of $CTX" >&2
"$BIN" perplexity "$MODEL" -f "$TEXT" -c "$CTX" --chunks "$CHUNKS" -t 2 --kl-base "$out/kl-base-f32.kld" --json > "$out/ppl-f32.json"
: > "$out/kld.jsonl"
for pair in ${PAIRS:-f16/f16 q8_0/q8_0 q4_1/q4_1 q4_0/q4_0 q8_0/q4_0}; do
  k=${pair%/*} v=${pair#*/}
  echo "perplexity: K $k V $v" >&2
  "$BIN" perplexity "$MODEL" -f "$TEXT" -c "$CTX" --chunks "$CHUNKS" -t 2 --ctk "$k" --ctv "$v" --kl "$out/kl-base-f32.kld" --json -q >> "$out/kld.jsonl"
done
rm -f "$out/kl-base-f32.kld"
python3 tools/bench_report.py "$out" > docs/benchmarks.md
echo "wrote docs/benchmarks.md" >&2
