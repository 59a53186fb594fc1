"""Robustness under attacks from torchattacks and the reference AutoAttack, per attack and per sample.

AutoAttack (Croce & Hein 2020) is the reference implementation by default (fra31/auto-attack,
packaged on PyPI as ``pyautoattack`` 0.2.0, which imports only torch and numpy): RobustBench's
numbers come from it, with its checks (randomness, probability outputs, zero gradients, Square
better than the white-box attacks: its ``flags_doc``), which are collected as flags.
``autoattack_impl="torchattacks"`` rebuilds the same standard version from torchattacks' APGD,
APGD-T, FAB-T and Square (:func:`standard_autoattack`).

torchattacks is an optional dependency (extra ``[eval]``). Its 3.5.1 release declares
torchvision and ``requests~=2.25`` as requirements although its attacks import only torch,
numpy, scipy and tqdm; resolving those declarations next to a CPU torch pulls a multi-GB CUDA
torch or a torchvision that does not import. So it is installed without its declared
dependencies (:data:`INSTALL_COMMAND`), which leaves the user's torch alone.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

INSTALL_COMMAND = "pip install --no-deps torchattacks==3.5.1 pyautoattack==0.2.0 && pip install scipy tqdm"
AUTOATTACK_IMPLS = ("reference", "torchattacks")


def require_reference_autoattack():
    """Import the reference AutoAttack (pyautoattack), or raise ImportError saying how to install it."""
    try:
        import pyautoattack
    except ImportError as exc:
        raise ImportError(
            "the reference AutoAttack comes from pyautoattack, which is not installed:\n"
            f"    {INSTALL_COMMAND}\n(or evaluate with autoattack_impl='torchattacks')"
        ) from exc
    return pyautoattack


def require_torchattacks():
    """Import torchattacks, or raise ImportError that says how to install it safely."""
    try:
        import torchattacks
    except ImportError as exc:
        raise ImportError(
            "the evaluation attacks come from torchattacks, which is not installed. Install it without its "
            f"declared dependencies (they would replace your torch):\n    {INSTALL_COMMAND}\n"
            "(scripts/install.sh does this)"
        ) from exc
    return torchattacks


@dataclass
class AttackSuite:
    """Which attacks to run, at radius ``eps`` (L-inf, inputs in [0, 1]).

    ``pgd_steps`` / ``pgd_restarts``: PGD-k with a random start, repeated; a sample counts as
    robust only if it survives every restart. ``square_queries``: the black-box Square attack
    (a gradient-masking check). AutoAttack is always the standard version, by the reference
    code or by torchattacks (``autoattack_impl``).
    """

    eps: float
    pgd_steps: int = 20
    pgd_restarts: int = 2
    square_queries: int = 1000
    autoattack: bool = True
    autoattack_impl: str = "reference"
    num_classes: int = 10
    seed: int = 0

    def __post_init__(self):
        if self.autoattack_impl not in AUTOATTACK_IMPLS:
            raise ValueError(f"autoattack_impl must be one of {AUTOATTACK_IMPLS}, got {self.autoattack_impl!r}")

    @property
    def pgd_name(self) -> str:
        return f"PGD-{self.pgd_steps}x{self.pgd_restarts}"

    def names(self) -> list[str]:
        """Attack names in order of (expected) strength; 'clean' first."""
        names = ["clean", "FGSM", self.pgd_name]
        if self.square_queries:
            names.append(f"Square-{self.square_queries}")
        if self.autoattack:
            names.append("AutoAttack")
        return names


@dataclass
class AttackResult:
    """Per-sample correctness (N,) bool for each attack, and its wall time in seconds."""

    correct: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    autoattack: dict = field(default_factory=dict)  # implementation, and the reference's warnings

    def accuracy(self, name: str) -> float:
        return self.correct[name].float().mean().item()

    def worst_case(self) -> torch.Tensor:
        """(N,) bool: correct under every attack that was run (the per-sample worst case)."""
        return torch.stack(list(self.correct.values())).all(dim=0)


def _make_attack(torchattacks, name: str, model: nn.Module, suite: AttackSuite):
    if name == "FGSM":
        return torchattacks.FGSM(model, eps=suite.eps)
    if name == suite.pgd_name:
        return torchattacks.PGD(
            model, eps=suite.eps, alpha=2.5 * suite.eps / suite.pgd_steps, steps=suite.pgd_steps, random_start=True
        )
    if name.startswith("Square"):
        return torchattacks.Square(
            model, norm="Linf", eps=suite.eps, n_queries=suite.square_queries, n_restarts=1, seed=suite.seed
        )
    if name == "AutoAttack":
        return standard_autoattack(torchattacks, model, eps=suite.eps, num_classes=suite.num_classes, seed=suite.seed)
    raise ValueError(f"unknown attack {name!r}")


def standard_autoattack(torchattacks, model: nn.Module, *, eps: float, num_classes: int, seed: int):
    """AutoAttack, standard version (Croce & Hein 2020): APGD-CE, APGD-T (all C-1 targets),
    FAB-T (C-1 targets), Square (5000 queries), each on the points the previous ones left.

    Built from torchattacks' four attacks with the reference settings (100 iterations, one
    restart each) and chained by its ``MultiAttack``. ``torchattacks.AutoAttack(version=
    "standard")`` itself leaves APGD, APGD-T and FAB at their class defaults of 10 iterations
    (torchattacks 3.5.1), a weaker attack than the standard version it is named after.
    """
    return torchattacks.MultiAttack(
        [
            torchattacks.APGD(model, norm="Linf", eps=eps, steps=100, n_restarts=1, loss="ce", seed=seed),
            torchattacks.APGDT(model, norm="Linf", eps=eps, steps=100, n_restarts=1, n_classes=num_classes, seed=seed),
            torchattacks.FAB(
                model,
                norm="Linf",
                eps=eps,
                steps=100,
                n_restarts=1,
                multi_targeted=True,
                n_classes=num_classes,
                seed=seed,
            ),
            torchattacks.Square(model, norm="Linf", eps=eps, n_queries=5000, n_restarts=1, seed=seed),
        ]
    )


def _check_threat_model(x: torch.Tensor, x_adv: torch.Tensor, eps: float, name: str) -> None:
    """An attack that leaves the L-inf ball or [0, 1] would overstate robustness loss: refuse."""
    excess = ((x_adv - x).abs().amax() - eps).item()
    if excess > 1e-5 or x_adv.min().item() < -1e-6 or x_adv.max().item() > 1 + 1e-6:
        raise RuntimeError(f"{name} returned inputs outside the threat model (L-inf excess {excess:.2e})")


@torch.no_grad()
def _predict_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1) == y


def run_attacks(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, suite: AttackSuite, *, batch_size: int = 500, log=None
) -> AttackResult:
    """Attack every sample of (N, C, H, W) ``x`` with labels (N,) ``y`` with each attack of the
    suite (model in eval mode); return per-sample correctness on the adversarial inputs.

    A sample is robust to an attack when it is classified correctly both clean and attacked, so
    each attack only runs on the clean-correct samples, and each PGD restart only on those the
    earlier restarts left (the answer is the same; the work is not). Clean predictions are made
    once. Each attack starts from the RNG state ``suite.seed``, whichever attacks ran before it.
    """
    torchattacks = require_torchattacks()
    model.eval()
    result = AttackResult()
    started = time.perf_counter()
    clean = torch.cat([_predict_correct(model, xb, yb) for xb, yb in zip(x.split(batch_size), y.split(batch_size))])
    result.correct["clean"] = clean.cpu()
    result.seconds["clean"] = time.perf_counter() - started
    _log(log, result, "clean")
    for name in suite.names()[1:]:
        started = time.perf_counter()
        torch.manual_seed(suite.seed)
        if name == "AutoAttack" and suite.autoattack_impl == "reference":
            # The reference runs its own cascade (each attack on the points still robust).
            result.correct[name], result.autoattack = _reference_autoattack(model, x, y, suite, batch_size)
        else:
            if name == "AutoAttack":
                result.autoattack = {
                    "implementation": "torchattacks 3.5.1 (APGD, APGD-T, FAB-T, Square)",
                    "warnings": [],
                }
            attack = _make_attack(torchattacks, name, model, suite)
            correct = clean.clone()
            for _ in range(suite.pgd_restarts if name == suite.pgd_name else 1):
                for index in correct.nonzero().squeeze(1).split(batch_size):
                    if index.numel() == 0:  # nothing left to attack
                        continue
                    x_adv = attack(x[index], y[index])
                    _check_threat_model(x[index], x_adv, suite.eps, name)
                    correct[index] = _predict_correct(model, x_adv, y[index])
            result.correct[name] = correct.cpu()
        result.seconds[name] = time.perf_counter() - started
        _log(log, result, name)
    return result


def _log(log, result: AttackResult, name: str) -> None:
    if log is not None:
        log(f"  {name:>14}: {result.accuracy(name):.4f} ({result.seconds[name]:.1f} s)")


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _reference_autoattack(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, suite: AttackSuite, batch_size: int
) -> tuple[torch.Tensor, dict]:
    """The reference standard AutoAttack on (N, ...) ``x``: per-sample correctness (N,) on its
    adversarial points, and ``{"implementation", "warnings"}`` (the reference's own checks)."""
    pyautoattack = require_reference_autoattack()
    adversary = pyautoattack.AutoAttack(
        model, norm="Linf", eps=suite.eps, version="standard", seed=suite.seed, device=x.device
    )
    # The standard version targets the 9 most likely wrong classes (all of them for 10 classes);
    # with fewer classes there are only C - 1, which the reference would index past.
    adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = min(9, suite.num_classes - 1)
    collect = _Collect()
    adversary.logger.addHandler(collect)
    try:
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    finally:
        adversary.logger.removeHandler(collect)
    _check_threat_model(x, x_adv, suite.eps, "AutoAttack")
    correct = torch.cat(
        [_predict_correct(model, xb, yb) for xb, yb in zip(x_adv.split(batch_size), y.split(batch_size))]
    )
    return correct.cpu(), {"implementation": "reference (pyautoattack 0.2.0)", "warnings": collect.messages}


def accuracy_vs_eps(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_grid: list[float],
    *,
    steps: int,
    seed: int = 0,
    batch_size: int = 500,
) -> list[float]:
    """Accuracy under torchattacks PGD-``steps`` (step 2.5 eps / steps, random start) at each
    radius of ``eps_grid``; radius 0 is clean accuracy."""
    torchattacks = require_torchattacks()
    model.eval()
    accuracies = []
    for eps in eps_grid:
        torch.manual_seed(seed)
        attack = (
            torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=True) if eps else None
        )
        correct = 0
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            x_adv = attack(xb, yb) if attack is not None else xb
            correct += _predict_correct(model, x_adv, yb).sum().item()
        accuracies.append(correct / len(x))
    return accuracies
