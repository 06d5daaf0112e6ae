#!/usr/bin/env bash
# The module map on the sources: include directions, protobuf headers, function lengths
# (tools/lint/check_layers.py; the map is in docs/architecture.md).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python3 "$root/tools/lint/check_layers.py" "$root" && echo "layers: ok"
