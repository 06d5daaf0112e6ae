#!/usr/bin/env bash
# Reproduces the bundled models from scratch (about an hour on 2 cores):
#   tools/train/train_all.sh            # data -> build/train-data, models -> models/
# Each step's output and timing is kept in build/train-data/*.log.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="$root/.venv/bin/python"
data="$root/build/train-data"
"$py" "$root/tools/train/prepare_data.py" --out "$data"
for arch in kraken gpt2; do
  out="$root/models/$([ "$arch" = kraken ] && echo kraken-kjv-4way || echo gpt2-kjv)"
  /usr/bin/time -v "$py" "$root/tools/train/train.py" --arch "$arch" --data "$data" --out "$out" \
    2>&1 | tee "$data/train-$arch.log"
done
