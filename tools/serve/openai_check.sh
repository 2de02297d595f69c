#!/usr/bin/env bash
# The official `openai` Python package against a live `weave serve` (the API, then structured
# outputs validated with `jsonschema`), then SIGTERM: the server must drain and exit 0. Used by
# CI; needs python3 and the reference model.
#
#   tools/serve/openai_check.sh [path/to/weave]   (default: target/debug/weave, built if missing)
set -euo pipefail
cd "$(dirname "$0")/../.."
WEAVE=${1:-target/debug/weave}
[ -x "$WEAVE" ] || cargo build -p weave -q
VENV=target/openai-venv
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -c "import openai, jsonschema" 2>/dev/null \
  || "$VENV/bin/pip" install -q --disable-pip-version-check openai jsonschema
PORT=${PORT:-18765}
LOG=$(mktemp)
"$WEAVE" serve --port "$PORT" --threads 2 --kv-cache-tokens 8192 >"$LOG" 2>&1 &
PID=$!
trap 'kill -9 $PID 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break
  kill -0 "$PID" 2>/dev/null || { cat "$LOG"; echo "weave serve died" >&2; exit 1; }
  sleep 0.1
done
"$VENV/bin/python" tools/serve/openai_client_check.py "http://127.0.0.1:$PORT/v1"
"$VENV/bin/python" tools/serve/structured_check.py "http://127.0.0.1:$PORT/v1"
kill -TERM "$PID"
STATUS=0
wait "$PID" || STATUS=$?
trap - EXIT
if [ "$STATUS" != 0 ]; then
  cat "$LOG"
  echo "weave serve exited $STATUS after SIGTERM (want 0)" >&2
  exit 1
fi
grep -q "weave serve: stopped" "$LOG"
echo "weave serve: drained and exited 0 on SIGTERM"
