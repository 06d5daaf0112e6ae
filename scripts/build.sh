#!/usr/bin/env bash
# Configures and builds one CMake tree with Ninja.
#   scripts/build.sh [build-dir] [extra cmake args...]     (default: build, Release, warnings as errors)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${1:-$root/build}"
shift || true
cmake -S "$root" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKRAKEN_WERROR=ON "$@" >/dev/null
ninja -C "$dir"
