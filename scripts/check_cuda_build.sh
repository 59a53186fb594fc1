#!/usr/bin/env bash
# Compile the CUDA kernels of lfr_ext (csrc/cuda/*.cu) without a GPU, so they cannot rot, and
# check that the resulting library registers CPU and CUDA kernels for every op of lfr_ext.ops.OPS
# (and defines no other) and that its CPU kernels still run.
#
# It builds in a throwaway copy of the working tree (the tree's own lfr_ext/_C*.so, build/ and
# build_info.json belong to .venv's torch and are left alone), against a CUDA build of torch in
# a separate environment:
#
#   LFR_EXT_CUDA_VENV       that environment (default .venv-cuda; created when missing)
#   LFR_EXT_CUDA_TORCH_SPEC the CUDA torch to install there (default torch==2.14.1, CUDA 13.0)
#   CUDA_HOME               the toolkit; default: the one the nvcc on PATH really runs (nvcc is
#                           often a wrapper script, which makes torch guess a wrong CUDA_HOME)
#   TORCH_CUDA_ARCH_LIST    default "8.0;9.0" (A100, H100/H200)
#
# Exit status 0 with "check_cuda_build: OK" on success. Without nvcc it fails (CI has one);
# set LFR_EXT_SKIP_CUDA_CHECK=1 to skip it explicitly.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
if [ "${LFR_EXT_SKIP_CUDA_CHECK:-0}" = 1 ]; then
  echo "check_cuda_build: skipped (LFR_EXT_SKIP_CUDA_CHECK=1)"
  exit 0
fi
# shellcheck source=scripts/cuda_home.sh
. scripts/cuda_home.sh
lfr_ext_find_cuda_home || { echo "check_cuda_build: cannot find the CUDA toolkit" >&2; exit 1; }
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
VENV=${LFR_EXT_CUDA_VENV:-.venv-cuda}
SPEC=${LFR_EXT_CUDA_TORCH_SPEC:-torch==2.14.1}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
VENV=$(cd "$VENV" && pwd)
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "$SPEC" "setuptools>=64" wheel ninja numpy
"$VENV/bin/python" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else "torch in '"$VENV"' is not a CUDA build")'

WORK=$(mktemp -d /tmp/lfr_ext_cuda_build.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
# Tracked and untracked-but-not-ignored files: the working tree as it is, without build outputs.
# shellcheck source=scripts/copy_tree.sh
. scripts/copy_tree.sh
lfr_ext_copy_tree "$WORK"
cd "$WORK"
echo "check_cuda_build: compiling with nvcc from $CUDA_HOME for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
start=$(date +%s)
LFR_EXT_BUILD_CUDA=1 "$VENV/bin/python" setup.py -q build_ext --inplace >"$WORK/build.log" 2>&1 || {
  tail -50 "$WORK/build.log" >&2
  exit 1
}
echo "check_cuda_build: compiled in $(( $(date +%s) - start )) s"

# Import from the copy (not from .venv's editable install) and check the registrations.
cd /tmp && PYTHONPATH="$WORK" "$VENV/bin/python" - <<'PY'
import math
import sys

import torch

import lfr_ext
from lfr_ext import _extension
from lfr_ext.reference import ascent_step_reference, grad_norm_reference

status = _extension.status()
assert status.loaded, status.error
assert status.with_cuda, status.build_info
print("library:", status.path, "| archs", status.build_info["cuda_arch_list"], "| nvcc", status.build_info["nvcc_version"])
# The ops with compiled kernels are the declared ones (lfr_ext.ops.OPS, which their fakes and
# autograd are registered from; ops defined in Python have no CPU or CUDA kernel of their own),
# and each has both kernels.
has = torch._C._dispatch_has_kernel_for_dispatch_key
declared = [spec.compiled for spec in lfr_ext.ops.OPS]
compiled = [op for op in torch._C._dispatch_get_all_op_names()
            if op.startswith("lfr_ext::") and (has(op, "CPU") or has(op, "CUDA"))]
assert sorted(compiled) == sorted(declared), f"the library has kernels for {sorted(compiled)}, OPS declares {declared}"
for op in declared:
    for key in ("CPU", "CUDA"):
        assert has(op, key), f"{op} has no {key} kernel"
    print(f"{op}: CPU and CUDA kernels registered")

# The CPU kernels of this CUDA-enabled library still compute the right thing.
x = torch.rand(3, 2, 5, 7)
x_adv, h, g = (x + 0.05 * torch.randn_like(x)).clamp(0, 1), torch.randn_like(x), torch.randn_like(x)
got = torch.ops.lfr_ext.ascent_step(x, x_adv, h, g, 0.03, 0.01, 0.0, 1.0, 1, True)
want = ascent_step_reference(x, x_adv, h, g, 0.03, 0.01, 0.0, 1.0, 1, True)
assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
torch.testing.assert_close(got[1], want[1])
for q in (1, 2, math.inf):
    torch.testing.assert_close(torch.ops.lfr_ext.grad_norm(g, lfr_ext.ops.q_code(q)), grad_norm_reference(g, q))
print("CPU kernels of the CUDA build: OK; GPU present:", torch.cuda.is_available())
PY
echo "check_cuda_build: OK"
