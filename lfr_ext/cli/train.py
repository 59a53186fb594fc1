"""``python -m lfr_ext.train`` (``lfr-train``): adversarially train one model with one method.

    lfr-train                                  # LFR, SmallCNN, Fashion-MNIST, quick budget
    lfr-train --method pgd_at --full           # PGD-AT on the whole training set, 30 epochs
    lfr-train --data mnist --data-dir ~/data   # the authors' MNIST preset (eps 0.3, 40 x 0.01)
    lfr-train --data cifar10 --data-dir ~/data --full --device cuda   # authors' CIFAR-10 ResNet-20
    lfr-train ... --resume                     # continue the same command's run after a crash
    torchrun --nproc_per_node=4 -m lfr_ext.train --full --device cuda   # 4 GPUs, DDP (gloo on CPU)

Every preset value can be overridden by its flag; the resolved configuration is saved in the
run folder (``--out``, default ``runs/<data>-<model>-<method>-<budget>-seed<seed>``).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from ..data import DATASETS
from ..models import MODELS
from ..training import BUDGETS, METHODS, PRESETS, resolve_config, train
from ..training.config import AMP_MODES, SCHEDULES
from ..training.parallel import launched_by_torchrun

# Flags that map one-to-one onto TrainConfig fields: (flag, type, help).
CONFIG_FLAGS = [
    ("epochs", int, "training epochs"),
    ("batch-size", int, "batch size"),
    ("lr", float, "SGD learning rate"),
    ("momentum", float, "SGD momentum"),
    ("weight-decay", float, "SGD weight decay"),
    ("gamma", float, "lr factor at each milestone"),
    ("eps", float, "L-inf radius of the threat model (inputs in [0, 1])"),
    ("step-size", float, "step of the inner maximisation (LFR ascent / training PGD)"),
    ("steps", int, "steps of the inner maximisation"),
    ("lam", float, "LFR penalty weight"),
    ("trades-beta", float, "TRADES KL weight"),
    ("penalty-weight", float, "gradient-penalty weight of gradnorm, igr, cure, gradalign, llr (default: the paper's)"),
    ("train-subset", int, "train on this many images (0: all but the validation set)"),
    ("val-size", int, "validation images held out from the training split"),
    ("val-robust-size", int, "validation images attacked each epoch (0: none)"),
    ("val-attack-steps", int, "PGD steps of the per-epoch robust monitor"),
    ("collapse-margin", float, "clean accuracy <= 1/classes + margin is reported as a collapse"),
    ("seed", int, "seed of the model init, data split, data order and training noise"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lfr-train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--method", choices=METHODS, default="lfr", help="training objective (default lfr)")
    parser.add_argument("--data", choices=list(DATASETS), default=None, help="dataset (default fashion-mnist)")
    parser.add_argument("--data-dir", default=None, help="folder with the dataset's files (MNIST, CIFAR-10)")
    parser.add_argument("--model", choices=list(MODELS), default=None, help="architecture (default: the preset's)")
    parser.add_argument("--preset", choices=list(PRESETS), default=None, help="settings (default: named like --data)")
    parser.add_argument(
        "--full",
        action="store_true",
        help=f"whole dataset and the preset's schedule (default: the quick budget {BUDGETS['quick']})",
    )
    parser.add_argument("--schedule", choices=SCHEDULES, default=None, help="lr schedule (default multistep)")
    parser.add_argument(
        "--milestones",
        type=lambda s: [int(v) for v in s.split(",") if v],
        default=None,
        help="comma-separated epochs where lr *= gamma",
    )
    parser.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random crop + flip (default: on for CIFAR-10)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile: LFR's inner and penalty steps compiled whole (hvp='compiled'), the other "
        "methods' model compiled; where this torch cannot compile LFR's steps, LFR runs eagerly and "
        "the log says why",
    )
    parser.add_argument(
        "--amp",
        choices=AMP_MODES,
        default=None,
        help="mixed precision: bf16 autocast, or fp16 autocast with a GradScaler (CUDA); default none",
    )
    for flag, kind, text in CONFIG_FLAGS:
        parser.add_argument(f"--{flag}", type=kind, default=None, help=text)
    parser.add_argument(
        "--mean",
        type=float,
        nargs="+",
        default=None,
        help="per-channel mean the model normalises its inputs by, inside the model (with --std); "
        "radii and the [0, 1] box stay in pixel space",
    )
    parser.add_argument("--std", type=float, nargs="+", default=None, help="per-channel std (with --mean)")
    parser.add_argument(
        "--out", default=None, help="run folder (default runs/<data>-<model>-<method>-<budget>-seed<seed>)"
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def config_from_args(args: argparse.Namespace):
    overrides = {name.replace("-", "_"): getattr(args, name.replace("-", "_")) for name, _, _ in CONFIG_FLAGS}
    overrides.update(
        method=args.method,
        data=args.data,
        model=args.model,
        preset=args.preset,
        schedule=args.schedule,
        milestones=args.milestones,
        augment=args.augment,
        amp=args.amp,
        compile=args.compile,
        mean=args.mean,
        std=args.std,
        budget="full" if args.full else None,
    )
    return resolve_config(overrides)


def default_out_dir(cfg) -> str:
    return os.path.join("runs", f"{cfg.data}-{cfg.model}-{cfg.method}-{cfg.budget}-seed{cfg.seed}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = config_from_args(args)
        out_dir = args.out or default_out_dir(cfg)
        say(
            f"lfr-train: {cfg.method} on {cfg.data} ({cfg.budget} budget), {cfg.model}, eps {cfg.eps:g}, "
            f"{cfg.steps} x {cfg.step_size:g}, {cfg.epochs} epochs -> {out_dir}"
            + (f" on {os.environ['WORLD_SIZE']} ranks" if launched_by_torchrun() else "")
        )
        result = train(
            cfg, out_dir, resume=args.resume, device=args.device, data_dir=args.data_dir, progress=not args.no_progress
        )
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as exc:
        print(f"lfr-train: error: {exc}", file=sys.stderr)
        return 2
    best = result.history[result.best_epoch - 1] if result.best_epoch else None
    if best is not None:
        robust = (
            "" if best["val_robust_acc"] != best["val_robust_acc"] else f", val robust {best['val_robust_acc']:.3f}"
        )
        say(
            f"done: best epoch {result.best_epoch} (val clean {best['val_clean_acc']:.3f}{robust}); "
            f"checkpoints in {out_dir}"
        )
    else:
        say(f"done: no epoch qualified as best (every epoch at chance level); checkpoints in {out_dir}")
    return 0


def say(message: str) -> None:
    """Print on rank 0 only (every process of a torchrun job runs this command)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, flush=True)


if __name__ == "__main__":
    sys.exit(main())
