#!/usr/bin/env bash
# The GPU check of lfr_ext, in two parts that each fit one command on a lent GPU machine
# (at most 10 minutes a command, about 15 minutes of device time in all, the machine's start
# included): each part ends within PART_DEADLINE_S (4.5 minutes) on an H200, so part 1, a fix,
# and part 1 again (or part 2) fit one loan.
#
#   bash scripts/gpu_check.sh --part 1 OUT_DIR                 on the GPU machine
#   bash scripts/gpu_check.sh --part 2 OUT_DIR
#   bash scripts/gpu_check.sh --cpu-dry-run --part N OUT_DIR   the same stages on the CPU at tiny sizes (CI)
#   bash scripts/gpu_check.sh --plan                           each part's stages and limits, as "part stage limit_s"
#
# On a lent GPU machine (the device tool), after a green dry run here:
#   1. here:  bash scripts/prepare_data.sh          (.data/fashion-mnist from Debian's dataset-fashion-mnist)
#   2. device run, command:  bash scripts/gpu_check.sh --part 1 "$OUT"
#                  carry: [".data"]   timeout_s: 300 (the part's deadline, its start and a margin)
#   3. fix what it shows, then the same with --part 1 again or --part 2.
#   4. commit what came back from OUT_DIR to bench/results/ (<gpu>-<date>-<suite>.json,
#      <gpu>-<date>-part<N>-summary.md) with an index line in bench/results/README.md.
#
# Part 1, in order of value: build (CUDA compiled for this GPU; cuda and triton live), tests-core (the
# CUDA and Triton kernels against their references, capture, the engine's exactness on CUDA), the
# headline training steps (captured LFR vs captured PGD-AT and the authors' eager step, SmallCNN and
# ResNet-18), the fused op's time and bandwidth. Part 2: build (a no-op on a machine still warm from
# part 1), the op and engine matrix (every other GPU test), the training comparison (lfr-train, the
# four methods), the gradient penalties' steps against their official double backprop, the steps and
# inner steps beyond ReLU, data-parallel scale-out, low precision.
# Each part then writes its summary (bench/summarize.py), printed last.
#
# Each stage runs under its own limit (PART_STAGES below; their sum leaves SUMMARY_RESERVE_S of the
# deadline for the summary, which tests/test_gpu_check_plan.py checks). A stage the deadline cuts
# short is reported as cut, not as failed. The data check comes first: Fashion-MNIST from
# $LFR_EXT_FASHION_MNIST_DIR, /usr/share/datasets/fashion-mnist or .data/fashion-mnist; without it
# one line says so and the tests marked fashion_mnist and the training stage are left out.
#
# OUT_DIR receives at most 8 files and no folder (what a device command sends back): the suites'
# JSON, <prefix>-train.json (part 2), <prefix>-part<N>-summary.md, and <prefix>-part<N>.log with
# every stage's output. Made for a bare GPU machine: Python, torch 2.11+ (CUDA), numpy, triton,
# nvcc, ninja, pytest, pytest-benchmark; no internet, no tqdm, matplotlib, scipy or torchattacks.
# It never resets or reconfigures the GPU.
#
#   PYTHON   the interpreter with torch (default python3)
# Exit status: 0 when every stage that ran passed; 1 otherwise (the summary is printed either way);
# 2 for a usage error.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

PART_DEADLINE_S=270
SUMMARY_RESERVE_S=15
# stage:limit_s, in the order they run. bench-<suite> stages write <prefix>-<suite>.json.
PART_STAGES_1="build:100 tests-core:75 bench-step:55 bench-ascent_step:25"
PART_STAGES_2="build:50 tests-matrix:60 training:35 bench-gradient_penalties:25 bench-step_beyond_relu:25 bench-tangent:20 bench-scale_out:25 bench-precision:15"
# The test files of tests-core; tests-matrix runs every other GPU test.
CORE_TESTS=(tests/test_extension_build.py tests/test_cuda_ops.py tests/test_triton_ops.py tests/test_captured.py
            tests/test_linearized_gpu.py)

