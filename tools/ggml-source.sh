#!/usr/bin/env bash
# Prints the ggml tree of the pinned llama-cpp-sys-2 package (fetching it through cargo if needed)
# and points vendor/ggml at it, so the exact sources we compile can be read.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fetch --locked --quiet
manifest=$(cargo metadata --format-version 1 --locked --offline --manifest-path crates/ggml-sys/Cargo.toml |
  python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="llama-cpp-sys-2"))')
tree="$(dirname "$manifest")/llama.cpp/ggml"
[ -f "$tree/include/ggml.h" ] || { echo "error: $tree is not a ggml tree" >&2; exit 1; }
mkdir -p vendor
ln -sfn "$tree" vendor/ggml
echo "$tree"
