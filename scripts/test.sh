#!/usr/bin/env bash
# Builds and runs every test that runs without a GPU:
#   0. clang-format and the module layering (scripts/check_layers.sh)
#   1. Release build, warnings as errors; ctest (all labels but gpu), then the engine's tests again
#      on the AVX2 kernel level (KRAKEN_CPU_ISA=avx2) and the opt-in BF16-product levels (amx, avx512bf16)
#   2. Python tests (PyTorch reference vs engine, converter, Hugging Face GPT-2)
#   3. the golden files regenerate identically from the reference
#   4. AddressSanitizer + UndefinedBehaviorSanitizer build; unit and model tests under it
#   5. KRAKEN_ENABLE_CUDA=ON build of the server, tools and CUDA tests for sm_80 and sm_90 (when the CUDA toolkit is
#      installed); without a GPU only the no-device tests run, the gpu-labelled ones skip (they run
#      on a GPU machine through tests/gpu/run_gpu_checks.sh)
#   6. libFuzzer runs of the safetensors parser, the tokenizer and the three request readers (OpenAI
#      bodies, KServe and kraken.v1 messages) over their kept corpora
# ctest runs serially (-j1): each test process uses every core through OpenMP, and two of them
# spinning on two cores slow each other down a hundredfold.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$root/.venv/bin/python"
# Each step prints the seconds the one before it took, so a slow CI run names its slow step.
step_start=$SECONDS
step() {
  if [[ -n "${step_name:-}" ]]; then printf '(%s: %d s)\n' "$step_name" $((SECONDS - step_start)); fi
  step_name="$*"; step_start=$SECONDS
  printf '\n==== %s ====\n' "$*"
}

step "format (clang-format, .clang-format) and layering"
# Every C++ and CUDA source as clang-format writes it; a diff names the file.
(cd "$root" && git ls-files '*.cc' '*.h' '*.cu' | xargs clang-format --dry-run --Werror)
"$root/scripts/check_layers.sh"

step "build (Release, -Werror)"
"$root/scripts/build.sh" "$root/build"
step "ctest -LE gpu"
(cd "$root/build" && ctest -j1 -LE gpu --output-on-failure)

step "engine tests on the lower kernel level (KRAKEN_CPU_ISA=avx2)"
# The run above used the best level this CPU has (AVX-512 on a Xeon); this one forces AVX2, so a
# CPU with both tests both. On an AVX2-only CPU it repeats the same level.
for t in engine_unit_tests engine_model_tests engine_allocation_tests; do
  KRAKEN_SOURCE_DIR="$root" KRAKEN_CPU_ISA=avx2 "$root/build/tests/engine/$t" --gtest_brief=1 | tail -n 2
done

# The opt-in levels with BF16 products: BF16-weight GEMMs on AMX-BF16 tiles (amx) or with
# VDPBF16PS (avx512bf16), BF16-rounded activations either way: the invariances hold bit for bit,
# the reference within its own tolerance. KRAKEN_CPU_ISA=amx on a CPU without AMX runs the best
# level below (avx512bf16 on Zen 4/5), so avx512bf16 gets its own run only where amx ran.
bf16_levels=(amx)
grep -qw amx_tile /proc/cpuinfo 2>/dev/null && bf16_levels+=(avx512bf16)
for level in "${bf16_levels[@]}"; do
  step "engine tests on the opt-in level KRAKEN_CPU_ISA=$level"
  for t in engine_unit_tests engine_model_tests engine_allocation_tests; do
    KRAKEN_SOURCE_DIR="$root" KRAKEN_CPU_ISA=$level "$root/build/tests/engine/$t" --gtest_brief=1 | tail -n 2
  done
done

step "Python tests"
# The two starvation tests (one server, and a follower node, under a CPU quota) serve steady
# traffic this long each; a run by hand may set more.
KRAKEN_BUILD_DIR="$root/build" KRAKEN_STARVATION_SECONDS="${KRAKEN_STARVATION_SECONDS:-150}" \
  "$py" -m pytest -q "$root/tools/tests"

step "golden files and the test tokenizer regenerate identically"
"$py" "$root/tools/make_test_models.py" --check
"$py" "$root/tools/train_test_tokenizer.py" --check

