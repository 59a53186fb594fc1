#!/usr/bin/env bash
# Prove or disprove every GPU path of lfr_ext in one command, within 8 minutes on an H200:
#
#   bash scripts/gpu_check.sh [OUT_DIR]                 on a GPU machine (default OUT_DIR bench/results)
#   bash scripts/gpu_check.sh --cpu-dry-run OUT_DIR     the same stages on the CPU at tiny sizes (CI)
#
# Stages, each with its own time limit, all under one 8-minute deadline (a stage the deadline cuts
# short is reported as cut, not as failed; one with under 10 s left is skipped):
#   1 build        in place against the installed torch (pip install --no-build-isolation --no-deps -e .),
#                  CUDA compiled for this GPU's arch; asserts that `cuda` and `triton` are live
#   2 tests        the GPU tests (pytest -m "cuda and not slow") with LFR_EXT_REQUIRE_GPU=1, under which
#                  a skip is a failure: first the capture, training, Triton and CUDA-kernel tests
#                  (tests-core), after the headline benchmarks the op and engine matrix (tests-matrix)
#   3 benchmarks   one JSON per suite: OUT_DIR/<gpu>-<date>-{step,ascent_step,tangent,precision,penalty,scale_out}.json
#   4 training     if time remains: the four methods with lfr-train on Fashion-MNIST, about 2 minutes
#   5 summary      bench/summarize.py: Markdown printed last and written to OUT_DIR/summary.md
# Per-stage logs (with pytest's slowest tests, to size the stages) are in OUT_DIR/logs/.
#
# Made for a bare GPU machine: Python, torch 2.11+ (CUDA), numpy, triton, nvcc, ninja, pytest and
# pytest-benchmark, no internet. tqdm, matplotlib, scipy and torchattacks are not needed. The data:
# Fashion-MNIST from /usr/share/datasets/fashion-mnist, $LFR_EXT_FASHION_MNIST_DIR or .data/fashion-mnist
# in the tree (copy Debian's four .gz files there, 30 MB, to bring them along with the tree); without it
# the data-dependent test and stage 4 are skipped with a line saying so. It never resets or
# reconfigures the GPU.
#
#   PYTHON   the interpreter with torch (default python3)
# Exit status: 0 when every stage that ran passed; 1 otherwise (the summary is printed either way).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

MODE=gpu
if [ "${1:-}" = "--cpu-dry-run" ]; then
  MODE=cpu
  shift
  [ -n "${1:-}" ] || { echo "usage: bash scripts/gpu_check.sh --cpu-dry-run OUT_DIR" >&2; exit 2; }
fi
OUT=${1:-bench/results}
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
PYTHON=${PYTHON:-python3}
START=$(date +%s)
DEADLINE=$((START + 480))   # the whole check, summary included
SUMMARY_RESERVE=15
STAGES="$OUT/stages.tsv"
: > "$STAGES"
FAILED=0

note() { echo "gpu_check: $*"; }

# record STAGE RESULT SECONDS [NOTE]
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >> "$STAGES"; }

# stage NAME LIMIT_S COMMAND...: run under `timeout`, log to OUT/logs/NAME.log; the limit is cut to
# what the deadline leaves, and a stage with under 10 s left is skipped. A shell function of this
# script runs as `stage NAME LIMIT_S in_bash FUNCTION` (timeout runs programs, not functions).
stage() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - SUMMARY_RESERVE - $(date +%s)))
  if [ "$left" -lt 10 ]; then
    note "$name: skipped, no time left"
    record "$name" skipped 0 "no time left before the deadline"
    return 0
  fi
  local cut=0
  if [ "$limit" -gt "$left" ]; then
    limit=$left
    cut=1
  fi
  note "$name (limit ${limit} s)"
  local began=$SECONDS rc
  if [ "$1" = in_bash ]; then
    timeout --kill-after=10 "$limit" bash -c "$(declare -f "$2"); $2" > "$OUT/logs/$name.log" 2>&1
  else
    timeout --kill-after=10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  fi
  rc=$?
  local took=$((SECONDS - began))
  if [ "$rc" -eq 0 ]; then
    record "$name" pass "$took"
  elif { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && [ "$cut" = 1 ]; then
    record "$name" "cut" "$took" "stopped at the overall deadline (${limit} s were left); results incomplete"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    record "$name" "**timeout**" "$took" "killed at the ${limit} s limit"
    FAILED=1
  else
    record "$name" "**fail**" "$took" "exit $rc, see logs/$name.log"
    FAILED=1
  fi
  tail -n 5 "$OUT/logs/$name.log" | sed "s/^/  [$name] /"
  return "$rc"
}

