#!/usr/bin/env bash
# The main job, until the gRPC server exists: build and run the offline generator.
# Generates 32 tokens greedily with the Kraken 4-way test model (random weights, tests/data)
# and prints the ids and the prefill and decode timings. Extra arguments go to kraken-generate.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/build.sh" "$root/build"
model="${KRAKEN_MODEL:-$root/tests/data/models/kraken-n4-bf16}"
exec "$root/build/engine/kraken-generate" "$model" --prompt-ids 17,42,99,3,250,8 --max-tokens 32 "$@"
