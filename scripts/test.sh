#!/usr/bin/env bash
# Lint, type-check and run every test (unit, real Envoy, real Redis).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --system
.venv/bin/ruff check extproc devtools tests observability
.venv/bin/mypy extproc devtools/extproc_dev
exec .venv/bin/python -m pytest "$@"
