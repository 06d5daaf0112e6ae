#!/usr/bin/env bash
# The main job, until the gRPC server exists: build, then generate text with the bundled Kraken
# 4-way model (models/kraken-kjv-4way) on two worker processes, printing the text, the prefill
# and decode timings and each rank's busy and collective-wait time. Extra arguments go to
# kraken-generate (e.g. --prompt "...", --devices cpu:4, --temperature 0).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/build.sh" "$root/build"
model="${KRAKEN_MODEL:-$root/models/kraken-kjv-4way}"
exec "$root/build/engine/kraken-generate" "$model" --prompt "And God said," --max-tokens 64 \
  --temperature 0.8 --top-p 0.95 --seed 1 --devices cpu:2 "$@"
