#!/usr/bin/env bash
# The local stack: Envoy + extproc + one fake vLLM per backend, on 127.0.0.1:10000.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/extproc dev "$@"
