"""lfr_ext: fast, exact Local Flatness Regularization (LFR) for PyTorch.

Public entry points::

    lfr_ext.flatness_penalty(model, x, y, eps=..., step_size=..., steps=...)   # the penalty P
    lfr_ext.lfr_loss(model, x, y, lam=..., eps=..., step_size=..., steps=...)  # CE + lam * P
    lfr_ext.local_flatness(model, x, y, eps=..., step_size=..., steps=...)     # LF(x), a metric

Reference: Xu, Li, Jiang, Xia, "Adversarial Defense via Local Flatness Regularization", ICIP 2020.
"""

from ._version import __version__

from . import ops, reference  # noqa: E402  (ops loads the compiled library, once)
from .penalty import LFRLoss, flatness_penalty, lfr_loss, local_flatness  # noqa: E402
from .graphed_step import GraphedStep  # noqa: E402
from .captured import CapturedStep  # noqa: E402
from . import hvp  # noqa: E402
from .classifier import PixelClassifier  # noqa: E402
from .evaluation.model_eval import EvalConfig, Evaluation, evaluate_model  # noqa: E402

__all__ = ["flatness_penalty", "lfr_loss", "local_flatness", "LFRLoss", "CapturedStep", "GraphedStep", "PixelClassifier",
           "evaluate_model", "EvalConfig", "Evaluation", "hvp", "ops", "reference", "__version__"]
