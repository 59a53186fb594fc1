"""``python -m lfr_ext.evaluate`` (``lfr-eval``): robustness of trained runs under real attacks.

    lfr-eval runs/fashion-mnist-small_cnn-lfr-quick-seed0            # quick: 100 test images
    lfr-eval runs/*-full-seed0 --full --report runs/report-full      # all 10k, PGD-40 x 5, + report

For each run folder (from lfr-train): clean accuracy, FGSM, PGD-k with random restarts, the
black-box Square attack and AutoAttack (standard version), all from torchattacks, per attack
and as the per-sample worst case; accuracy vs eps; the mean local flatness LF(x); loss-landscape
slices; and the gradient-masking checks. Results go to ``<run>/evaluation.json``; a table is
printed; ``--report DIR`` also renders the Markdown + PNG report.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .evaluation import EVAL_BUDGETS, evaluate_run
from .evaluation.attacks import require_torchattacks
from .training.loop import resolve_device

# Flags that override EvalConfig fields: (flag, type, help).
EVAL_FLAGS = [
    ("n", int, "test images attacked (the first n)"),
    ("clean-n", int, "test images for the whole-set clean accuracy (0: all)"),
    ("pgd-steps", int, "PGD steps"),
    ("pgd-restarts", int, "PGD random restarts (a sample must survive all)"),
    ("square-queries", int, "queries of the black-box Square attack (0: skip)"),
    ("curve-n", int, "test images for the accuracy-vs-eps curve"),
    ("lf-n", int, "test images for the local-flatness metric"),
    ("landscape-points", int, "test points of the loss-landscape slices"),
    ("batch-size", int, "evaluation batch size"),
    ("seed", int, "seed of every attack's randomness"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lfr-eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("runs", nargs="+", help="run folders written by lfr-train")
    parser.add_argument("--full", action="store_true", help="whole test set, PGD-40 x 5, Square 5000 (default: quick)")
    parser.add_argument("--checkpoint", choices=["best", "last"], default="best",
                        help="evaluate the best-robust (default) or the last epoch's model")
    parser.add_argument("--eps", type=float, default=None, help="attack radius (default: the run's training eps)")
    parser.add_argument("--no-autoattack", action="store_true", help="skip AutoAttack (its cost dominates on CPU)")
    for flag, kind, text in EVAL_FLAGS:
        parser.add_argument(f"--{flag}", type=kind, default=None, help=text)
    parser.add_argument("--data-dir", default=None, help="dataset folder, as given to lfr-train")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, ...")
    parser.add_argument("--report", default=None, metavar="DIR", help="also write the report (Markdown + PNG) to DIR")
    return parser


def eval_config_from_args(args: argparse.Namespace):
    ecfg = EVAL_BUDGETS["full" if args.full else "quick"]
    overrides = {f.replace("-", "_"): getattr(args, f.replace("-", "_")) for f, _, _ in EVAL_FLAGS}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.no_autoattack:
        overrides["autoattack"] = False
    return dataclasses.replace(ecfg, **overrides)


def evaluate_runs(run_dirs: list[str], ecfg, *, which="best", eps=None, data_dir=None, device="cpu", log=print) -> list[dict]:
    return [evaluate_run(run, ecfg, which=which, eps=eps, data_dir=data_dir, device=device, log=log) for run in run_dirs]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        require_torchattacks()
    except ImportError as exc:
        print(f"lfr-eval: error: {exc}", file=sys.stderr)
        return 2
    from .report import results_table, write_report

    try:
        ecfg = eval_config_from_args(args)
        device = resolve_device(args.device)
        results = evaluate_runs(args.runs, ecfg, which=args.checkpoint, eps=args.eps, data_dir=args.data_dir,
                                device=device)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"lfr-eval: error: {exc}", file=sys.stderr)
        return 2
    print()
    print(results_table(results))
    if args.report:
        path = write_report(args.runs, args.report)
        print(f"\nreport: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
