"""``python -m lfr_ext.evaluate`` (``lfr-eval``): robustness of trained runs under real attacks.

    lfr-eval runs/fashion-mnist-small_cnn-lfr-quick-seed0            # quick: 100 test images
    lfr-eval runs/*-full-seed0 --full --report runs/report-full      # all 10k, PGD-40 x 5, + report
    lfr-eval --model resnet18 --weights paper.pt --data cifar10 --data-dir DATA --eps 8/255 --out results/paper

For each run folder (from lfr-train), or for weights saved by any code (a state_dict, a dict
holding one under "state_dict" or "model", ``module.`` prefixes allowed) in an lfr_ext.models
architecture: clean accuracy, FGSM, PGD-k with random restarts and the black-box Square attack
(torchattacks), and the standard AutoAttack (the reference implementation), per attack and as
the per-sample worst case; accuracy vs eps; the mean local flatness LF(x); loss-landscape
slices; and the gradient-masking checks. Results go to ``evaluation.json`` and a RobustBench-
shaped ``robustbench.json`` in the run folder (or ``--out``); a table is printed; ``--report
DIR`` also renders the Markdown + PNG report of run folders. ``--mean``/``--std`` for a model
that normalises its inputs keep the attack radius in pixel space.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import multiprocessing
import os
import sys

import torch

from ..evaluation import EVAL_BUDGETS, evaluate_run, evaluate_weights
from ..evaluation.attacks import require_torchattacks
from ..training.loop import resolve_device

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


def _radius(text: str) -> float:
    """``0.1`` or ``8/255``."""
    try:
        numerator, _, denominator = text.partition("/")
        return float(numerator) / float(denominator) if denominator else float(numerator)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a radius: {text!r} (a number, or a fraction like 8/255)") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lfr-eval",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("runs", nargs="*", help="run folders written by lfr-train")
    parser.add_argument("--model", default=None, help="an lfr_ext.models architecture, with --weights")
    parser.add_argument("--weights", default=None, help="weights file saved by any code, with --model")
    parser.add_argument("--data", default="fashion-mnist", help="dataset of --weights' model (default fashion-mnist)")
    parser.add_argument("--out", default=None, help="folder for --weights' results (default: beside the weights)")
    parser.add_argument("--mean", type=float, nargs="+", default=None, help="per-channel mean the model normalises by")
    parser.add_argument("--std", type=float, nargs="+", default=None, help="per-channel std the model normalises by")
    parser.add_argument(
        "--autoattack-impl",
        choices=["reference", "torchattacks"],
        default=None,
        help="AutoAttack implementation (default: reference)",
    )
    parser.add_argument("--full", action="store_true", help="whole test set, PGD-40 x 5, Square 5000 (default: quick)")
    parser.add_argument(
        "--checkpoint",
        choices=["best", "last"],
        default="best",
        help="evaluate the best-robust (default) or the last epoch's model",
    )
    parser.add_argument(
        "--eps",
        type=_radius,
        default=None,
        help="attack radius in pixel space, a number or a fraction like 8/255 (default: the run's eps)",
    )
    parser.add_argument("--no-autoattack", action="store_true", help="skip AutoAttack (its cost dominates on CPU)")
    for flag, kind, text in EVAL_FLAGS:
        parser.add_argument(f"--{flag}", type=kind, default=None, help=text)
    parser.add_argument("--data-dir", default=None, help="dataset folder, as given to lfr-train")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, ...")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="run folders evaluated at once on the CPU, one process each with cores/N threads "
        "(default 1; other thread counts may differ in the last bits of floats)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep a run's evaluation.json made of the same checkpoint file, eps and budget",
    )
    parser.add_argument("--report", default=None, metavar="DIR", help="also write the report (Markdown + PNG) to DIR")
    return parser


def eval_config_from_args(args: argparse.Namespace):
    ecfg = EVAL_BUDGETS["full" if args.full else "quick"]
    overrides = {f.replace("-", "_"): getattr(args, f.replace("-", "_")) for f, _, _ in EVAL_FLAGS}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.no_autoattack:
        overrides["autoattack"] = False
    if args.autoattack_impl:
        overrides["autoattack_impl"] = args.autoattack_impl
    return dataclasses.replace(ecfg, **overrides)


def evaluate_runs(
    run_dirs: list[str],
    ecfg,
    *,
    which="best",
    eps=None,
    data_dir=None,
    device="cpu",
    resume=False,
    jobs: int = 1,
    log=print,
) -> list[dict]:
    """Evaluate each run folder; ``jobs`` > 1 (CPU only) evaluates that many at once, one process
    each with ``cores // jobs`` threads: the attacks' small batches use one core far better than
    two, so the cores are used fully by running models side by side."""
    kwargs = dict(which=which, eps=eps, data_dir=data_dir, device=device, resume=resume)
    jobs = max(1, min(jobs, len(run_dirs)))
    if jobs == 1 or torch.device(device).type != "cpu":
        return [evaluate_run(run, ecfg, log=log, **kwargs) for run in run_dirs]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        jobs, mp_context=context, initializer=torch.set_num_threads, initargs=(threads,)
    ) as pool:
        futures = [pool.submit(evaluate_run, run, ecfg, **kwargs) for run in run_dirs]
        return [future.result() for future in futures]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.model) != bool(args.weights):
        parser.error("--model and --weights go together")
    if not args.runs and not args.weights:
        parser.error("give run folders, or --model and --weights")
    if args.weights and args.eps is None:
        parser.error("--weights needs --eps (the attack radius in pixel space, e.g. 0.1 or 8/255)")
    if args.report and not args.runs:
        parser.error("--report renders run folders")
    if (args.mean is None) != (args.std is None):
        parser.error("--mean and --std go together")
    if args.mean is not None and args.runs:
        parser.error("--mean/--std are for --weights: a run folder's model normalises as it was trained")
    try:
        require_torchattacks()
    except ImportError as exc:
        print(f"lfr-eval: error: {exc}", file=sys.stderr)
        return 2
    from .report import results_table, write_report

    try:
        ecfg = eval_config_from_args(args)
        device = resolve_device(args.device)
        results = evaluate_runs(
            args.runs,
            ecfg,
            which=args.checkpoint,
            eps=args.eps,
            data_dir=args.data_dir,
            device=device,
            resume=args.resume,
            jobs=args.jobs,
        )
        if args.weights:
            out = args.out or os.path.splitext(args.weights)[0] + "-evaluation"
            results.append(
                evaluate_weights(
                    args.model,
                    args.weights,
                    args.data,
                    ecfg,
                    eps=args.eps,
                    out_dir=out,
                    data_dir=args.data_dir,
                    device=device,
                    mean=args.mean,
                    std=args.std,
                )
            )
            print(f"results: {out}")
    except (FileNotFoundError, ValueError, RuntimeError, TypeError, KeyError) as exc:
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
