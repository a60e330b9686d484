#!/usr/bin/env bash
# The standard measurements on SmolLM2 (2 threads): speed per cache type and depth (side by side with
# llama.cpp's llama-bench, interleaved, when it is built: ../shared/peer/build_peer.sh, or PEER_BIN), and
# perplexity / KL divergence on the Jargon File per cache type against an F32-cache reference. Writes raw
# results to docs/data/ and the report to docs/benchmarks.md. PEER_RESULTS=FILE reuses an interleaved run
# made before (compare_bench.sh's OUT) instead of running llama-bench again.
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
# The machine the numbers come from (the CPU model and what ggml and our kernels run on it).
{ grep -m1 "model name" /proc/cpuinfo | sed 's/.*: //'; "$BIN" system; } > "$out/system.txt"

echo "speed: $TYPES at depths 0 and 2048" >&2
"$BIN" bench "$MODEL" --kv-quant "$TYPES" -d 0,2048 -p 512 -n 128 -r 3 -t 2 -o jsonl > "$out/bench.jsonl"

COMPARE=${COMPARE:-../shared/peer/compare_bench.sh}
PEER_BIN=${PEER_BIN:-$HOME/.cache/ccsm-peer/build/bin}
if [ -n "${PEER_RESULTS:-}" ]; then
  # An interleaved run already made (compare_bench.sh with OUT=...), e.g. to rerun only the rest.
  echo "speed beside llama.cpp: reusing $PEER_RESULTS" >&2
  [ "$PEER_RESULTS" -ef "$out/peer-compare.jsonl" ] || cp "$PEER_RESULTS" "$out/peer-compare.jsonl"
elif [ -x "$COMPARE" ] && [ -x "$PEER_BIN/llama-bench" ]; then
  echo "speed beside llama.cpp ($PEER_BIN): f16,q8_0,q4_0,q4_1 at depths 0, 2048, 4096 (interleaved, about 40 minutes)" >&2
  rm -f "$out/peer-compare.jsonl"
  OUT="$out/peer-compare.jsonl" PEER_BIN="$PEER_BIN" CCSM="$BIN" "$COMPARE" "$MODEL" f16,q8_0,q4_0,q4_1 0,2048,4096 3 >&2
else
  echo "no llama-bench in $PEER_BIN (or no $COMPARE): the report will say how to build it" >&2
  rm -f "$out/peer-compare.jsonl"
fi

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
