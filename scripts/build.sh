#!/usr/bin/env bash
# Configures and builds one CMake tree with Ninja.
#   scripts/build.sh [build-dir] [extra cmake args...] [-- targets...]
# (default: build, Release, warnings as errors, every target).
#
# Compilations go through ccache when it is installed (scripts/setup.sh installs it). Paths are
# rewritten relative to the checkout (base_dir), so the same source compiled with the same flags in
# another build tree (build, build-cuda) is compiled once. The namespace is a hash of what
# -march=native means on this CPU: a cache copied to another machine cannot hand it code built for
# instructions it lacks.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${1:-$root/build}"
shift || true
cmake_args=()
while (($#)) && [[ "$1" != "--" ]]; do cmake_args+=("$1"); shift; done
(($#)) && shift  # the "--"
targets=("$@")

launcher=()
if command -v ccache >/dev/null; then
  native="$(gcc -march=native -Q --help=target 2>/dev/null | sha256sum | cut -c1-16)"
  via="env;CCACHE_BASEDIR=$root;CCACHE_NAMESPACE=march-$native;ccache"
  launcher=(-DCMAKE_C_COMPILER_LAUNCHER="$via" -DCMAKE_CXX_COMPILER_LAUNCHER="$via"
            -DCMAKE_CUDA_COMPILER_LAUNCHER="$via")
fi
cmake -S "$root" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKRAKEN_WERROR=ON "${launcher[@]}" \
  "${cmake_args[@]}" >/dev/null
ninja -C "$dir" "${targets[@]}"
