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
from ..hvp.compiled import compile_backend, compile_support_problem
from . import parallel
from .config import TrainConfig
from .methods import METHOD_STEPS, SECOND_ORDER_METHODS, StepOutput

# Steps between two reads of the running totals (the progress bar) on a GPU.
GPU_SYNC_EVERY = 50


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_FP16_NOT_CAPTURED = "fp16: GradScaler.step reads found_inf on the host, which a CUDA graph cannot capture"


class TrainingStep:
    """``(x, y) -> StepOutput`` (detached): the method's loss, backward and optimizer step.

    With ``cfg.amp`` the loss is computed under ``torch.autocast`` (bf16, or fp16 with a
    ``torch.amp.GradScaler`` that also scales LFR's inner gradients and the attacks'). fp16
    steps run eagerly (the scaler's step reads found_inf on the host); bf16 steps are captured.
    Autocast runs with ``cache_enabled=False``, as PyTorch requires for graph capture.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        step_fn,
        cfg: TrainConfig,
        device: torch.device,
        log=print,
    ):
        self.model, self.optimizer, self.step_fn, self.cfg = model, optimizer, step_fn, cfg
        self.device = device
        self.amp_dtype = AMP_DTYPES.get(cfg.amp)
        self.grad_scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
        self.graphed: GraphedStep | None = None
        self.compiled = False
        self._method_model = model  # what the method's step runs: the model, compiled for the baselines
        if cfg.compile:
            self.compiled = self._compile(model, step_fn, log)

    def _compile(self, model: nn.Module, step_fn, log) -> bool:
        """``--compile``, method by method: LFR's inner and penalty steps compiled whole when this
        torch can trace their autograd calls (else LFR runs eagerly, and the log says why); the
        first-order methods' model itself, which needs no autograd tracing."""
        if step_fn in (METHOD_STEPS[name] for name in SECOND_ORDER_METHODS if name != "lfr"):
            log(
                "WARNING --compile: this method runs eagerly: its loss differentiates a gradient, which "
                "torch.compile of the model does not support"
            )
            return False
        if step_fn is not METHOD_STEPS["lfr"]:
            self._method_model = torch.compile(model, backend=compile_backend())
            return True
        problem = compile_support_problem()
        if problem is not None:
            log(f"WARNING --compile: lfr runs eagerly: {problem}")
            return False
        return True

    def _objective(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        options = dict(grad_scaler=self.grad_scaler, compiled=self.compiled)
        if self.amp_dtype is None:
            return self.step_fn(self._method_model, x, y, self.cfg, **options)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=False):
            return self.step_fn(self._method_model, x, y, self.cfg, **options)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        if self.device.type != "cuda" or self.grad_scaler is not None:
            return self._eager(x, y)
        if self.graphed is None:
            self.graphed = GraphedStep(self.model, self.optimizer, self._objective, x, y)
        if self.graphed.fits(x, y):
            return self.graphed(x, y)
        return self.graphed.eager(x, y)

    def _eager(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        out = self._objective(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_scaler is None:
            out.loss.backward()
            self.optimizer.step()
        else:
            self.grad_scaler.scale(out.loss).backward()
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        return StepOutput(*(t.detach() for t in out))

    def describe(self) -> str:
        """How the steps ran: ``eager`` (CPU), ``captured`` or ``eager (reason)``, and
        ``, compiled`` with torch.compile."""
        suffix = ", compiled" if self.compiled else ""
        if self.device.type == "cuda" and self.grad_scaler is not None:
            return f"eager ({_FP16_NOT_CAPTURED}){suffix}"
        if self.graphed is None:
            return "eager" + suffix
        return ("captured" if self.graphed.captured else f"eager ({self.graphed.reason})") + suffix


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