usage() { echo "usage: bash scripts/gpu_check.sh [--cpu-dry-run] --part 1|2 OUT_DIR | --plan" >&2; exit 2; }

MODE=gpu PART=""
while [ $# -gt 0 ]; do
  case $1 in
    --plan)
      for part in 1 2; do
        stages_var=PART_STAGES_$part
        for entry in ${!stages_var}; do echo "$part ${entry%%:*} ${entry##*:}"; done
      done
      echo "deadline $PART_DEADLINE_S"
      echo "summary_reserve $SUMMARY_RESERVE_S"
      exit 0 ;;
    --cpu-dry-run) MODE=cpu; shift ;;
    --part) PART=${2:-}; shift 2 || usage ;;
    -*) usage ;;
    *) break ;;
  esac
done
case $PART in 1|2) ;; *) usage ;; esac
[ $# -eq 1 ] || usage
mkdir -p "$1" && OUT=$(cd "$1" && pwd) || usage
stages_var=PART_STAGES_$PART
STAGE_LIST=${!stages_var}
PYTHON=${PYTHON:-python3}
SCRATCH=$(mktemp -d /tmp/lfr_ext_gpu_check.XXXXXX)  # stage logs, the stage table, training runs
trap 'rm -rf "$SCRATCH"' EXIT
STAGES="$SCRATCH/stages.tsv"
: > "$STAGES"
FAILED=0

note() { echo "gpu_check: $*"; }

# record STAGE RESULT SECONDS [NOTE]
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >> "$STAGES"; }

# ---------------------------------------------------------------------------------------------
# mode, sizes and the data: the first thing a part does
# ---------------------------------------------------------------------------------------------
if [ "$MODE" = gpu ]; then
  SCALE=1
  export LFR_EXT_BUILD_CUDA=1 LFR_EXT_REQUIRE_GPU=1 LFR_EXT_REQUIRE_COMPILED=1
  # shellcheck source=scripts/cuda_home.sh
  . scripts/cuda_home.sh
  lfr_ext_find_cuda_home || note "no CUDA toolkit found; the build stage will say so"
  ARCH=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null) || ARCH=""
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  DEVICE_NAME=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null || echo unknown-gpu)
  # The preset's batch and K on a fifth of the data, 2 epochs (the lr drops after the first: a re-capture).
  TRAIN_ARGS="--full --train-subset 12800 --epochs 2 --milestones 1 --val-size 2000 --val-robust-size 500"
else
  # The CPU runs the tiny sizes slower than the GPU runs the real ones: every limit and the
  # deadline are scaled alike, so the plan's arithmetic is the one tested.
  SCALE=${LFR_GPU_CHECK_CPU_SCALE:-4}
  export LFR_EXT_BUILD_CUDA=0 LFR_BENCH_TINY=1
  export LFR_EXT_COMPILE_BACKEND=${LFR_EXT_COMPILE_BACKEND:-aot_eager}  # Inductor on this CPU: minutes
  DEVICE_NAME="cpu dry run"
  TRAIN_ARGS="--train-subset 128 --epochs 1 --steps 1 --step-size 0.05 --batch-size 32 --val-size 64
              --val-robust-size 16 --val-attack-steps 1"
fi
START=$(date +%s)
DEADLINE=$((START + SCALE * PART_DEADLINE_S))
PREFIX="$(echo "$DEVICE_NAME" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')-$(date +%F)"
LOG="$OUT/$PREFIX-part$PART.log"
: > "$LOG"
note "part $PART, mode $MODE, device: $DEVICE_NAME, results: $OUT/$PREFIX-*" | tee -a "$LOG"

DATA_DIR=""
for candidate in "${LFR_EXT_FASHION_MNIST_DIR:-}" /usr/share/datasets/fashion-mnist "$ROOT/.data/fashion-mnist"; do
  if [ -n "$candidate" ] && [ -e "$candidate/train-images-idx3-ubyte.gz" ] && [ -e "$candidate/t10k-labels-idx1-ubyte.gz" ]; then
    DATA_DIR=$candidate
    break
  fi
