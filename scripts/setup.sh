#!/usr/bin/env bash
# Installs every dependency of Kraken Serve on a fresh Debian 12 machine: the Debian packages the
# C++ build and tests need, and the project's Python virtual environment (.venv) from the pinned
# requirements.txt. Idempotent: a second run checks and returns in seconds.
#
# Usage: scripts/setup.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Why each package: see README.md "Dependencies".
debian_packages=(
  build-essential cmake ninja-build ccache pkg-config clang clang-format libclang-rt-14-dev
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler grpc-proto libabsl-dev
  libspdlog-dev libfmt-dev libboost1.81-dev libssl-dev libgloo-dev
  libdnnl-dev ocl-icd-opencl-dev
  nlohmann-json3-dev libcli11-dev libpcre2-dev libgtest-dev googletest libbenchmark-dev
  prometheus bible-kjv bible-kjv-text openssl curl yamllint qemu-user
  # perf_analyzer (from the tritonclient wheel in .venv-clients) links libb64.so.0d.
  libb64-0d
)

missing=()
for p in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  echo "setup: installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "setup: Debian packages present"
fi

# One project virtual environment, rebuilt only when requirements.txt changes.
venv="$root/.venv"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$root/requirements.txt" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: creating Python environment in .venv (PyTorch wheels are large; a few minutes)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -r "$root/requirements.txt"
  echo "$want" > "$stamp"
else
  echo "setup: Python environment up to date"
fi

# The field's clients (tritonclient, aiperf) in their own environment: their pins clash with ours.
clients="$root/.venv-clients"
clients_stamp="$clients/.requirements.sha256"
clients_want="$(sha256sum "$root/requirements-clients.txt" | cut -d' ' -f1)"
if [ ! -x "$clients/bin/python" ] || [ "$(cat "$clients_stamp" 2>/dev/null)" != "$clients_want" ]; then
  echo "setup: creating the clients' environment in .venv-clients (a minute or two)"
  # --clear: a changed pin set starts from nothing (a downgrade leaves no strays).
  python3 -m venv --clear "$clients"
  "$clients/bin/pip" install -q --upgrade pip
  "$clients/bin/pip" install -q -r "$root/requirements-clients.txt"
  echo "$clients_want" > "$clients_stamp"
else
  echo "setup: clients' environment up to date"
fi
