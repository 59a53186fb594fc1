"""Adversarial training harness: LFR and the usual baselines under one loop (see lfr_ext/cli/train.py)."""

from .config import BUDGETS, METHODS, PRESETS, TrainConfig, resolve_config
from .loop import TrainResult, train

__all__ = ["BUDGETS", "METHODS", "PRESETS", "TrainConfig", "TrainResult", "resolve_config", "train"]