# ---------------------------------------------------------------------------------------------
# where the data is, and how big everything is
# ---------------------------------------------------------------------------------------------
DATA_DIR=""
for candidate in "${LFR_EXT_FASHION_MNIST_DIR:-}" /usr/share/datasets/fashion-mnist "$ROOT/.data/fashion-mnist"; do
  if [ -n "$candidate" ] && [ -e "$candidate/train-images-idx3-ubyte.gz" ]; then
    DATA_DIR=$candidate
    break
  fi
done
[ -n "$DATA_DIR" ] && export LFR_EXT_FASHION_MNIST_DIR=$DATA_DIR

if [ "$MODE" = gpu ]; then
  export LFR_EXT_BUILD_CUDA=1 LFR_EXT_REQUIRE_GPU=1 LFR_EXT_REQUIRE_COMPILED=1
  # shellcheck source=scripts/cuda_home.sh
  . scripts/cuda_home.sh
  lfr_ext_find_cuda_home || note "no CUDA toolkit found; the build stage will say so"
  ARCH=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null) || ARCH=""
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  DEVICE_NAME=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null || echo unknown-gpu)
  TRAIN_ARGS="--full --epochs 2 --milestones 1 --val-robust-size 500"  # lr drops after epoch 1: a re-capture
else
  export LFR_EXT_BUILD_CUDA=0 LFR_BENCH_TINY=1
  export LFR_EXT_COMPILE_BACKEND=${LFR_EXT_COMPILE_BACKEND:-aot_eager}  # Inductor on this CPU: minutes
  DEVICE_NAME="cpu dry run"
  TRAIN_ARGS="--train-subset 128 --epochs 1 --steps 1 --step-size 0.05 --batch-size 32 --val-size 64
              --val-robust-size 16 --val-attack-steps 1"
fi
PREFIX="$(echo "$DEVICE_NAME" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')-$(date +%F)"
note "mode $MODE, device: $DEVICE_NAME, results: $OUT/$PREFIX-*"
export MODE PYTHON OUT PREFIX TRAIN_ARGS  # for the stages that are functions of this script

# ---------------------------------------------------------------------------------------------
# 1 build
# ---------------------------------------------------------------------------------------------
build() {
  "$PYTHON" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . || return 1
  "$PYTHON" -m lfr_ext.info || return 1
  "$PYTHON" - "$MODE" <<'PY'
import os
import sys

import numpy  # noqa: F401  (a dependency of lfr_ext: the data readers, the trainer's RNG state)
import torch

import lfr_ext
from lfr_ext import _extension

mode = sys.argv[1]
status = _extension.status()
assert status.loaded, f"compiled library not loaded: {status.error}"
if mode == "gpu":
    assert torch.cuda.is_available(), "torch sees no GPU"
    assert status.with_cuda, f"CUDA sources were not compiled: {status.build_info}"
    for impl in ("cuda", "triton"):
        reason = lfr_ext._registry.unavailable_reason(impl, torch.device("cuda"))
        assert reason is None, f"impl {impl!r} is not live on the GPU: {reason}"
    print("build: CUDA compiled for", status.build_info["cuda_arch_list"], "- cuda and triton live")
else:
    assert "cpu" in lfr_ext.ops.available_impls("cpu"), "the C++ kernels are not live"
    if os.environ.get("TRITON_INTERPRET") == "1":
        reason = lfr_ext._registry.unavailable_reason("triton", torch.device("cpu"))
        assert reason is None, f"triton is not live under the interpreter: {reason}"
    print("build: CPU library live:", lfr_ext.ops.available_impls("cpu"))
PY
}
stage build 150 in_bash build

# ---------------------------------------------------------------------------------------------
# 2 tests (core), 3 benchmarks (headline suites first), 2 tests (matrix), 3 benchmarks (the rest)
# ---------------------------------------------------------------------------------------------
CORE_TESTS=(tests/test_extension_build.py tests/test_captured.py tests/test_train.py tests/test_triton_ops.py
            tests/test_cuda_ops.py tests/test_linearized_gpu.py)
