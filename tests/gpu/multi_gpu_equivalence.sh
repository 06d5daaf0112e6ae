#!/usr/bin/env bash
# Multi-GPU equivalence on a node with several GPUs (a DGX): the bundled models generate the same
# greedy text sharded over W GPUs (NCCL) as over W CPU workers (Gloo), for W = 1, 2, 4 (the world
# sizes both bundled models split into). Needs the CUDA build of tests/gpu/run_gpu_checks.sh.
#
#   tests/gpu/multi_gpu_equivalence.sh             # build-gpu/ from run_gpu_checks.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="${KRAKEN_GPU_BUILD:-$root/build-gpu}"
gen="$build/core/kraken-generate"
gpus="$(nvidia-smi -L | wc -l)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
status=0
for model in kraken-kjv-4way gpt2-kjv; do
  for w in 1 2 4; do
    if ((w > gpus)); then
      echo "$model W=$w: skipped ($gpus GPU(s))"
      continue
    fi
    args=(--prompt "And God said, Let there be light" --max-tokens 32 --ignore-eos --json)
    "$gen" "$root/models/$model" --devices "cpu:$w" "${args[@]}" >"$tmp/cpu.json"
    "$gen" "$root/models/$model" --devices "cuda:0-$((w - 1))" "${args[@]}" >"$tmp/cuda.json"
    python3 - "$model" "$w" "$tmp/cpu.json" "$tmp/cuda.json" <<'PY' || status=1
import json, sys
model, w = sys.argv[1], sys.argv[2]
cpu, gpu = (json.load(open(p)) for p in sys.argv[3:5])
a, b = cpu["generated_ids"], gpu["generated_ids"]
same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
exposed = [round(r["exposed_comm_s"] / max(r["busy_s"] + r["exposed_comm_s"], 1e-12), 3) for r in gpu["ranks"]]
print(f"{model} W={w}: identical greedy prefix {same}/{len(a)}; cuda prefill {gpu['prefill_ms']:.2f} ms, "
      f"decode {gpu['decode_tokens_per_second']:.0f} tok/s, exposed-communication share per rank {exposed}")
sys.exit(0 if same >= 4 else 1)
PY
  done
done
exit $status
