"""lfr_ext: fast, exact Local Flatness Regularization (LFR) for PyTorch.

Public entry points::

    lfr_ext.flatness_penalty(model, x, y, eps=..., step_size=..., steps=...)   # the penalty P
    lfr_ext.lfr_loss(model, x, y, lam=..., eps=..., step_size=..., steps=...)  # CE + lam * P
    lfr_ext.local_flatness(model, x, y, eps=..., step_size=..., steps=...)     # LF(x), a metric
    lfr_ext.input_grad(model, x, y)       # grad_x loss, differentiable once more (any gradient penalty)

``import lfr_ext`` loads the library only. The robustness evaluation (:mod:`lfr_ext.evaluation`),
the trainer (:mod:`lfr_ext.training`), the data readers, the model zoo and the command lines
(:mod:`lfr_ext.cli`) import on first use; ``lfr_ext.evaluate_model``, ``lfr_ext.EvalConfig`` and
``lfr_ext.Evaluation`` resolve to :mod:`lfr_ext.evaluation`'s on first access
(tests/test_import_boundary.py keeps it so).

Reference: Xu, Li, Jiang, Xia, "Adversarial Defense via Local Flatness Regularization", ICIP 2020.
"""

import importlib

from . import hvp, ops, reference  # ops loads the compiled library, once
from ._version import __version__
from .captured import CapturedStep
from .classifier import PixelClassifier
from .graphed_step import GraphedStep
from .input_gradients import input_grad
from .penalty import LFRLoss, flatness_penalty, lfr_loss, local_flatness

# Names of the evaluation harness, and the harness's modules, resolved on first access by
# __getattr__ below (PEP 562).
_EVALUATION_NAMES = ("evaluate_model", "EvalConfig", "Evaluation")
_HARNESS_MODULES = ("cli", "data", "evaluation", "models", "training")

__all__ = [
    "flatness_penalty",
    "lfr_loss",
    "local_flatness",
    "LFRLoss",
    "input_grad",
    "CapturedStep",
    "GraphedStep",
    "PixelClassifier",
    *_EVALUATION_NAMES,
    "hvp",
    "ops",
    "reference",
    "__version__",
]


def __getattr__(name: str):
    """``lfr_ext.evaluate_model`` and the other evaluation names, and the harness's sub-packages
    (``lfr_ext.models``, ``lfr_ext.training``, ...): imported on first access, not with the package."""
    if name in _EVALUATION_NAMES:
        from . import evaluation

        return getattr(evaluation, name)
    if name in _HARNESS_MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names, the lazily resolved evaluation names included."""
    return sorted(set(globals()) | set(__all__))
