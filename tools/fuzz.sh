#!/usr/bin/env bash
# Runs one cargo-fuzz target for a while and keeps what it found.
#
#   tools/fuzz.sh model_loader|batch_line|audio_reader [SECONDS] [extra libFuzzer flags...]
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Seeds: the micro sample
# models (generated) for model_loader, fuzz/seeds/batch_line for batch_line, the audio fixtures
# (tools/reference/fixtures/audio) for audio_reader. The corpus grows in
# fuzz/corpus/TARGET (git-ignored); crashes land in fuzz/artifacts/TARGET: minimise them with
# `cargo +nightly fuzz tmin`, then copy them to fuzz/regressions/TARGET/, where `make test` replays them.
# SANITIZER=address runs under ASan (about 5x slower); the default, none, still catches every panic
# and every ggml abort, and ccsm's Rust is safe code.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
target=${1:?usage: tools/fuzz.sh model_loader|batch_line|audio_reader [SECONDS] [libFuzzer flags...]}
seconds=${2:-600}
shift $(( $# >= 2 ? 2 : 1 ))
case "$target" in
  model_loader) dict=dicts/gguf.dict; max_len=65536 ;;
  batch_line) dict=dicts/batch_line.dict; max_len=4096 ;;
  audio_reader) dict=; max_len=131072 ;;
  *) echo "unknown target $target (model_loader, batch_line, audio_reader)" >&2; exit 2 ;;
esac
corpus=corpus/$target
mkdir -p "$corpus"
if [ -z "$(ls -A "$corpus")" ]; then
  case "$target" in
    model_loader) python3 ../tools/make_samples.py "$corpus" --fuzz-seeds ;;
    batch_line) cp seeds/batch_line/* "$corpus/" ;;
    audio_reader) cp ../tools/reference/fixtures/audio/tone-* "$corpus/" && rm -f "$corpus"/*.ref.f32 ;;
  esac
fi
[ "$target" = batch_line ] && [ ! -f ../models/tiny-csm.gguf ] && make -C .. models
exec cargo +nightly fuzz run -O -s "${SANITIZER:-none}" "$target" "$corpus" -- \
  ${dict:+-dict="$dict"} -max_len="$max_len" -max_total_time="$seconds" -print_final_stats=1 -print_pcs=0 "$@"
