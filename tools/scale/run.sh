#!/usr/bin/env bash
# Three `weave serve` replicas of the reference model behind vLLM's router (installed from
# PyPI into target/scale-venv), on 127.0.0.1 only: per-policy prefix-cache hit rate, TTFT and
# throughput, /metrics latency under load, failover (SIGKILL + restart) and drain (SIGTERM).
# See tools/scale/scale_test.py; the table goes into docs/SCALING.md.
#
#   tools/scale/run.sh [--quick] [--out DIR] [other scale_test.py flags]
#   WEAVE=target/debug/weave tools/scale/run.sh --quick      (CI)
set -euo pipefail
cd "$(dirname "$0")/../.."
WEAVE=${WEAVE:-target/release/weave}
if [ ! -x "$WEAVE" ]; then
  cargo build --release -p weave -q
  WEAVE=target/release/weave
fi
VENV=target/scale-venv
if [ ! -x "$VENV/bin/vllm-router" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check vllm-router
fi
exec python3 tools/scale/scale_test.py --weave "$WEAVE" --router "$VENV/bin/vllm-router" "$@"
