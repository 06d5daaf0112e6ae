#!/usr/bin/env bash
# The GPU checks, on a machine with at least one CUDA GPU (about 4-6 minutes on one H100/H200):
#   1. build the CUDA configuration (engine, runtime, tests, gpu_bench; no gRPC server) for this
#      machine's GPU only (CMAKE_CUDA_ARCHITECTURES=native, or KRAKEN_CUDA_ARCHS)
#   2. the kernel harness: every CUDA op against the CPU backend; the CUDA engine against the
#      golden files (prefill, chunked, decode); W = 1 through NCCL (ctest -L gpu)
#   3. end to end through a worker process: kraken-generate --devices cuda:0 against cpu:1 on the
#      bundled model (same greedy tokens), with the rank's CUDA-event collective timing
#   4. gpu_bench: TTFT, decode tokens/s and the prefill GEMMs' share of the BF16 peak
# Prerequisite: the build dependencies of scripts/setup.sh (Debian packages); the Python
# environment is not needed. Figures and logs go to $OUT (or build-gpu/checks).
#
#   tests/gpu/run_gpu_checks.sh                    # everything
#   KRAKEN_GPU_BENCH_ARGS="--layers 24" tests/gpu/run_gpu_checks.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="${KRAKEN_GPU_BUILD:-$root/build-gpu}"
out="${OUT:-$build/checks}"
mkdir -p "$out"
step() { printf '\n==== %s ====\n' "$*"; }
start=$(date +%s)

step "GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

step "build (KRAKEN_ENABLE_CUDA=ON)"
nvcc="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKRAKEN_ENABLE_CUDA=ON \
  -DCMAKE_CUDA_COMPILER="$nvcc" -DCMAKE_CUDA_ARCHITECTURES="${KRAKEN_CUDA_ARCHS:-native}" \
  -DKRAKEN_BUILD_SERVER=OFF -DKRAKEN_BUILD_BENCH=ON -DKRAKEN_WERROR=ON >"$out/configure.log" 2>&1 ||
  { cat "$out/configure.log"; echo "configure failed: are scripts/setup.sh's Debian packages installed?"; exit 1; }
ninja -C "$build" cuda_backend_test cuda_no_device_test nccl_test nccl_no_device_test gpu_bench kraken-generate \
  2>&1 | tail -n 3
echo "build: $(($(date +%s) - start)) s"

step "kernel harness, engine vs golden files, W = 1 through NCCL (ctest -L gpu)"
(cd "$build" && ctest -j1 -L gpu --output-on-failure 2>&1 | tee "$out/ctest-gpu.log" | grep -E "tests passed|Failed|\*\*\*|cuda vs reference")
if grep -q "Skipped" "$out/ctest-gpu.log"; then
  echo "a gpu test was skipped: no usable CUDA device?"
  exit 1
fi

step "end to end on a worker process: cuda:0 against cpu:1 (greedy, bundled model)"
model="$root/models/kraken-kjv-4way"
args=(--prompt "In the beginning God created" --max-tokens 24 --ignore-eos --json)
"$build/core/kraken-generate" "$model" --devices cpu:1 "${args[@]}" >"$out/generate-cpu.json"
"$build/core/kraken-generate" "$model" --devices cuda:0 "${args[@]}" >"$out/generate-cuda.json"
python3 - "$out/generate-cpu.json" "$out/generate-cuda.json" <<'PY'
import json, sys
cpu, gpu = (json.load(open(p)) for p in sys.argv[1:3])
a, b = cpu["generated_ids"], gpu["generated_ids"]
same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
print(f"cpu : {cpu.get('text', '')!r}\ncuda: {gpu.get('text', '')!r}")
print(f"identical greedy prefix: {same} of {len(a)} tokens; prefill {cpu['prefill_ms']:.2f} ms (cpu) vs "
      f"{gpu['prefill_ms']:.2f} ms (cuda); decode {gpu['decode_tokens_per_second']:.0f} tok/s (cuda)")
print("cuda rank stats:", gpu["ranks"])
# 16-bit GEMM inputs on the GPU may flip a near-tie late in the text; the first tokens must agree.
sys.exit(0 if same >= 4 else 1)
PY

step "single-GPU prefill and decode benchmark"
# shellcheck disable=SC2086
"$build/bench/gpu_bench" ${KRAKEN_GPU_BENCH_ARGS:-} 2>&1 | tee "$out/gpu_bench.txt"
echo
echo "all GPU checks passed in $(($(date +%s) - start)) s; logs in $out"
