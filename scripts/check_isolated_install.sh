#!/usr/bin/env bash
# Plain `pip install .`, with pip's build isolation on, must compile lfr_ext for the torch that
# will import it: the in-tree backend (_build/backend.py) pins the throwaway build environment's
# torch to the version in the target environment. This checks it the way a user meets it:
#
#   1. a scratch virtual environment in a temporary directory;
#   2. the runtime torch first (TORCH_SPEC, default torch==2.13.0, as scripts/install.sh);
#   3. `pip install <a clean copy of the working tree>` (no --no-build-isolation);
#   4. `python -m lfr_ext.info`, run outside the tree: the compiled library must be loaded from
#      the scratch environment, and built against the torch running there.
#
#   TORCH_SPEC  the runtime torch (default torch==2.13.0)
#   PYTHON      the interpreter that creates the environment (default python3)
#
# Exit status 0 with "check_isolated_install: OK" on success.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}
unset PIP_NO_BUILD_ISOLATION  # the point is the isolated build

WORK=$(mktemp -d /tmp/lfr_ext_isolated_install.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
# Tracked and untracked-but-not-ignored files: the working tree as it is, without build outputs
# (no lfr_ext/_C*.so, build_info.json or build/ from an earlier in-place build).
# shellcheck source=scripts/copy_tree.sh
. scripts/copy_tree.sh
lfr_ext_copy_tree "$WORK/src"

start=$(date +%s)
"$PYTHON" -m venv "$WORK/venv"
PY=$WORK/venv/bin/python
PIP=("$PY" -m pip install --disable-pip-version-check)
"${PIP[@]}" -q "$TORCH_SPEC"
echo "check_isolated_install: runtime torch $("$PY" -c 'from importlib.metadata import version; print(version("torch"))') in $WORK/venv"
"${PIP[@]}" "$WORK/src" >"$WORK/pip.log" 2>&1 || { tail -50 "$WORK/pip.log" >&2; exit 1; }
echo "check_isolated_install: pip install . (isolated build) done, $(( $(date +%s) - start )) s in all"

cd "$WORK"  # outside the tree: the installed package, not the source copy, is imported
"$PY" -m lfr_ext.info | tee "$WORK/info.txt"
"$PY" - "$WORK/info.txt" <<'PY'
import os
import sys
import sysconfig

import torch

lines = open(sys.argv[1]).read().splitlines()


def field(prefix):
    found = [line[len(prefix):] for line in lines if line.startswith(prefix)]
    assert len(found) == 1, f"lfr_ext.info printed no single line starting {prefix!r}"
    return found[0]


site = os.path.realpath(sysconfig.get_paths()["platlib"])
library = field("compiled library: ")
assert library.startswith("loaded from "), f"compiled library not loaded: {library}"
path = os.path.realpath(library.removeprefix("loaded from "))
assert path.startswith(os.path.join(site, "lfr_ext", "_C")), f"library {path} is not the one installed in {site}"
assert field("torch running: ").split()[0] == torch.__version__
built = field("torch built against: ").split()[0]
assert built == torch.__version__, f"library built against torch {built}, running {torch.__version__}"
print(f"library loaded from the scratch environment, built against the running torch {built}")
PY
echo "check_isolated_install: OK"
