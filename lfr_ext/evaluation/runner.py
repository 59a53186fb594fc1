"""Evaluate a trained run folder, or weights saved by any code, on a dataset's test images: the
result of :func:`lfr_ext.evaluate_model` is written to ``evaluation.json`` and, with AutoAttack,
a RobustBench-shaped ``robustbench.json``."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict

import torch
from torch import nn

from .._version import __version__
from ..data import DATASETS, load_dataset
from ..models import build_model
from ..training.checkpoint import atomic_write_text, load_checkpoint
from ..training.config import TrainConfig, build_run_model
from ..training.monitor import accuracy, nan_to_none
from .model_eval import EvalConfig, evaluate_model, pixel_classifier
from .weights import load_weights


def load_trained_model(
    run_dir: str, which: str = "best", device: str | torch.device = "cpu"
) -> tuple[nn.Module, TrainConfig, dict]:
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
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    checkpoint = load_checkpoint(path, map_location=device)
    cfg = TrainConfig.from_dict(checkpoint["config"])
    model = build_run_model(cfg)
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), cfg, {"checkpoint": which, "epoch": checkpoint["epoch"], "sha256": digest}


def evaluate_run(
    run_dir: str,
    ecfg: EvalConfig,
    *,
    which: str = "best",
    eps: float | None = None,
    data_dir: str | None = None,
    device: str | torch.device = "cpu",
    resume: bool = False,
    log=print,
) -> dict:
    """Evaluate ``run_dir``'s checkpoint; returns the result dict and writes evaluation.json
    (and robustbench.json) into the run folder. ``resume``: keep an evaluation.json made of the
    same checkpoint file with the same eps and budget (a killed multi-run evaluation goes on
    from the next run; attacks are seeded, so the kept result is the one a rerun would give)."""
    model, cfg, ckpt = load_trained_model(run_dir, which, device)
    eps = cfg.eps if eps is None else eps
    kept = _kept_result(run_dir, ckpt, eps, ecfg, _environment(device, data_dir)) if resume else None
    if kept is not None:
        log(f"{run_dir}: evaluated before with this checkpoint, eps and budget, kept")
        return kept
    log(f"{run_dir} ({cfg.method}, {ckpt['checkpoint']} checkpoint, epoch {ckpt['epoch']}): eps {eps:g}")
    result = evaluate_on_dataset(model, cfg.data, ecfg, eps=eps, data_dir=data_dir, device=device, log=log)
    result.update({"run_dir": run_dir, "method": cfg.method, "model": cfg.model, "checkpoint": ckpt})
    write_results(run_dir, result, name=os.path.basename(os.path.normpath(run_dir)), architecture=cfg.model)
    return result


_ENVIRONMENT_KEYS = ("device", "torch", "lfr_ext", "data_dir")


def _environment(device, data_dir) -> dict:
    """What else decides an evaluation's numbers (a kept result must match it too)."""
    return {
        "device": str(device),
        "torch": torch.__version__,
        "lfr_ext": __version__,
        "data_dir": None if data_dir is None else os.path.abspath(data_dir),
    }


def _kept_result(run_dir: str, ckpt: dict, eps: float, ecfg: EvalConfig, now: dict) -> dict | None:
    path = os.path.join(run_dir, "evaluation.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        previous = json.load(f)
    same = (
        previous.get("checkpoint") == ckpt
        and previous.get("eps") == eps
        and previous.get("eval_config") == json.loads(json.dumps(asdict(ecfg)))
        and {k: previous.get(k) for k in _ENVIRONMENT_KEYS} == {k: now[k] for k in _ENVIRONMENT_KEYS}
    )
    return previous if same else None


def evaluate_weights(
    model_name: str,
    weights: str,
    data: str,
    ecfg: EvalConfig,
    *,
    eps: float,
    out_dir: str,
    data_dir: str | None = None,
    device: str | torch.device = "cpu",
    mean=None,
    std=None,
    logits=None,
    log=print,
) -> dict:
    """Evaluate weights saved by any code (see :func:`load_weights`) in an ``lfr_ext.models``
    architecture; writes evaluation.json and robustbench.json into ``out_dir``."""
    if data not in DATASETS:
        raise ValueError(f"unknown dataset {data!r}; choose from {sorted(DATASETS)}")
    info = DATASETS[data]
    model = build_model(
        model_name, in_channels=info.in_channels, num_classes=info.num_classes, image_size=info.image_size
    )
    load_weights(model, weights)
    model = model.to(device).eval()
    log(f"{weights} ({model_name} on {data}): eps {eps:g}")
    result = evaluate_on_dataset(
        model, data, ecfg, eps=eps, data_dir=data_dir, device=device, mean=mean, std=std, logits=logits, log=log
    )
    result.update({"weights": os.path.abspath(weights), "model": model_name})
    write_results(out_dir, result, name=os.path.splitext(os.path.basename(weights))[0], architecture=model_name)
    return result


def evaluate_on_dataset(
    model: nn.Module,
    data: str,
    ecfg: EvalConfig,
    *,
    eps: float,
    data_dir: str | None,
    device,
    mean=None,
    std=None,
    logits=None,
    log=print,
) -> dict:
    """:func:`evaluate_model` on the first ``ecfg.n`` test images of ``data``, plus the clean
    accuracy on ``ecfg.clean_n`` of them (0: all). Returns the JSON-ready result dict."""
    info = DATASETS[data]
    x_test, y_test = load_dataset(data, "test", data_dir)
    n = min(ecfg.n, len(x_test))
    evaluation = evaluate_model(
        model,
        x_test[:n].to(device),
        y_test[:n].to(device),
        eps=eps,
        config=ecfg,
        mean=mean,
        std=std,
        logits=logits,
        num_classes=info.num_classes,
        landscape=True,
        log=log,
    )
    clean_n = ecfg.clean_n or len(x_test)
    net = pixel_classifier(model, mean, std, logits)
    with torch.no_grad():
        clean_full = accuracy(net.eval(), x_test[:clean_n].to(device), y_test[:clean_n].to(device), ecfg.batch_size)
    result = evaluation.to_dict()
    result["robustbench"] = evaluation.robustbench(dataset=data) if "AutoAttack" in evaluation.accuracy else None
    result.update(
        {
            "data": data,
            "clean_full_test": clean_full,
            "clean_n": clean_n,
            "eval_config": result.pop("config"),
            **_environment(device, data_dir),
        }
    )
    return result


def write_results(out_dir: str, result: dict, *, name: str, architecture: str) -> None:
    """``evaluation.json`` (everything) and, with AutoAttack, ``robustbench.json`` in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    if result.get("robustbench"):
        result["robustbench"].update({"name": name, "architecture": architecture})
        atomic_write_text(os.path.join(out_dir, "robustbench.json"), json.dumps(result["robustbench"], indent=1))
    atomic_write_text(os.path.join(out_dir, "evaluation.json"), json.dumps(nan_to_none(result), indent=1))
