#!/usr/bin/env bash
# The linearized engine on timm's models (tests/test_timm_models.py), in the CUDA torch
# environment that scripts/check_cuda_build.sh made (no GPU needed): PyPI's torchvision, which
# timm imports, is built against a CUDA torch, so it does not load beside .venv's CPU torch.
#
#   LFR_EXT_CUDA_VENV   that environment (default .venv-cuda)
#   TORCHVISION_SPEC    the torchvision matching its torch (default torchvision==0.29.1, torch 2.14.1)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LFR_EXT_CUDA_VENV:-.venv-cuda}
[ -x "$VENV/bin/python" ] || { echo "check_timm_models: $VENV missing (run scripts/check_cuda_build.sh first)" >&2; exit 1; }
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${TORCHVISION_SPEC:-torchvision==0.29.1}" timm pytest
# lfr_ext from this tree, without its compiled library (built for .venv's torch): the engine
# under test is pure PyTorch.
LFR_EXT_DISABLE_EXTENSION=1 PYTHONPATH="$PWD" "$VENV/bin/python" -m pytest tests/test_timm_models.py -q -p no:cacheprovider
