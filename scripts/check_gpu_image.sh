#!/usr/bin/env bash
# The GPU machine's versions, on the CPU: torch 2.11.0 (the oldest torch lfr_ext supports; its
# +cu130 wheel runs without a GPU) and triton 3.6.0, without tqdm, matplotlib, scipy or
# torchattacks, as the GPU image has them. In an environment of their own and a throwaway copy of
# the working tree, built the way the GPU check builds (pip install --no-build-isolation
# --no-deps -e .), it runs the tests where torch versions differ most (the compiled engine, DDP
# and FSDP2, CUDA-graph capture, training) and both parts of the GPU check's dry run.
#
#   LFR_EXT_GPU_IMAGE_VENV   the environment (default .venv-gpu-image; created when missing)
#
# numpy stays below 2.4 here: Triton 3.6's interpreter, which runs the Triton kernels on the
# CPU, cannot run with a later one (lfr_ext refuses that pair by name; compiled kernels on the
# GPU image's numpy 2.5.2 are not affected).
#
# Exit status 0 with "check_gpu_image: OK" on success.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LFR_EXT_GPU_IMAGE_VENV:-.venv-gpu-image}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
VENV=$(cd "$VENV" && pwd)
"$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.11.0 triton==3.6.0 "numpy<2.4" \
  "setuptools>=64" wheel ninja pytest pytest-benchmark

WORK=$(mktemp -d /tmp/lfr_ext_gpu_image.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
# shellcheck source=scripts/copy_tree.sh
. scripts/copy_tree.sh
lfr_ext_copy_tree "$WORK"
cd "$WORK"
start=$(date +%s)
LFR_EXT_BUILD_CUDA=0 "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps \
  -e . >"$WORK/build.log" 2>&1 || { tail -50 "$WORK/build.log" >&2; exit 1; }
"$VENV/bin/python" -m lfr_ext.info | head -3
echo "check_gpu_image: built in $(( $(date +%s) - start )) s"

export TRITON_INTERPRET=1 LFR_EXT_REQUIRE_TRITON=1 LFR_EXT_REQUIRE_COMPILED=1
"$VENV/bin/python" -m pytest tests/test_compiled.py tests/test_distributed.py tests/test_captured.py tests/test_input_grad.py tests/test_regularizers.py \
  tests/test_train.py tests/test_gpu_check_plan.py -q -p no:cacheprovider
for part in 1 2; do
  PYTHON="$VENV/bin/python" bash scripts/gpu_check.sh --cpu-dry-run --part "$part" "$WORK/gpu-check-part$part" \
    >"$WORK/gpu-check-part$part.txt" 2>&1 || { cat "$WORK/gpu-check-part$part.txt"; exit 1; }
  sed -n '/^## Stages/,/^| total/p' "$WORK/gpu-check-part$part.txt"  # the part's stage table
done
echo "check_gpu_image: OK in $(( $(date +%s) - start )) s"
