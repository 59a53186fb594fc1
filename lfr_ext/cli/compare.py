"""``python -m lfr_ext.compare`` (``lfr-compare``): the main job. Train LFR and the baselines
with the same data, model, schedule and seed, evaluate them under real attacks, render the
report and print the results table.

    lfr-compare                      # Fashion-MNIST, SmallCNN, quick budget (about 10 min on 2 CPU cores)
    lfr-compare --full --device cuda # whole dataset, preset schedule, full evaluation
    lfr-compare --methods lfr,pgd_at --epochs 5 --out runs/my-comparison

Any lfr-train flag after ``--train-args`` is passed to every method's training (quote them),
e.g. ``--train-args "--eps 0.2 --lr 0.02"``. Interrupted? Run the same command again: finished
runs are kept, an interrupted one resumes from its last checkpoint, and evaluations already made
of the same checkpoints are kept.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from ..evaluation.attacks import require_torchattacks
from ..training import METHODS
from ..training.loop import resolve_device
from . import evaluate as evaluate_cli
from . import train as train_cli

# What `lfr-compare` trains without --methods: LFR and the standard baselines (PGD-AT, TRADES,
# an undefended model). The other methods of lfr_ext.training.METHODS are chosen by name.
DEFAULT_METHODS = ("lfr", "pgd_at", "trades", "plain")


def parse_methods(text: str) -> list[str]:
    """The comma-separated method names of ``--methods``; ValueError for an unknown one or none."""
    methods = [m for m in text.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    return methods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lfr-compare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated (default {','.join(DEFAULT_METHODS)}); any of {', '.join(METHODS)}",
    )
    parser.add_argument("--data", default=None, help="dataset (default fashion-mnist)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--full", action="store_true", help="full training budget and full evaluation")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-args", default="", help="extra lfr-train flags for every method (one string)")
    parser.add_argument("--eval-args", default="", help="extra lfr-eval flags (one string)")
    parser.add_argument(
        "--eval-jobs",
        type=int,
        default=None,
        help="models evaluated at once (default: one per CPU core on the CPU, else 1)",
    )
    parser.add_argument("--out", default=None, help="folder for the runs and the report (default runs/compare-...)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        methods = parse_methods(args.methods)
    except ValueError as exc:
        print(f"lfr-compare: error: {exc}", file=sys.stderr)
        return 2
    try:
        require_torchattacks()  # fail before hours of training, not after
    except ImportError as exc:
        print(f"lfr-compare: error: {exc}", file=sys.stderr)
        return 2
    budget = "full" if args.full else "quick"
    out = args.out or os.path.join("runs", f"compare-{args.data or 'fashion-mnist'}-{budget}-seed{args.seed}")
    common = ["--seed", str(args.seed), "--device", args.device, *shlex.split(args.train_args)]
    common += ["--data", args.data] if args.data else []
    common += ["--data-dir", args.data_dir] if args.data_dir else []
    common += ["--epochs", str(args.epochs)] if args.epochs else []
    common += ["--full"] if args.full else []
    common += ["--no-progress"] if args.no_progress else []

    started = time.perf_counter()
    run_dirs = []
    for method in methods:
        run_dir = os.path.join(out, method)
        run_dirs.append(run_dir)
        if os.path.exists(os.path.join(run_dir, "summary.json")):
            print(f"{method}: already trained in {run_dir}, kept", flush=True)
            continue
        resume = ["--resume"] if os.path.exists(os.path.join(run_dir, "last.pt")) else []
        code = train_cli.main(["--method", method, "--out", run_dir, *resume, *common])
        if code:
            return code
    trained = time.perf_counter()
    print(f"\ntrained {len(methods)} methods in {trained - started:.0f} s; evaluating", flush=True)
    # On the CPU the models are evaluated side by side, one process per core (lfr-eval --jobs).
    jobs = args.eval_jobs or (
        min(len(run_dirs), os.cpu_count() or 1) if resolve_device(args.device).type == "cpu" else 1
    )
    eval_argv = [
        *run_dirs,
        "--device",
        args.device,
        "--report",
        os.path.join(out, "report"),
        "--resume",
        "--jobs",
        str(jobs),
        *shlex.split(args.eval_args),
    ]
    eval_argv += ["--full"] if args.full else []
    eval_argv += ["--data-dir", args.data_dir] if args.data_dir else []
    code = evaluate_cli.main(eval_argv)
    print(
        f"\ntotal {time.perf_counter() - started:.0f} s (training {trained - started:.0f} s, "
        f"evaluation {time.perf_counter() - trained:.0f} s)"
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
