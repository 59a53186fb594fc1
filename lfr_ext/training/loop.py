"""The training loop: one method, one run folder, resumable after a crash at any moment.

A run folder holds::

    config.json     the resolved TrainConfig
    last.pt         model, optimizer, scheduler, RNG states, history; after every epoch
    best.pt         the model with the best robust validation accuracy so far (no collapse)
    metrics.csv     one row per completed epoch (same rows as metrics.json)
    metrics.json
    summary.json    written when the last epoch is done

Reproducibility: the model is initialised after seeding every global RNG with ``seed``; the
data order and augmentation are functions of (seed, epoch) (see data_order.py); the global
RNGs that the methods draw from (LFR's start noise, PGD's random start, Dropout) are saved
with each checkpoint and restored on resume. A run killed mid-epoch restarts that epoch
from the state at its beginning and, on the same machine and thread count, ends with the
same weights and metrics as a run that was never interrupted.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..data import DATASETS, load_dataset
from . import parallel
from .checkpoint import atomic_torch_save, atomic_write_text, capture_rng_states, load_checkpoint, restore_rng_states
from .config import TrainConfig, build_run_model
from .data_order import epoch_batches, generator_for, random_crop_flip, split_train_val
from .methods import METHOD_STEPS
from .monitor import collapse_message, nan_to_none, validation_accuracies, write_metrics
from .step import GPU_SYNC_EVERY, RunningTotals, TrainingStep

BatchHook = Callable[[int, int], None]  # (epoch, batch index) -> None, called after each optimizer step


@dataclass
class TrainResult:
    """What a finished (or already complete) run reports."""

    out_dir: str
    config: TrainConfig
    history: list[dict]
    best_epoch: int | None
    model: nn.Module


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} asked for, but torch sees no CUDA GPU")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device
    np.random.seed(seed % 2**32)
    random.seed(seed)


def make_optimizer(model: nn.Module, cfg: TrainConfig):
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    else:  # multistep, or constant (no milestones)
        milestones = cfg.milestones if cfg.schedule == "multistep" else []
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=cfg.gamma)
    return optimizer, scheduler


def load_run_data(cfg: TrainConfig, data_dir: str | None):
    """(x_train, y_train, x_val, y_val) for the run, split by ``cfg.seed``."""
    x, y = load_dataset(cfg.data, "train", data_dir)
    split = split_train_val(len(x), val_size=cfg.val_size, train_subset=cfg.train_subset, seed=cfg.seed)
    return x[split.train], y[split.train], x[split.val], y[split.val]


def _config_mismatch(saved: dict, current: TrainConfig) -> list[str]:
    """Fields that differ; a field the saved run predates counts as its default value."""
    now = json.loads(current.to_json())
    defaults = json.loads(TrainConfig().to_json())
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    return [
        f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
    ]


def train(
    cfg: TrainConfig,
    out_dir: str,
    *,
    resume: bool = False,
    device: str = "auto",
    data_dir: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    batch_hook: BatchHook | None = None,
) -> TrainResult:
    """Train ``cfg.method`` into ``out_dir``; continue from ``out_dir/last.pt`` if ``resume``.

    Under ``torchrun`` with several processes every rank trains its share of each batch with
    DistributedDataParallel and rank 0 writes the run folder (see :mod:`.parallel`); a group
    that torchrun restarted resumes by itself.

    Raises FileExistsError when ``out_dir`` already holds a checkpoint and ``resume`` is False,
    and ValueError when resuming under a different configuration or world size.
    """
    cfg.validate()
    dev = resolve_device(device)
    with parallel.process_group(dev) as ranks:
        return _train(
            cfg,
            out_dir,
            resume=resume,
            dev=parallel.device_for(dev, ranks),
            ranks=ranks,
            data_dir=data_dir,
            progress=progress and ranks.main,
            log=log if ranks.main else _silent,
            batch_hook=batch_hook,
        )


def _silent(message: str) -> None:
    pass


def _train(
    cfg: TrainConfig,
    out_dir: str,
    *,
    resume: bool,
    dev: torch.device,
    ranks: parallel.Ranks,
    data_dir: str | None,
    progress: bool,
    log: Callable[[str], None],
    batch_hook: BatchHook | None,
) -> TrainResult:
    if cfg.amp == "fp16" and dev.type != "cuda":
        raise ValueError("amp='fp16' (autocast with a GradScaler) needs a CUDA GPU; use amp='bf16' on the CPU")
    if ranks.parallel and cfg.batch_size % ranks.world:
        raise ValueError(
            f"batch_size={cfg.batch_size} must be a multiple of the {ranks.world} ranks: every rank trains "
            "an equal share of each batch"
        )
    info = DATASETS[cfg.data]
    if ranks.main:
        os.makedirs(out_dir, exist_ok=True)
    last_path = os.path.join(out_dir, "last.pt")
    checkpoint = None
    if os.path.exists(last_path):
        checkpoint = load_checkpoint(last_path)
        # A group torchrun restarted continues its own job's checkpoint without being told.
        resume = resume or (parallel.restarted_by_torchrun() and checkpoint.get("job") == parallel.job_id())
        if not resume:
            raise FileExistsError(
                f"{out_dir} already holds a run (last.pt); pass --resume to continue it, or choose another --out"
            )
        mismatch = _config_mismatch(checkpoint["config"], cfg)
        if checkpoint.get("world_size", 1) != ranks.world:
            mismatch.append(f"world size: saved {checkpoint.get('world_size', 1)}, now {ranks.world}")
        if mismatch:
            raise ValueError(f"cannot resume {out_dir} under a different configuration: " + "; ".join(mismatch))
    elif resume:
        log(f"{out_dir}: no checkpoint yet, starting from epoch 1")

    x_train, y_train, x_val, y_val = load_run_data(cfg, data_dir)
    _check_inputs(x_train, "training")
    seed_everything(cfg.seed)
    model = build_run_model(cfg).to(dev)
    if ranks.parallel:
        torch.manual_seed(parallel.rank_seed(cfg.seed, ranks.rank))  # each rank its own draws
    optimizer, scheduler = make_optimizer(model, cfg)
    history: list[dict] = []
    best_robust, best_epoch = -math.inf, None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        restore_rng_states(checkpoint["rng_per_rank"][ranks.rank] if ranks.parallel else checkpoint["rng"])
        history, best_robust, best_epoch = checkpoint["history"], checkpoint["best_robust"], checkpoint["best_epoch"]
        log(f"{out_dir}: resuming after epoch {checkpoint['epoch']} of {cfg.epochs}")
    if ranks.main:
        atomic_write_text(os.path.join(out_dir, "config.json"), cfg.to_json())
    wrapped = parallel.wrap(model, dev, ranks)

    training_step = TrainingStep(wrapped, optimizer, METHOD_STEPS[cfg.method], cfg, dev, log=log)
    if checkpoint is not None and training_step.grad_scaler is not None and checkpoint.get("grad_scaler"):
        training_step.grad_scaler.load_state_dict(checkpoint["grad_scaler"])
    for epoch in range(len(history) + 1, cfg.epochs + 1):
        started = time.perf_counter()
        train_stats = _train_one_epoch(
            wrapped, training_step, x_train, y_train, cfg, epoch, dev, ranks, progress, batch_hook
        )
        parallel.average_running_statistics(model, ranks)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        val_clean, val_robust = validation_accuracies(
            model,
            x_val.to(dev),
            y_val.to(dev),
            robust_size=cfg.val_robust_size,
            eps=cfg.eps,
            steps=cfg.val_attack_steps,
            seed=cfg.seed,
        )
        row = dict(
            epoch=epoch,
            lr=lr,
            **train_stats,
            val_clean_acc=val_clean,
            val_robust_acc=val_robust,
            epoch_seconds=time.perf_counter() - started,
            is_best=False,
            collapse="",
        )
        history.append(row)
        row["collapse"] = collapse_message(history, info.num_classes, cfg.collapse_margin)
        # The best model is chosen on robust accuracy (clean accuracy when there is no robust
        # monitor), never from a collapsed epoch.
        score = val_robust if not math.isnan(val_robust) else val_clean
        if not row["collapse"] and score > best_robust:
            best_robust, best_epoch, row["is_best"] = score, epoch, True
            if ranks.main:
                atomic_torch_save(
                    {"model": model.state_dict(), "epoch": epoch, "config": json.loads(cfg.to_json()), "metrics": row},
                    os.path.join(out_dir, "best.pt"),
                )
        rng_per_rank = parallel.gather_objects(capture_rng_states(), ranks)
        if ranks.main:
            atomic_torch_save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rng_per_rank[0],
                    "epoch": epoch,
                    "history": history,
                    "best_robust": best_robust,
                    "best_epoch": best_epoch,
                    "config": json.loads(cfg.to_json()),
                    "world_size": ranks.world,
                    "job": parallel.job_id(),
                    **({"rng_per_rank": rng_per_rank} if ranks.parallel else {}),
                    **({"grad_scaler": training_step.grad_scaler.state_dict()} if training_step.grad_scaler else {}),
                },
                last_path,
            )
            write_metrics(history, os.path.join(out_dir, "metrics.csv"), os.path.join(out_dir, "metrics.json"))
        parallel.barrier(ranks)  # a rank that dies from here on resumes from this checkpoint
        log(_epoch_line(cfg, row))
        if row["collapse"]:
            log(f"WARNING {cfg.method}: {row['collapse']}")

    summary = {
        "method": cfg.method,
        "epochs": len(history),
        "best_epoch": best_epoch,
        "final": history[-1],
        "best": history[best_epoch - 1] if best_epoch else None,
        "collapsed_epochs": [h["epoch"] for h in history if h["collapse"].startswith("COLLAPSE")],
        "mean_epoch_seconds": sum(h["epoch_seconds"] for h in history) / len(history),
        "device": str(dev),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps_ran": training_step.describe(),
        "world_size": ranks.world,
        "per_rank_batch_size": cfg.batch_size // ranks.world,
    }
    if ranks.main:
        atomic_write_text(os.path.join(out_dir, "summary.json"), json.dumps(nan_to_none(summary), indent=2))
    return TrainResult(out_dir, cfg, history, best_epoch, model)


def _check_inputs(x: torch.Tensor, split: str) -> None:
    """The inputs lie in [0, 1] (the box every method projects onto) and are finite: checked
    once per run, so that the steps need not sync to check every batch."""
    if len(x) and not bool(((x >= 0) & (x <= 1)).all()):
        raise ValueError(
            f"the {split} images must lie in [0, 1]; got values in [{x.min().item():g}, {x.max().item():g}]"
        )


def _train_one_epoch(
    model,
    training_step: TrainingStep,
    x_train,
    y_train,
    cfg: TrainConfig,
    epoch: int,
    dev,
    ranks: parallel.Ranks,
    progress: bool,
    batch_hook: BatchHook | None,
) -> dict:
    """One pass over the epoch's global batches (this rank's share of each); returns mean loss,
    penalty and accuracy over all ranks."""
    model.train()
    batches = epoch_batches(len(x_train), cfg.batch_size, seed=cfg.seed, epoch=epoch)
    augment_rng = generator_for(cfg.seed, epoch, 0xA06) if cfg.augment else None
    totals = RunningTotals(dev)
    sync_every = GPU_SYNC_EVERY if dev.type == "cuda" else 1  # reading the totals is a host sync
    bar = _progress_bar(batches, f"{cfg.method} {epoch}/{cfg.epochs}") if progress else None
    for index, batch in enumerate(batches if bar is None else bar):
        x, y = x_train[batch], y_train[batch]
        if augment_rng is not None:
            x = random_crop_flip(x, augment_rng)  # the global batch: the same draws at every world size
        if ranks.parallel:
            share = parallel.shard(torch.arange(len(batch)), ranks)
            if share is None:
                continue
            x, y = x[share], y[share]
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        totals.add(training_step(x, y), y)
        if bar is not None and (index + 1) % sync_every == 0:
            means = totals.means()
            penalty = means["train_penalty"]
            bar.set_postfix(
                loss=f"{means['train_loss']:.3f}",
                pen="-" if math.isnan(penalty) else f"{penalty:.3f}",
                acc=f"{means['train_acc']:.3f}",
                refresh=False,
            )
        if batch_hook is not None:
            batch_hook(epoch, index)
    if bar is not None:
        bar.close()
    totals.sum_over(ranks)
    return totals.means()


def _progress_bar(batches, description: str):
    """A tqdm bar over the batches, or None when tqdm is not installed (the ``train`` extra)."""
    if importlib.util.find_spec("tqdm") is None:
        return None
    from tqdm.auto import tqdm

    return tqdm(batches, desc=description, leave=False, dynamic_ncols=True)


def _epoch_line(cfg: TrainConfig, row: dict) -> str:
    penalty = "" if math.isnan(row["train_penalty"]) else f" penalty {row['train_penalty']:.4f}"
    robust = (
        ""
        if math.isnan(row["val_robust_acc"])
        else f" PGD-{cfg.val_attack_steps}(eps {cfg.eps:g}) {row['val_robust_acc']:.3f}"
    )
    return (
        f"{cfg.method} epoch {row['epoch']}/{cfg.epochs}: loss {row['train_loss']:.4f}{penalty} "
        f"train acc {row['train_acc']:.3f} | val clean {row['val_clean_acc']:.3f}{robust} | "
        f"{row['epoch_seconds']:.1f} s{' [best]' if row['is_best'] else ''}"
    )
