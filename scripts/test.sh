#!/usr/bin/env bash
# Lint, type-check and run every test (unit, real Envoy, real Redis).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --system
.venv/bin/ruff check extproc tests
.venv/bin/mypy extproc
exec .venv/bin/python -m pytest "$@"
