"""Robustness evaluation with torchattacks, gradient-masking checks, local flatness and
loss-landscape slices (see evaluate.py for the command line)."""

from .attacks import INSTALL_COMMAND, AttackResult, AttackSuite, accuracy_vs_eps, require_torchattacks, run_attacks
from .runner import EVAL_BUDGETS, EvalConfig, evaluate_run, load_trained_model

__all__ = [
    "INSTALL_COMMAND", "AttackResult", "AttackSuite", "accuracy_vs_eps", "require_torchattacks", "run_attacks",
    "EVAL_BUDGETS", "EvalConfig", "evaluate_run", "load_trained_model",
]
