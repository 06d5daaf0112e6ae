#!/usr/bin/env bash
# The main job: build, start kraken-server with the bundled Kraken 4-way model
# (models/kraken-kjv-4way) on two CPU worker processes, stream one completion to show it works,
# then keep serving (gRPC on 8001, OpenAI-compatible HTTP on 8000) until Ctrl-C / SIGTERM (which
# drains and exits 0).
#   KRAKEN_PORT, KRAKEN_DEVICES, KRAKEN_MODEL, ... (every server flag) are honoured;
#   extra arguments go to kraken-server;  KRAKEN_DEMO_ONLY=1 stops after the demo completion.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/build.sh" "$root/build"
export KRAKEN_MODEL="${KRAKEN_MODEL:-$root/models/kraken-kjv-4way}"
export KRAKEN_DEVICES="${KRAKEN_DEVICES:-cpu:2}"
export KRAKEN_PORT="${KRAKEN_PORT:-8001}"
export KRAKEN_HTTP_PORT="${KRAKEN_HTTP_PORT:-8000}"
demo_only="${KRAKEN_DEMO_ONLY:-0}"
unset KRAKEN_DEMO_ONLY  # this script's own switch, not a server flag (the server refuses those)
"$root/build/server/kraken-server" "$@" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server' INT TERM
cli=("$root/build/server/kraken-cli" --target "localhost:$KRAKEN_PORT")
for _ in $(seq 1 600); do  # until the server answers (it logs when it is ready)
  if "${cli[@]}" info >/dev/null 2>&1; then break; fi
  kill -0 $server 2>/dev/null || { wait $server; exit $?; }
  sleep 0.2
done
echo "---- streamed completion (kraken-cli generate --stream) ----"
"${cli[@]}" generate "And God said," --stream --max-tokens 64 --seed 1
echo
echo "---- the same over OpenAI-compatible HTTP (curl localhost:$KRAKEN_HTTP_PORT/v1/completions) ----"
curl -s "localhost:$KRAKEN_HTTP_PORT/v1/completions" -H 'Content-Type: application/json' \
  -d '{"prompt": "And God said,", "max_tokens": 32, "seed": 1}'
echo
echo "---- serving: gRPC on port $KRAKEN_PORT, HTTP on port $KRAKEN_HTTP_PORT; Ctrl-C to stop ----"
if [[ "$demo_only" == 1 ]]; then kill -TERM $server; fi
wait $server
