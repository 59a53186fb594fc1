"""Per-epoch monitoring: validation accuracy (clean and under a fixed PGD), collapse detection,
and the metrics files (CSV and JSON, rewritten atomically from the run's history)."""

from __future__ import annotations

import csv
import io
import json
import math

import torch
from torch import nn

from .checkpoint import atomic_write_text
from .data_order import generator_for
from .methods import pgd_linf_ce

METRIC_FIELDS = [
    "epoch",
    "lr",
    "train_loss",
    "train_penalty",
    "train_acc",
    "val_clean_acc",
    "val_robust_acc",
    "epoch_seconds",
    "is_best",
    "collapse",
]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` (in its current mode) on (N, ...) inputs, (N,) labels."""
    if len(x) == 0:
        return float("nan")
    correct = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return correct / len(x)


def validation_accuracies(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    robust_size: int,
    eps: float,
    steps: int,
    seed: int,
    batch_size: int = 500,
) -> tuple[float, float]:
    """(clean accuracy on all of ``x``, accuracy under PGD-``steps`` on its first ``robust_size``).

    The PGD start comes from a private generator fixed by ``seed``, so the monitor never draws
    from the global RNG (which would shift a resumed run) and is the same attack every epoch.
    This is a cheap training-time monitor; the evaluation proper uses torchattacks.
    """
    was_training = model.training
    model.eval()
    try:
        clean = accuracy(model, x, y, batch_size)
        if robust_size == 0:
            return clean, float("nan")
        xr, yr = x[:robust_size], y[:robust_size]
        if eps == 0:
            return clean, accuracy(model, xr, yr, batch_size)
        generator = generator_for(seed, 0xA77AC)
        adv = [
            pgd_linf_ce(model, xb, yb, eps=eps, step_size=2.5 * eps / steps, steps=steps, generator=generator)
            for xb, yb in zip(xr.split(batch_size), yr.split(batch_size))
        ]
        return clean, accuracy(model, torch.cat(adv), yr, batch_size)
    finally:
        model.train(was_training)


def collapse_message(history: list[dict], num_classes: int, margin: float) -> str:
    """Non-empty when the latest clean validation accuracy is at chance level (<= 1/C + margin):
    a collapse if the model had been better before, else a model that has not learned yet."""
    chance = 1.0 / num_classes
    latest = history[-1]["val_clean_acc"]
    if not latest <= chance + margin:
        return ""
    best_before = max((h["val_clean_acc"] for h in history[:-1]), default=float("nan"))
    if best_before > chance + margin:
        return (
            f"COLLAPSE: clean accuracy fell to {latest:.3f} (chance {chance:.3f}) at epoch {history[-1]['epoch']}, "
            f"down from {best_before:.3f}"
        )
    return f"AT CHANCE: clean accuracy {latest:.3f} (chance {chance:.3f}) at epoch {history[-1]['epoch']}"


def write_metrics(history: list[dict], csv_path: str, json_path: str) -> None:
    """Rewrite both metrics files from the whole history (so they always match the checkpoint)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_FIELDS)
    writer.writeheader()
    for row in history:
        writer.writerow({k: _csv_value(row[k]) for k in METRIC_FIELDS})
    atomic_write_text(csv_path, buffer.getvalue())
    atomic_write_text(json_path, json.dumps(nan_to_none(history), indent=2))


def nan_to_none(value):
    """NaN (no penalty for this method, no robust monitor) as None, so files are strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [nan_to_none(v) for v in value]
    return value


def _csv_value(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value
