#!/usr/bin/env bash
# The test suite against the compiled form (mypyc), as the wheel and the image ship it: builds it
# with scripts/build-compiled-tree.sh and runs pytest there. Arguments go to pytest. Needs the venv
# from scripts/setup.sh and a C compiler.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
tree=$root/.venv/compiled-tree
# The tests look for ../shared (the CRD schemas) beside the repository: beside the copy too.
if [[ -d $root/../shared ]]; then ln -sfn "$root/../shared" "$root/.venv/shared"; fi
scripts/build-compiled-tree.sh "$tree"
cd "$tree"
echo "testing the compiled form"
PYTHONPATH=$tree EXTPROC_EXPECT_FORM=mypyc exec "$root/.venv/bin/python" -m pytest "$@"
