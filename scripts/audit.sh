#!/usr/bin/env bash
# pip-audit of both lock files: every pinned release against the PyPI advisory data (which carries
# the PyPA advisory database's entries, as OSV does). Run by .ci/run after the tests.
#
# The audit needs PyPI's per-release JSON API (https://pypi.org/pypi/NAME/VERSION/json). Where that
# cannot be reached (a network that offers only the package index), it says so and exits 0, unless
# EXTPROC_REQUIRE_AUDIT=1, which makes an audit that could not run a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=.venv/tools/audit
probe=https://pypi.org/pypi/idna/3.10/json
if ! python3 - "$probe" <<'PY'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=10) as reply:
        sys.exit(0 if reply.status == 200 else 1)
except Exception:
    sys.exit(1)
PY
then
    echo "pip-audit NOT RUN: PyPI's per-release JSON API ($probe) is unreachable from here, so no" \
         "vulnerability data can be read. Run scripts/audit.sh where it is."
    [[ "${EXTPROC_REQUIRE_AUDIT:-0}" == 1 ]] && exit 1
    exit 0
fi
if [[ ! -x $tools/bin/pip-audit ]]; then
    python3 -m venv "$tools"
    "$tools/bin/pip" install -q pip-audit==2.10.1
fi
for lock in requirements/runtime.txt requirements/dev.txt; do
    echo "pip-audit: $lock"
    "$tools/bin/pip-audit" --strict --vulnerability-service pypi --require-hashes --disable-pip --progress-spinner off -r "$lock"
done
