#!/usr/bin/env bash
# A runnable copy of this checkout in the compiled form (mypyc), as the wheel and the image ship it:
# builds the wheel with EXTPROC_COMPILE=1 and puts its extension modules beside a copy of the
# sources (extension modules take precedence over .py files of the same name). Run it with
# PYTHONPATH=<tree>. Usage: scripts/build-compiled-tree.sh TREE. Needs the venv from
# scripts/setup.sh and a C compiler.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
tree=${1:?usage: scripts/build-compiled-tree.sh TREE}
rm -rf "$tree" && mkdir -p "$tree/wheel"
tree=$(cd "$tree" && pwd)
tar --exclude=./.venv --exclude=./.git -cf - . | tar -xf - -C "$tree"
EXTPROC_COMPILE=1 .venv/bin/pip wheel --quiet --no-deps --wheel-dir "$tree/wheel" . 2>&1 | grep -v "warning:" || true
wheel=$(ls "$tree"/wheel/extproc-*.whl)
(cd "$tree" && "$root/.venv/bin/python" -m zipfile -e "$wheel" wheel/unpacked)
(cd "$tree/wheel/unpacked" && find . -name '*.so' -exec cp --parents {} "$tree" \;)
form=$(cd "$tree" && PYTHONPATH=$tree "$root/.venv/bin/python" -c "from extproc.compiled_form import form; print(form())")
[[ $form == mypyc ]] || { echo "the compiled form did not load (form: $form)" >&2; exit 1; }
echo "compiled form in $tree ($(cd "$tree" && ls extproc/*.so extproc/quota/*.so | wc -l) modules)"