done
if [ -n "$DATA_DIR" ]; then
  export LFR_EXT_FASHION_MNIST_DIR=$DATA_DIR
  note "data: Fashion-MNIST in $DATA_DIR" | tee -a "$LOG"
else
  note "data: NO Fashion-MNIST (run scripts/prepare_data.sh here and send .data with the tree: carry [\".data\"]); \
the fashion_mnist tests and the training stage are left out" | tee -a "$LOG"
  record data missing 0 "no Fashion-MNIST: fashion_mnist tests and training left out"
fi
export MODE PYTHON OUT PREFIX TRAIN_ARGS SCRATCH  # for the stages that are functions of this script

# stage NAME LIMIT_S COMMAND...: run under `timeout` with its output in SCRATCH/logs/NAME.log, then
# appended to the part's log; the limit is cut to what the deadline leaves, and a stage with under
# 10 s left is skipped. A shell function of this script runs as `stage NAME LIMIT_S in_bash FUNCTION`
# (timeout runs programs, not functions).
stage() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - SCALE * SUMMARY_RESERVE_S - $(date +%s)))
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
  mkdir -p "$SCRATCH/logs"
  local began=$SECONDS rc stage_log="$SCRATCH/logs/$name.log"
  if [ "$1" = in_bash ]; then
    timeout --kill-after=10 "$limit" bash -c "$(declare -f "$2"); $2" > "$stage_log" 2>&1
  else
    timeout --kill-after=10 "$limit" "$@" > "$stage_log" 2>&1
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
    record "$name" "**fail**" "$took" "exit $rc, see $PREFIX-part$PART.log"
    FAILED=1
  fi
  { echo; echo "===== $name: exit $rc after $took s (limit $limit s) ====="; cat "$stage_log"; } >> "$LOG"
  tail -n 5 "$stage_log" | sed "s/^/  [$name] /"
  return "$rc"
}

# ---------------------------------------------------------------------------------------------
# the stages: one function each, run_<stage> (hyphens as underscores)
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
        reason = lfr_ext._impl.unavailable_reason(impl, torch.device("cuda"))
        assert reason is None, f"impl {impl!r} is not live on the GPU: {reason}"
    print("build: CUDA compiled for", status.build_info["cuda_arch_list"], "- cuda and triton live")
else:
    assert "cpu" in lfr_ext.ops.available_impls("cpu"), "the C++ kernels are not live"
    if os.environ.get("TRITON_INTERPRET") == "1":
        reason = lfr_ext._impl.unavailable_reason("triton", torch.device("cpu"))
        assert reason is None, f"triton is not live under the interpreter: {reason}"
    print("build: CPU library live:", lfr_ext.ops.available_impls("cpu"))
PY
}
run_build() { stage build "$1" in_bash build; }

# The GPU tests (pytest -m cuda) under LFR_EXT_REQUIRE_GPU=1, where a skip is a failure; the dry
# run only collects them (CI runs every test on the CPU anyway).
TEST_MARK="cuda and not slow"
[ -n "$DATA_DIR" ] || TEST_MARK="$TEST_MARK and not fashion_mnist"
TEST_ARGS=(-m "$TEST_MARK" -rs -q -p no:cacheprovider --durations=15 --continue-on-collection-errors)
[ "$MODE" = gpu ] || TEST_ARGS+=(--collect-only)
run_tests_core() { stage tests-core "$1" "$PYTHON" -m pytest "${CORE_TESTS[@]}" "${TEST_ARGS[@]}"; }
run_tests_matrix() {
  local ignore=() file
  for file in "${CORE_TESTS[@]}"; do ignore+=(--ignore "$file"); done
  # pytest-xdist, where installed, spreads the matrix's compiles over the CPU cores (one GPU).
  local parallel=()
  "$PYTHON" -c 'import xdist' 2>/dev/null && [ "$MODE" = gpu ] && parallel=(-n 4)
  stage tests-matrix "$1" "$PYTHON" -m pytest tests "${ignore[@]}" "${TEST_ARGS[@]}" "${parallel[@]}"
}

