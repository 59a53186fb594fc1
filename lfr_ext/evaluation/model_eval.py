r"""``lfr_ext.evaluate_model``: the robustness evaluation of any classifier, independent of lfr-train.

On (N, C, H, W) test images ``x`` in [0, 1] with labels ``y`` it runs, on the same points, clean
accuracy, FGSM, PGD-k with restarts, the black-box Square attack and the standard AutoAttack
(:mod:`.attacks`), then the accuracy-vs-eps curve, the mean local flatness LF(x) and the
gradient-masking checks (:mod:`.sanity`). A model that normalises its inputs or returns a tuple
or dict is wrapped in :class:`lfr_ext.PixelClassifier` (``mean``, ``std``, ``logits``), so the
attack radius and the box are in pixel space. The model's modes and buffers are given back as
they were; nothing is written to disk (``lfr-eval`` writes the result files).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .._rng import preserved_rng
from .._state import preserved_state
from .._validation import LABEL_DTYPES
from ..classifier import PixelClassifier
from ..penalty import local_flatness
from .attacks import AttackSuite, accuracy_vs_eps, run_attacks
from .landscape import loss_slices
from .sanity import accuracy_reaches_zero, black_box_not_better, sampling_tolerance, stronger_attacks_not_weaker


@dataclass(frozen=True)
class EvalConfig:
    """How hard to evaluate. ``n``: first n test images for every attack (same points, so the
    per-sample worst case is meaningful). The eps grid is the eps times ``eps_factors``, plus
    ``eps_max`` (an attacker that must win). ``autoattack_impl``: "reference" (Croce & Hein's
    code, packaged as pyautoattack) or "torchattacks" (see :mod:`.attacks`)."""

    # The quick budget attacks 100 test images: AutoAttack's reference settings cost ~2 s per
    # image per model on a 2-core CPU, and the default job must finish in about 10 minutes.
    n: int = 100
    clean_n: int = 0  # test images for the whole-test-set clean accuracy (0: all; lfr-eval only)
    pgd_steps: int = 20
    pgd_restarts: int = 2
    square_queries: int = 500
    autoattack: bool = True
    autoattack_impl: str = "reference"
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
    "full": EvalConfig(
        n=10000, pgd_steps=40, pgd_restarts=5, square_queries=5000, curve_n=1000, curve_steps=20, lf_n=10000
    ),
}


@dataclass
class Evaluation:
    """What :func:`evaluate_model` measured. Accuracies are fractions in [0, 1] on the same
    ``n`` points; ``robust`` is the per-sample worst case (correct under every attack) and
    ``correct`` each attack's per-sample correctness (what paired comparisons of models on the
    same points need, :mod:`.paired`); ``flags`` lists the failed gradient-masking checks (and
    AutoAttack's own warnings)."""

    eps: float
    n: int
    accuracy: dict[str, float]
    worst_case: float
    robust: list[bool]
    attack_order: list[str]
    attack_seconds: dict[str, float]
    accuracy_vs_eps: dict
    local_flatness: dict
    sanity: list[dict]
    flags: list[str]
    autoattack: dict = field(default_factory=dict)
    landscape: dict | None = None
    seconds: float = 0.0
    config: dict = field(default_factory=dict)
    correct: dict[str, list[bool]] = field(default_factory=dict)  # last: positional construction keeps working

    def to_dict(self) -> dict:
        return asdict(self)

    def robustbench(self, *, dataset: str, name: str | None = None, architecture: str | None = None) -> dict:
        """The result in the shape of a RobustBench model-info entry (accuracies in percent,
        two decimals, as strings), plus ``n_examples`` and ``threat_model``. Needs AutoAttack."""
        if "AutoAttack" not in self.accuracy:
            raise ValueError("a RobustBench entry reports AutoAttack accuracy: evaluate with autoattack=True")
        return {
            "name": name,
            "architecture": architecture,
            "dataset": dataset,
            "threat_model": "Linf",
            "eps": _eps_text(self.eps),
            "n_examples": self.n,
            "clean_acc": f"{100 * self.accuracy['clean']:.2f}",
            "autoattack_acc": f"{100 * self.accuracy['AutoAttack']:.2f}",
            "additional_data": None,
            "number_forward_passes": 1,
            "link": None,
            "authors": None,
            "venue": None,
            "reported": None,
            "footnote": f"AutoAttack standard version ({self.autoattack.get('implementation')}), evaluated by lfr_ext",
        }


def _eps_text(eps: float) -> str:
    """8/255 as RobustBench writes it (radii of up to 16/255), else the number (8/255 vs 0.031 is a
    1.4-point difference in published tables, auto-attack #54)."""
    numerator = eps * 255
    if abs(numerator - round(numerator)) < 1e-4 and 1 <= round(numerator) <= 16:  # 0.0313725 is 8/255 too
        return f"{round(numerator)}/255"
    return f"{eps:g}"


def pixel_classifier(model: nn.Module, mean=None, std=None, logits=None) -> nn.Module:
    """``model`` in a :class:`lfr_ext.PixelClassifier` when any of ``mean``, ``std``, ``logits`` is
    given (which checks them: ``std`` without ``mean`` is an error), else ``model`` itself."""
    if mean is None and std is None and logits is None:
        return model
    return PixelClassifier(model, mean=mean, std=std, logits=logits)


def check_inputs(x: torch.Tensor, y: torch.Tensor, eps: float, num_classes: int | None) -> None:
    """Clear errors for what would make an evaluation meaningless."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor of images in [0, 1]")
    if not isinstance(y, torch.Tensor) or y.dtype not in LABEL_DTYPES:
        raise TypeError("y must be an integer tensor of class labels")
    if x.dim() < 2 or y.shape != (x.shape[0],):
        raise ValueError(f"x must be (N, ...) and y (N,); got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError("x holds no images")
    if not torch.isfinite(x).all() or x.min().item() < 0 or x.max().item() > 1:
        raise ValueError(
            f"x must lie in [0, 1] (pixel space; give mean/std for a model that normalises), "
            f"got [{x.min().item():.4g}, {x.max().item():.4g}]"
        )
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if num_classes is not None and (y.min().item() < 0 or y.max().item() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min().item()}, {y.max().item()}]")


@torch.no_grad()
def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    logits = model(x[:1])
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise TypeError(
            f"the model must return (B, K) logits; got {type(logits).__name__} "
            f"{tuple(getattr(logits, 'shape', ()))} (pass logits= to select them from a tuple or dict)"
        )
    return logits.shape[1]


def mean_local_flatness(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int, batch_size: int
) -> float:
    """Mean LF(x) (the paper's metric, :func:`lfr_ext.local_flatness`) over (N, ...) ``x``."""
    values = [
        local_flatness(model, xb, yb, eps=eps, step_size=2.5 * eps / max(steps, 1), steps=steps)
        for xb, yb in zip(x.split(batch_size), y.split(batch_size))
    ]
    return torch.cat(values).mean().item()


def eps_grid(eps: float, factors, eps_max: float) -> list[float]:
    return sorted({0.0, *(round(eps * f, 6) for f in factors if eps * f < eps_max), eps_max})


def evaluate_model(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    config: EvalConfig | None = None,
    mean=None,
    std=None,
    logits=None,
    num_classes: int | None = None,
    landscape: bool = False,
    log=None,
) -> Evaluation:
    """Evaluate ``model`` on (N, C, H, W) images ``x`` in [0, 1] and (N,) labels ``y`` at L-inf
    radius ``eps`` (pixel space). The first ``config.n`` images are attacked (default: the
    quick budget, :data:`EVAL_BUDGETS`). ``mean``/``std``/``logits``: see
    :class:`lfr_ext.PixelClassifier`. ``landscape``: also the loss-landscape slices.
    """
    config = EVAL_BUDGETS["quick"] if config is None else config
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_inputs(x, y, eps, num_classes)
    net = pixel_classifier(model, mean, std, logits)
    started = time.perf_counter()
    # The attacks seed the global RNG (their random starts): put it back, so the caller's stream goes on unchanged.
    # (torchattacks and the reference AutoAttack seed CUDA too, also for CPU inputs.)
    with preserved_state(model), preserved_rng():
        net.eval()
        num_classes = num_classes or _num_classes(net, x)
        check_inputs(x, y, eps, num_classes)
        n = min(config.n, len(x))
        xs, ys = x[:n], y[:n].long()
        suite = AttackSuite(
            eps=eps,
            pgd_steps=config.pgd_steps,
            pgd_restarts=config.pgd_restarts,
            square_queries=config.square_queries,
            autoattack=config.autoattack,
            autoattack_impl=config.autoattack_impl,
            num_classes=num_classes,
            seed=config.seed,
        )
        attacks = run_attacks(net, xs, ys, suite, batch_size=config.batch_size, log=log)
        accuracies = {name: attacks.accuracy(name) for name in attacks.correct}
        worst = attacks.worst_case()

        grid = eps_grid(eps, config.eps_factors, config.eps_max)
        curve_x, curve_y = xs[: config.curve_n], ys[: config.curve_n]
        curve = accuracy_vs_eps(
            net, curve_x, curve_y, grid, steps=config.curve_steps, seed=config.seed, batch_size=config.batch_size
        )
        lf_x, lf_y = xs[: config.lf_n], ys[: config.lf_n]
        lf = mean_local_flatness(
            net, lf_x, lf_y, eps=eps, steps=config.lf_steps, batch_size=min(config.batch_size, 250)
        )
        slices = None
        if landscape:
            slices = loss_slices(
                net, xs[: config.landscape_points], ys[: config.landscape_points], radius=2 * eps, seed=config.seed
            )

    tol = sampling_tolerance(n)
    white_box = ["FGSM", suite.pgd_name]  # AutoAttack is left out: it ends with Square itself
    checks = [
        stronger_attacks_not_weaker(accuracies, ["clean", "FGSM", suite.pgd_name, "AutoAttack"], tol),
        black_box_not_better(accuracies, f"Square-{suite.square_queries}", white_box, tol),
        accuracy_reaches_zero(grid, curve, max_final=0.05, tolerance=sampling_tolerance(len(curve_x))),
    ]
    flags = [f"{c.name}: {c.detail}" for c in checks if not c.passed]
    flags += [f"AutoAttack: {warning}" for warning in attacks.autoattack.get("warnings", [])]
    return Evaluation(
        eps=eps,
        n=n,
        accuracy=accuracies,
        worst_case=worst.float().mean().item(),
        robust=worst.tolist(),
        attack_order=suite.names(),
        attack_seconds=attacks.seconds,
        accuracy_vs_eps={"eps": grid, "accuracy": curve, "n": len(curve_x), "attack": f"PGD-{config.curve_steps}"},
        local_flatness={"mean": lf, "n": len(lf_x), "steps": config.lf_steps},
        sanity=[c._asdict() for c in checks],
        flags=flags,
        autoattack=attacks.autoattack,
        landscape=slices,
        seconds=time.perf_counter() - started,
        config=asdict(config),
        correct={name: mask.tolist() for name, mask in attacks.correct.items()},
    )


__all__ = [
    "EVAL_BUDGETS",
    "EvalConfig",
    "Evaluation",
    "check_inputs",
    "eps_grid",
    "evaluate_model",
    "mean_local_flatness",
]
