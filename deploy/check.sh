#!/usr/bin/env bash
# Validates the deployment recipe with schema validators from PyPI (installed into
# target/deploy-venv): the compose file against the Compose spec, the Kubernetes manifests
# against Kubernetes' own schemas (strict: unknown fields are errors), the InferencePool
# against deploy/schemas/inferencepool-v1.json. CI runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=target/deploy-venv
if [ ! -x "$VENV/bin/kubernetes-validate" ] || [ ! -x "$VENV/bin/check-jsonschema" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check check-jsonschema kubernetes-validate
fi
"$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml
"$VENV/bin/kubernetes-validate" --strict --quiet deploy/k8s/weave.yaml deploy/k8s/router.yaml
"$VENV/bin/check-jsonschema" --schemafile deploy/schemas/inferencepool-v1.json deploy/k8s/inference-pool.yaml
echo "deploy: compose, Kubernetes manifests and InferencePool valid"