# bench_suite SUITE LIMIT_S [SETUPS [PYTEST_ARGS...]]: bench/bench_SUITE.py, or bench_step.py on
# SETUPS for the step suites, into OUT/PREFIX-SUITE.json.
bench_suite() {
  local suite=$1 limit=$2 setups=${3:-} file="bench/bench_$1.py"
  shift $(($# < 3 ? $# : 3))
  [ -z "$setups" ] || file=bench/bench_step.py
  stage "bench-$suite" "$limit" env LFR_BENCH_SETUPS="$setups" "$PYTHON" -m pytest "$file" --benchmark-only -q \
    -p no:cacheprovider --benchmark-json "$OUT/$PREFIX-$suite.json" "$@"
}
# The headline's providers only (the eager lfr_ext variants are measured per inner step in part 2).
run_bench_step() { bench_suite step "$1" smallcnn_mnist_k40,resnet18_cifar_k10 -k "captured or authors_lfr"; }
run_bench_ascent_step() { bench_suite ascent_step "$1"; }
run_bench_step_beyond_relu() {
  bench_suite step_beyond_relu "$1" resnet20_cifar_k10,wrn16_4_silu_cifar_k10,convnext_tiny_cifar_k10,vit_tiny_cifar_k10
}
run_bench_tangent() { bench_suite tangent "$1"; }  # linearized vs double backprop per inner step, ReLU to attention
run_bench_scale_out() { bench_suite scale_out "$1"; }  # DDP (NCCL), hvp='compiled', captured, bf16, fp16
run_bench_precision() { bench_suite precision "$1"; }
run_bench_gradient_penalties() { bench_suite gradient_penalties "$1"; }  # each regulariser vs its official code

# The four methods with lfr-train, one after the other (their epoch times are compared); their
# summaries are gathered into OUT/PREFIX-train.json.
train_all() {
  local method device=cpu
  [ "$MODE" = gpu ] && device=cuda
  for method in plain pgd_at trades lfr; do
    # shellcheck disable=SC2086  # TRAIN_ARGS is a list of flags without spaces
    "$PYTHON" -m lfr_ext.train --method "$method" --device "$device" --no-progress \
      --out "$SCRATCH/train/$method" $TRAIN_ARGS || return 1
  done
  "$PYTHON" - "$SCRATCH/train" "$OUT/$PREFIX-train.json" <<'PY'
import json
import os
import sys

runs, out = sys.argv[1], sys.argv[2]
summaries = {}
for method in sorted(os.listdir(runs)):
    with open(os.path.join(runs, method, "summary.json")) as f:
        summaries[method] = json.load(f)
with open(out, "w") as f:
    json.dump(summaries, f, indent=1)
PY
}
run_training() {
  if [ -z "$DATA_DIR" ]; then
    note "training: left out, no Fashion-MNIST"
    record training skipped 0 "no Fashion-MNIST found"
    return 0
  fi
  stage training "$1" in_bash train_all
}

# ---------------------------------------------------------------------------------------------
# the part's stages, then its summary, printed last
# ---------------------------------------------------------------------------------------------
SUITES=()
for entry in $STAGE_LIST; do
  name=${entry%%:*}
  limit=$((SCALE * ${entry##*:}))
  case $name in bench-*) SUITES+=("${name#bench-}") ;; esac
  "run_${name//-/_}" "$limit"
done

record total "$([ "$FAILED" = 0 ] && echo pass || echo '**fail**')" $(( $(date +%s) - START ))
training_args=()
case " $STAGE_LIST " in *" training:"*) training_args=(--training "$OUT/$PREFIX-train.json") ;; esac
if ! "$PYTHON" bench/summarize.py "$OUT" --prefix "$PREFIX" --part "$PART" --stages "$STAGES" \
    --suites "$(IFS=,; echo "${SUITES[*]}")" "${training_args[@]}"; then
  echo "gpu_check: the summary could not be written" >&2
  FAILED=1
fi
exit "$FAILED"
