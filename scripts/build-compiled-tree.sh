#!/usr/bin/env bash
# A runnable copy of this checkout in the compiled form (mypyc), as the wheel and the image ship it:
# copies the sources to TREE, builds the wheel there with EXTPROC_COMPILE=1 (in the copy, so two
# builds never share a build directory), and puts its extension modules beside the sources
# (extension modules take precedence over .py files of the same name). Run it with PYTHONPATH=TREE.
# Usage: scripts/build-compiled-tree.sh TREE (emptied first; outside the checkout, or under its
# .venv). Needs the venv from scripts/setup.sh (or EXTPROC_BUILD_PYTHON: the interpreter of another venv
# that will run the tree, so the extensions are built against its own headers) and a C compiler.
set -euo pipefail
target=${1:?usage: scripts/build-compiled-tree.sh TREE}
tree=$(realpath -m "$target")
cd "$(dirname "$0")/.."
root=$(pwd -P)
python=${EXTPROC_BUILD_PYTHON:-$root/.venv/bin/python}
case $tree/ in
  "$root"/.venv/*) ;;
  "$root"/*) echo "build-compiled-tree: $tree is inside the checkout (use a path under .venv or elsewhere)" >&2; exit 2 ;;
esac
mkdir -p "$tree" && find "$tree" -mindepth 1 -delete
tar --exclude=./.venv --exclude=./.git --exclude=./build -cf - . | tar -xf - -C "$tree"
mkdir -p "$tree/wheel"
status=0
EXTPROC_COMPILE=1 "$python" -m pip wheel --quiet --no-deps --wheel-dir "$tree/wheel" "$tree" \
  > "$tree/wheel/build.log" 2>&1 || status=$?
if [[ $status -ne 0 ]]; then
  grep -v "warning:" "$tree/wheel/build.log" >&2 || true
  echo "build-compiled-tree: building the compiled wheel failed ($status)" >&2
  exit "$status"
fi
wheel=$(ls "$tree"/wheel/extproc-*.whl)
(cd "$tree" && "$python" -m zipfile -e "$wheel" wheel/unpacked)
(cd "$tree/wheel/unpacked" && find . -name '*.so' -exec cp --parents {} "$tree" \;)
form=$(cd "$tree" && PYTHONPATH=$tree "$python" -c "from extproc.compiled_form import form; print(form())")
[[ $form == mypyc ]] || { echo "the compiled form did not load (form: $form)" >&2; exit 1; }
echo "compiled form in $tree ($(cd "$tree" && ls extproc/*.so extproc/quota/*.so | wc -l) modules)"
