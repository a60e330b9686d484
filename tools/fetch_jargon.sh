#!/usr/bin/env bash
# The real text for perplexity: the Jargon File from Debian's jargon-text package, as data/jargon.txt
# (zcat'ed, leading spaces stripped from each line, the preparation targets.md describes).
set -euo pipefail
cd "$(dirname "$0")/.."
src=/usr/share/doc/jargon-text/jargon.txt.gz
if [ ! -f "$src" ]; then
  echo "installing Debian's jargon-text" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq jargon-text >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq jargon-text >/dev/null; }
fi
mkdir -p data
zcat "$src" | sed 's/^ *//' > data/jargon.txt.partial
mv data/jargon.txt.partial data/jargon.txt
