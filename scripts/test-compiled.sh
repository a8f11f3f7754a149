#!/usr/bin/env bash
# The test suite against the compiled form (mypyc), as the wheel and the image ship it: builds the
# wheel with EXTPROC_COMPILE=1, puts its extension modules beside a copy of the sources (extension
# modules take precedence over .py files of the same name), and runs pytest there. Arguments go to
# pytest. Needs the venv from scripts/setup.sh and a C compiler.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
tree=$root/.venv/compiled-tree
rm -rf "$tree" && mkdir -p "$tree/wheel"
tar --exclude=./.venv --exclude=./.git -cf - . | tar -xf - -C "$tree"
# The tests look for ../shared (the CRD schemas) beside the repository: beside the copy too.
if [[ -d $root/../shared ]]; then ln -sfn "$root/../shared" "$root/.venv/shared"; fi
EXTPROC_COMPILE=1 .venv/bin/pip wheel --quiet --no-deps --wheel-dir "$tree/wheel" . 2>&1 | grep -v "warning:" || true
wheel=$(ls "$tree"/wheel/extproc-*.whl)
(cd "$tree" && "$root/.venv/bin/python" -m zipfile -e "$wheel" wheel/unpacked)
(cd "$tree/wheel/unpacked" && find . -name '*.so' -exec cp --parents {} "$tree" \;)
cd "$tree"
form=$(PYTHONPATH=$tree "$root/.venv/bin/python" -c "from extproc.compiled_form import form; print(form())")
[[ $form == mypyc ]] || { echo "the compiled form did not load (form: $form)" >&2; exit 1; }
echo "testing the compiled form ($(ls extproc/*.so extproc/quota/*.so | wc -l) modules)"
PYTHONPATH=$tree EXTPROC_EXPECT_FORM=mypyc exec "$root/.venv/bin/python" -m pytest "$@"
