"""One training step of a method, at its fastest on the device, and the epoch's running totals.

On a GPU every method (LFR, PGD-AT, TRADES, plain) runs as one captured CUDA graph per batch
(:class:`lfr_ext.GraphedStep`), so a comparison of methods compares each at its fastest, not
launch-bound eager loops. The graph is captured on the first batch; a batch of another size
(the last, partial one of an epoch) runs eagerly. When a step cannot be captured, GraphedStep
says why once and every step runs eagerly. On the CPU the step is the ordinary eager one.

The running totals stay on the device: reading them is a host sync, done once every
``sync_every`` steps (and at the end of the epoch), not after every step.
"""

from __future__ import annotations

import torch
from torch import nn

from ..graphed_step import GraphedStep
from . import parallel
from .config import TrainConfig
from .methods import StepOutput

# Steps between two reads of the running totals (the progress bar) on a GPU.
GPU_SYNC_EVERY = 50


class TrainingStep:
    """``(x, y) -> StepOutput`` (detached): the method's loss, backward and optimizer step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, step_fn, cfg: TrainConfig,
                 device: torch.device):
        self.model, self.optimizer, self.step_fn, self.cfg = model, optimizer, step_fn, cfg
        self.device = device
        self.graphed: GraphedStep | None = None

    def _objective(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        return self.step_fn(self.model, x, y, self.cfg)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        if self.device.type != "cuda":
            return self._eager(x, y)
        if self.graphed is None:
            self.graphed = GraphedStep(self.model, self.optimizer, self._objective, x, y)
        if self.graphed.fits(x, y):
            return self.graphed(x, y)
        return self.graphed.eager(x, y)

    def _eager(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        out = self._objective(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()
        return StepOutput(*(t.detach() for t in out))

    def describe(self) -> str:
        """How the steps ran: ``eager`` (CPU), ``captured`` or ``eager (reason)``."""
        if self.graphed is None:
            return "eager"
        return "captured" if self.graphed.captured else f"eager ({self.graphed.reason})"


class RunningTotals:
    """Sums of ``loss * n``, ``penalty * n`` and correct predictions over an epoch, on the
    device, in float64 (the same arithmetic as summing Python floats)."""

    def __init__(self, device: torch.device):
        self._sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.seen = 0

    def add(self, out: StepOutput, y: torch.Tensor) -> None:
        n = len(y)
        correct = (out.logits.argmax(1) == y).sum()
        self._sums += torch.stack([out.loss.double() * n, out.penalty.double() * n, correct.double()])
        self.seen += n

    def sum_over(self, ranks) -> None:
        """Sum the totals of every rank into each (a collective: every rank must call it)."""
        if ranks.parallel:
            seen = torch.tensor([float(self.seen)], dtype=torch.float64, device=self._sums.device)
            both = parallel.sum_over_ranks(torch.cat([self._sums, seen]), ranks)
            self._sums, self.seen = both[:3], int(both[3].item())

    def means(self) -> dict:
        """``train_loss``, ``train_penalty`` (NaN for methods without one), ``train_acc``: one host sync."""
        loss, penalty, correct = self._sums.tolist()
        seen = max(self.seen, 1)
        return {"train_loss": loss / seen, "train_penalty": penalty / seen, "train_acc": correct / seen}
