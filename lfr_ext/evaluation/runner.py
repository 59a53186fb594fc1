"""Evaluate one trained run: attacks, accuracy vs eps, local flatness, landscape slices and
the gradient-masking checks; the result is written to ``<run>/evaluation.json``."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

import lfr_ext

from ..data import DATASETS, load_dataset
from ..models import build_model
from ..training.checkpoint import atomic_write_text, load_checkpoint
from ..training.config import TrainConfig
from ..training.monitor import accuracy, nan_to_none
from .attacks import AttackSuite, accuracy_vs_eps, run_attacks
from .landscape import loss_slices
from .sanity import accuracy_reaches_zero, black_box_not_better, sampling_tolerance, stronger_attacks_not_weaker


@dataclass
class EvalConfig:
    """How hard to evaluate. ``n``: first n test images for every attack (same points, so the
    per-sample worst case is meaningful). The eps grid is the run's eps times ``eps_factors``,
    plus ``eps_max`` (an attacker that must win)."""

    # The quick budget attacks 100 test images: AutoAttack's reference settings cost ~2 s per
    # image per model on a 2-core CPU, and the default job must finish in about 10 minutes.
    n: int = 100
    clean_n: int = 0  # test images for the whole-test-set clean accuracy (0: all)
    pgd_steps: int = 20
    pgd_restarts: int = 2
    square_queries: int = 500
    autoattack: bool = True
    curve_n: int = 200
    curve_steps: int = 10
    eps_factors: tuple[float, ...] = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0)
    eps_max: float = 0.5
    lf_n: int = 200
    lf_steps: int = 10
    landscape_points: int = 8
    batch_size: int = 500
    seed: int = 0


EVAL_BUDGETS = {
    "quick": EvalConfig(),
    "full": EvalConfig(n=10000, pgd_steps=40, pgd_restarts=5, square_queries=5000, curve_n=1000, curve_steps=20,
                       lf_n=10000),
}


def load_trained_model(run_dir: str, which: str = "best", device: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig, dict]:
    """(model in eval mode, its TrainConfig, checkpoint info) from ``run_dir/{best,last}.pt``."""
    if which not in ("best", "last"):
        raise ValueError(f"checkpoint must be 'best' or 'last', got {which!r}")
    path = os.path.join(run_dir, f"{which}.pt")
    last = os.path.join(run_dir, "last.pt")
    if which == "best" and not os.path.exists(path) and os.path.exists(last):
        # No epoch qualified (every one at chance level): the last model is all there is.
        path, which = last, "last (no best: every epoch at chance level)"
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {run_dir} a finished lfr-train run folder?")
    checkpoint = load_checkpoint(path, map_location=device)
    cfg = TrainConfig.from_dict(checkpoint["config"])
    info = DATASETS[cfg.data]
    model = build_model(cfg.model, in_channels=info.in_channels, num_classes=info.num_classes,
                        image_size=info.image_size)
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), cfg, {"checkpoint": which, "epoch": checkpoint["epoch"]}


def eps_grid(eps: float, factors, eps_max: float) -> list[float]:
    return sorted({0.0, *(round(eps * f, 6) for f in factors if eps * f < eps_max), eps_max})


def mean_local_flatness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int,
                        batch_size: int) -> float:
    """Mean LF(x) (the paper's metric, :func:`lfr_ext.local_flatness`) over (N, ...) ``x``."""
    if eps == 0:
        steps = 0
    values = [lfr_ext.local_flatness(model, xb, yb, eps=eps, step_size=2.5 * eps / max(steps, 1), steps=steps)
              for xb, yb in zip(x.split(batch_size), y.split(batch_size))]
    return torch.cat(values).mean().item()


def evaluate_run(run_dir: str, ecfg: EvalConfig, *, which: str = "best", eps: float | None = None,
                 data_dir: str | None = None, device: str | torch.device = "cpu", log=print) -> dict:
    """Evaluate ``run_dir``'s checkpoint; returns the result dict and writes evaluation.json."""
    model, cfg, ckpt = load_trained_model(run_dir, which, device)
    eps = cfg.eps if eps is None else eps
    info = DATASETS[cfg.data]
    x_test, y_test = load_dataset(cfg.data, "test", data_dir)
    n = min(ecfg.n, len(x_test))
    x, y = x_test[:n].to(device), y_test[:n].to(device)
    log(f"{run_dir} ({cfg.method}, {ckpt['checkpoint']} checkpoint, epoch {ckpt['epoch']}): eps {eps:g} "
        f"on {n} test images")

    started = time.perf_counter()
    clean_n = ecfg.clean_n or len(x_test)
    clean_full = accuracy(model, x_test[:clean_n].to(device), y_test[:clean_n].to(device), ecfg.batch_size)
    suite = AttackSuite(eps=eps, pgd_steps=ecfg.pgd_steps, pgd_restarts=ecfg.pgd_restarts,
                        square_queries=ecfg.square_queries, autoattack=ecfg.autoattack, num_classes=info.num_classes,
                        seed=ecfg.seed)
    attacks = run_attacks(model, x, y, suite, batch_size=ecfg.batch_size, log=log)
    accuracies = {name: attacks.accuracy(name) for name in attacks.correct}
    worst = attacks.worst_case().float().mean().item()

    grid = eps_grid(eps, ecfg.eps_factors, ecfg.eps_max)
    curve = accuracy_vs_eps(model, x[:ecfg.curve_n], y[:ecfg.curve_n], grid, steps=ecfg.curve_steps, seed=ecfg.seed,
                            batch_size=ecfg.batch_size)
    lf = mean_local_flatness(model, x[:ecfg.lf_n], y[:ecfg.lf_n], eps=eps, steps=ecfg.lf_steps,
                             batch_size=min(ecfg.batch_size, 250))
    landscape = loss_slices(model, x[:ecfg.landscape_points], y[:ecfg.landscape_points], radius=2 * eps,
                            seed=ecfg.seed)

    tol = sampling_tolerance(n)
    # AutoAttack is left out of the white-box side: it ends with Square itself.
    white_box = ["FGSM", suite.pgd_name]
    checks = [
        stronger_attacks_not_weaker(accuracies, ["clean", "FGSM", suite.pgd_name, "AutoAttack"], tol),
        black_box_not_better(accuracies, f"Square-{suite.square_queries}", white_box, tol),
        accuracy_reaches_zero(grid, curve, max_final=0.05, tolerance=sampling_tolerance(len(x[:ecfg.curve_n]))),
    ]
    result = {
        "run_dir": run_dir, "method": cfg.method, "data": cfg.data, "model": cfg.model, "eps": eps,
        "checkpoint": ckpt, "n": n, "clean_full_test": clean_full, "clean_n": clean_n, "accuracy": accuracies,
        "worst_case": worst,
        "attack_seconds": attacks.seconds, "attack_order": suite.names(),
        "accuracy_vs_eps": {"eps": grid, "accuracy": curve, "n": len(x[:ecfg.curve_n]),
                            "attack": f"PGD-{ecfg.curve_steps}"},
        "local_flatness": {"mean": lf, "n": len(x[:ecfg.lf_n]), "steps": ecfg.lf_steps},
        "landscape": landscape,
        "sanity": [c._asdict() for c in checks], "flags": [f"{c.name}: {c.detail}" for c in checks if not c.passed],
        "eval_config": asdict(ecfg), "seconds": time.perf_counter() - started, "device": str(device),
        "torch": torch.__version__,
    }
    atomic_write_text(os.path.join(run_dir, "evaluation.json"), json.dumps(nan_to_none(result), indent=1))
    return result
