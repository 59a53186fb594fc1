#!/usr/bin/env bash
# One-time set-up on a fresh machine: the real data, a virtual environment in .venv with
# PyTorch, and lfr_ext compiled against that PyTorch (ninja, C++ always, CUDA when possible).
#
#   TORCH_SPEC    what to install as torch (default torch==2.13.0; e.g. "torch==2.14.1")
#   LFR_EXT_VENV  where the environment goes (default .venv)
#   PYTHON        the interpreter that creates it (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LFR_EXT_VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}

# Fashion-MNIST, full 60k/10k, from Debian's dataset-fashion-mnist (IDX files, MIT licence).
if [ ! -e /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  elif command -v apt-get >/dev/null && command -v sudo >/dev/null; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "install.sh: no apt-get; the demo and training need Fashion-MNIST in /usr/share/datasets/fashion-mnist" >&2
  fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" "$TORCH_SPEC"
# Build tools first: the extension is compiled against the torch above (--no-build-isolation).
"${PIP[@]}" "setuptools>=64" wheel ninja numpy
# triton: the Triton kernels (on CPU tensors only through TRITON_INTERPRET=1, how the tests run them).
"${PIP[@]}" --no-build-isolation -e ".[test,triton,train,eval]"
# The evaluation attacks: torchattacks (and the reference AutoAttack, pyautoattack, which imports
# only torch and numpy) without declared dependencies (torchattacks: torchvision, an old
# requests), which it does not import and which would replace the torch above; the [eval] extra
# brought what it does import (scipy, tqdm).
"${PIP[@]}" --no-deps torchattacks==3.5.1 pyautoattack==0.2.0
"$VENV/bin/python" -m lfr_ext.info