# The dry run runs the core files' CPU tests and only collects the matrix (CI runs it all anyway).
if [ "$MODE" = gpu ]; then MARK="cuda and not slow"; MATRIX_ONLY=(); else MARK="not slow"; MATRIX_ONLY=(--collect-only); fi
TEST_ARGS=(-m "$MARK" -rs -q -p no:cacheprovider --durations=15 --continue-on-collection-errors)
if [ -z "$DATA_DIR" ]; then
  note "tests: no Fashion-MNIST, the data-dependent GPU tests are left out"
  TEST_ARGS+=(--deselect tests/test_train.py::test_gpu_training_captures_every_method
              --deselect tests/test_train.py::test_validation_monitor_same_attack_on_gpu_and_cpu)
fi
bench() {  # bench SUITE LIMIT_S
  stage "bench-$1" "$2" "$PYTHON" -m pytest "bench/bench_$1.py" --benchmark-only -q -p no:cacheprovider \
    --benchmark-json "$OUT/$PREFIX-$1.json"
}
bench_step() {  # bench_step NAME LIMIT_S SETUPS: bench_step.py on some setups, results in PREFIX-NAME.json
  stage "bench-$1" "$2" env LFR_BENCH_SETUPS="$3" "$PYTHON" -m pytest bench/bench_step.py --benchmark-only -q \
    -p no:cacheprovider --benchmark-json "$OUT/$PREFIX-$1.json"
}
ignore_core=()
for file in "${CORE_TESTS[@]}"; do ignore_core+=(--ignore "$file"); done

stage tests-core 120 "$PYTHON" -m pytest "${CORE_TESTS[@]}" "${TEST_ARGS[@]}" --junitxml "$OUT/logs/tests-core.xml"
bench_step step 90 smallcnn_mnist_k40,resnet18_cifar_k10,resnet20_cifar_k10
bench ascent_step 75
stage tests-matrix 120 "$PYTHON" -m pytest tests "${ignore_core[@]}" "${TEST_ARGS[@]}" "${MATRIX_ONLY[@]}" \
  --junitxml "$OUT/logs/tests-matrix.xml"
bench tangent 45  # linearized vs double backprop per inner step, ReLU to attention
bench precision 25
bench penalty 30
bench scale_out 120  # DDP at 1 (and 2) GPUs with NCCL, hvp='compiled' (Inductor compiles), captured, bf16, fp16
bench_step step_beyond_relu 75 wrn16_4_silu_cifar_k10,convnext_tiny_cifar_k10,vit_tiny_cifar_k10

# ---------------------------------------------------------------------------------------------
# 4 training comparison, if time remains
# ---------------------------------------------------------------------------------------------
train_all() {
  local method device=cpu
  [ "$MODE" = gpu ] && device=cuda
  for method in plain pgd_at trades lfr; do
    # shellcheck disable=SC2086  # TRAIN_ARGS is a list of flags without spaces
    "$PYTHON" -m lfr_ext.train --method "$method" --device "$device" --no-progress \
      --out "$OUT/$PREFIX-train/$method" $TRAIN_ARGS || return 1
  done
}
if [ -z "$DATA_DIR" ]; then
  note "training: skipped, no Fashion-MNIST (see the header of this script)"
  record training skipped 0 "no Fashion-MNIST found"
elif [ $((DEADLINE - SUMMARY_RESERVE - $(date +%s))) -lt 60 ]; then
  note "training: skipped, under a minute left"
  record training skipped 0 "under a minute left before the deadline"
else
  rm -rf "$OUT/$PREFIX-train"
  stage training 120 in_bash train_all
fi

# ---------------------------------------------------------------------------------------------
# 5 summary, printed last
# ---------------------------------------------------------------------------------------------
record total "$([ "$FAILED" = 0 ] && echo pass || echo '**fail**')" $(( $(date +%s) - START ))
if ! "$PYTHON" bench/summarize.py "$OUT" --prefix "$PREFIX" --stages "$STAGES"; then
  echo "gpu_check: the summary could not be written" >&2
  FAILED=1
fi
exit "$FAILED"
