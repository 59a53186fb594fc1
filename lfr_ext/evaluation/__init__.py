"""Robustness evaluation of any classifier (:func:`evaluate_model`) with torchattacks and the
reference AutoAttack, gradient-masking checks, local flatness and loss-landscape slices; loading
foreign checkpoints (see lfr_ext/cli/evaluate.py for the command line)."""

from .attacks import (
    AUTOATTACK_IMPLS,
    INSTALL_COMMAND,
    AttackResult,
    AttackSuite,
    accuracy_vs_eps,
    require_torchattacks,
    run_attacks,
)
from .model_eval import EVAL_BUDGETS, EvalConfig, Evaluation, evaluate_model
from .runner import evaluate_run, evaluate_weights, load_trained_model
from .weights import load_weights

__all__ = [
    "AUTOATTACK_IMPLS",
    "INSTALL_COMMAND",
    "AttackResult",
    "AttackSuite",
    "accuracy_vs_eps",
    "require_torchattacks",
    "run_attacks",
    "EVAL_BUDGETS",
    "EvalConfig",
    "Evaluation",
    "evaluate_model",
    "evaluate_run",
    "evaluate_weights",
    "load_trained_model",
    "load_weights",
]
