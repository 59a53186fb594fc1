"""Training configuration: presets, the small default budget, and flag overrides.

A run's configuration is resolved in three layers, later ones winning:

1. the **preset** of the dataset (``--preset``, default: the one named like ``--data``);
2. the **budget**: ``quick`` (the default: a train subset, few epochs and fewer ascent steps,
   so that one method trains on a 2-core CPU in about a minute or two) or ``full``
   (``--full``: the whole dataset and the preset's schedule);
3. every flag given on the command line.

The resolved :class:`TrainConfig` is saved as ``config.json`` in the run folder, and ``--resume``
refuses to continue a run under a different configuration.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

METHODS = ("lfr", "pgd_at", "trades", "plain", "gradnorm", "igr", "cure", "gradalign", "llr")
SCHEDULES = ("multistep", "cosine", "constant")
AMP_MODES = ("none", "bf16", "fp16")  # mixed precision of the training step (torch.autocast)


@dataclass
class TrainConfig:
    """Everything that determines a training run (and nothing that does not, like paths)."""

    method: str = "lfr"
    data: str = "fashion-mnist"
    model: str = "small_cnn"
    preset: str = "fashion-mnist"
    budget: str = "quick"
    seed: int = 0
    # optimisation
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "multistep"
    milestones: list[int] = field(default_factory=lambda: [15, 25])  # epochs where lr *= gamma
    gamma: float = 0.1
    augment: bool = False  # random crop (pad 4) + horizontal flip, for CIFAR
    # threat model and the methods' inner maximisation (L-inf, inputs in [0, 1])
    eps: float = 0.1
    step_size: float = 0.01
    steps: int = 20
    lam: float = 0.02  # LFR weight
    trades_beta: float = 6.0  # TRADES weight (Zhang et al.'s MNIST/CIFAR value)
    # weight of the gradient penalty of gradnorm, igr, cure, gradalign, llr (None: the method's published
    # default, lfr_ext.training.methods.PENALTY_DEFAULTS)
    penalty_weight: float | None = None
    # data budget and monitoring
    train_subset: int = 0  # 0: every training image that is not held out for validation
    val_size: int = 1000  # held out from the training split, fixed by the seed
    val_robust_size: int = 500  # first images of the validation split attacked each epoch
    val_attack_steps: int = 10  # PGD steps of that monitor (step 2.5 * eps / steps)
    collapse_margin: float = 0.05  # clean accuracy <= chance + margin counts as a collapse
    # mixed precision: autocast in bf16, or fp16 with a GradScaler (CUDA only)
    amp: str = "none"
    # torch.compile: LFR's inner and penalty steps compiled whole (hvp='compiled'), the other
    # methods' model compiled
    compile: bool = False
    # inputs normalised inside the model, (x - mean) / std per channel (lfr_ext.PixelClassifier):
    # every radius and the [0, 1] box stay in pixel space; None: no normalisation
    mean: list[float] | None = None
    std: list[float] | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown configuration keys: {', '.join(unknown)}")
        return cls(**values)

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the first bad field; return self."""
        from ..data import DATASETS
        from ..models import MODELS

        checks = [
            (self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {self.method!r}"),
            (self.data in DATASETS, f"data must be one of {', '.join(DATASETS)}, got {self.data!r}"),
            (self.model in MODELS, f"model must be one of {', '.join(MODELS)}, got {self.model!r}"),
            (self.preset in PRESETS, f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}"),
            (self.budget in BUDGETS, f"budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"),
            (self.amp in AMP_MODES, f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}"),
            (
                not (self.compile and self.amp == "fp16"),
                "compile with amp='fp16' is not supported (the compiled LFR engine takes no GradScaler); "
                "use amp='bf16'",
            ),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.eps >= 0, f"eps must be >= 0, got {self.eps}"),
            (self.steps >= 0, f"steps must be >= 0, got {self.steps}"),
            (self.steps == 0 or self.step_size > 0, f"step_size must be > 0, got {self.step_size}"),
            (self.lam >= 0, f"lam must be >= 0, got {self.lam}"),
            (
                self.penalty_weight is None or self.penalty_weight >= 0,
                f"penalty_weight must be >= 0, got {self.penalty_weight}",
            ),
            (self.train_subset >= 0, f"train_subset must be >= 0 (0: all), got {self.train_subset}"),
            (self.val_size >= 1, f"val_size must be >= 1, got {self.val_size}"),
            (
                0 <= self.val_robust_size <= self.val_size,
                f"val_robust_size must be in [0, val_size={self.val_size}], got {self.val_robust_size}",
            ),
            (self.val_attack_steps >= 1, f"val_attack_steps must be >= 1, got {self.val_attack_steps}"),
            (all(m >= 1 for m in self.milestones), f"milestones must be epochs >= 1, got {self.milestones}"),
            ((self.mean is None) == (self.std is None), "give both mean and std, or neither"),
            (self.std is None or all(v > 0 for v in self.std), f"std must be positive, got {self.std}"),
            (
                self.mean is None or len(self.mean) in (1, DATASETS[self.data].in_channels),
                f"mean/std need 1 or {DATASETS[self.data].in_channels if self.data in DATASETS else '?'} values "
                f"(one per channel), got {self.mean}",
            ),
            (self.mean is None or len(self.mean) == len(self.std), "mean and std need as many values"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self


# The authors' settings (Xu et al., ICIP 2020, on top of the TRADES code base) and a
# Fashion-MNIST preset with the eps conventional for that set.
PRESETS: dict[str, dict] = {
    "fashion-mnist": dict(
        data="fashion-mnist",
        model="small_cnn",
        eps=0.1,
        step_size=0.01,
        steps=20,
        lam=0.02,
        lr=0.01,
        momentum=0.9,
        weight_decay=0.0,
        batch_size=128,
        epochs=30,
        milestones=[15, 25],
        augment=False,
    ),
    "mnist": dict(  # authors' MNIST SmallCNN: eps 0.3, 40 x 0.01, lam 0.02, SGD 0.01, batch 128
        data="mnist",
        model="small_cnn",
        eps=0.3,
        step_size=0.01,
        steps=40,
        lam=0.02,
        lr=0.01,
        momentum=0.9,
        weight_decay=0.0,
        batch_size=128,
        epochs=100,
        milestones=[55, 75, 90],
        augment=False,
    ),
    "cifar10": dict(  # authors' CIFAR-10 ResNet-20: eps 0.031, 10 x 0.007, lam 0.03, SGD 0.1, wd 2e-4
        data="cifar10",
        model="resnet20",
        eps=0.031,
        step_size=0.007,
        steps=10,
        lam=0.03,
        lr=0.1,
        momentum=0.9,
        weight_decay=2e-4,
        batch_size=128,
        epochs=100,
        milestones=[50, 75],
        augment=True,
    ),
}

# The quick budget: what `lfr-train` runs by default, sized so that `lfr-compare` trains and
# evaluates all four methods on a 2-core CPU in about 10 minutes (README). Batch 64 and lr 0.05
# because a 3-epoch run needs more optimizer steps than the preset's 128 / 0.01 give.
BUDGETS: dict[str, dict] = {
    "quick": dict(
        train_subset=5000,
        epochs=3,
        batch_size=64,
        lr=0.05,
        milestones=[3],
        steps=5,
        step_size_factor=2.5,
        val_robust_size=200,
    ),
    "full": dict(),
}


def build_run_model(cfg: TrainConfig):
    """The model a run trains and evaluates: ``cfg.model`` for ``cfg.data``, inside
    :class:`lfr_ext.PixelClassifier` when the run normalises its inputs (its state_dict keys
    then carry a ``model.`` prefix)."""
    from ..classifier import PixelClassifier
    from ..data import DATASETS
    from ..models import build_model

    info = DATASETS[cfg.data]
    model = build_model(
        cfg.model, in_channels=info.in_channels, num_classes=info.num_classes, image_size=info.image_size
    )
    return model if cfg.mean is None else PixelClassifier(model, mean=cfg.mean, std=cfg.std)


def resolve_config(overrides: dict) -> TrainConfig:
    """Preset, then budget, then explicit ``overrides`` (keys of :class:`TrainConfig`; None
    values are ignored). The preset defaults to the dataset's name."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    preset = overrides.get("preset") or overrides.get("data") or "fashion-mnist"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[preset], preset=preset)
    budget = overrides.get("budget", "quick")
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
    values.update(_budget_values(BUDGETS[budget], values), budget=budget)
    values.update(overrides)
    return TrainConfig.from_dict(values).validate()


def _budget_values(budget: dict, preset_values: dict) -> dict:
    """The budget's fields. With fewer ascent steps the step size follows Madry et al.'s rule
    ``step_size = step_size_factor * eps / steps`` (factor 2.5), so the ascent still spans the ball."""
    values = dict(budget)
    factor = values.pop("step_size_factor", None)
    if factor is not None:
        values["step_size"] = round(factor * preset_values["eps"] / values["steps"], 6)
    return values