step "AddressSanitizer + UndefinedBehaviorSanitizer"
"$root/scripts/build.sh" "$root/build-asan" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKRAKEN_SANITIZE=address,undefined \
  -DKRAKEN_BUILD_BENCH=OFF -- tests-unit tests-model
(cd "$root/build-asan" && ASAN_OPTIONS=detect_leaks=1 ctest -j1 -L 'unit|model' --output-on-failure)

step "CUDA build (KRAKEN_ENABLE_CUDA=ON, sm_80 + sm_90): compile and link the server, tools and CUDA tests"
if [[ -x /usr/local/cuda/bin/nvcc && -f /usr/local/cuda/include/nccl.h ]]; then
  # Every program a GPU deployment runs, and every test that reaches CUDA code (the CPU-only test
  # suites were built and run above; rebuilding them here would only repeat that). Sources that do
  # not see CUDA compile to the objects of the build above, which ccache hands back.
  targets=(kraken-server kraken-cli kraken-generate gpu_bench ttft_bench runtime_tests engine_model_tests
           cuda_backend_test cuda_no_device_test cuda_kernels_emulated_test nccl_test nccl_no_device_test)
  mkdir -p "$root/build-cuda"  # for the log below, before the configure creates it
  "$root/scripts/build.sh" "$root/build-cuda" -DKRAKEN_ENABLE_CUDA=ON -DKRAKEN_BUILD_BENCH=ON \
    -DCUDAToolkit_ROOT=/usr/local/cuda -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc \
    -DCMAKE_CUDA_ARCHITECTURES="80;90" -- "${targets[@]}" >"$root/build-cuda/ninja.log" 2>&1 ||
    { tail -n 60 "$root/build-cuda/ninja.log"; exit 1; }
  tail -n 1 "$root/build-cuda/ninja.log"
  # Without a GPU the gpu-labelled tests skip; the no-device tests check the errors users get.
  (cd "$root/build-cuda" && ctest -j1 -R '^(Nccl|Cuda)' --output-on-failure | tail -n 4)
else
  echo "no CUDA toolkit under /usr/local/cuda: skipped"
fi

step "libFuzzer: safetensors parser, tokenizer, and the request readers a stranger reaches"
"$root/scripts/build.sh" "$root/build-fuzz" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_C_COMPILER=clang \
  -DKRAKEN_BUILD_FUZZERS=ON -DKRAKEN_BUILD_TESTS=OFF -DKRAKEN_BUILD_BENCH=OFF -DKRAKEN_BUILD_SERVER=OFF \
  -- safetensors_fuzzer tokenizer_fuzzer openai_request_fuzzer kserve_request_fuzzer generate_request_fuzzer
fuzz() {  # fuzz <binary> <kept corpus> <max_len> [dictionary]: new inputs go to a scratch copy
  local corpus
  corpus="$(mktemp -d)"
  cp "$2"/* "$corpus/"
  "$1" -max_total_time="${KRAKEN_FUZZ_SECONDS:-30}" -max_len="$3" ${4:+-dict="$4"} "$corpus" "$2" 2>&1 | tail -n 2
  rm -rf "$corpus"
}
fuzz "$root/build-fuzz/engine/safetensors_fuzzer" "$root/engine/fuzz/corpus/safetensors" 4096
export KRAKEN_FUZZ_TOKENIZER="$root/tests/data/tokenizers/mixed-4k/tokenizer.json"
fuzz "$root/build-fuzz/tokenizer/tokenizer_fuzzer" "$root/tokenizer/fuzz/corpus/encode" 512
# Request bodies up to 64 KiB: room for nesting far past the depth limit.
fuzz "$root/build-fuzz/openai/openai_request_fuzzer" "$root/openai/fuzz/corpus/completions" 65536 \
  "$root/openai/fuzz/json.dict"
fuzz "$root/build-fuzz/server/kserve_request_fuzzer" "$root/server/fuzz/corpus/kserve" 65536 \
  "$root/openai/fuzz/json.dict"
fuzz "$root/build-fuzz/server/generate_request_fuzzer" "$root/server/fuzz/corpus/generate" 4096
step "all tests passed"
