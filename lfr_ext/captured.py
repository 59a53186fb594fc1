r"""One LFR training step as one CUDA graph: ``CapturedStep``.

On small models an LFR step is launch-bound: K ascent steps of a few dozen small kernels each,
plus the penalty, its backward and the optimizer step (SmallCNN plain step: 2.2 ms eager,
0.7 ms graphed, per the issue's H200 figures). ``CapturedStep`` records the whole step once
with ``torch.cuda.graph`` and replays it, so each call is a copy of the batch into static input
buffers plus one graph launch::

    step = lfr_ext.CapturedStep(model, optimizer, x0, y0, lam=0.02, eps=0.3, step_size=0.01, steps=40)
    for x, y in loader:                      # same shapes as x0, y0 (else: eager, with a warning)
        out = step(x, y)                     # LFRLoss(loss, natural_loss, penalty, logits)

What it does on your behalf, and how it undoes it:

* **Warm-up.** CUDA graphs need a few eager iterations first (lazy cuBLAS/cuDNN and optimizer
  state), run on a side stream as PyTorch's docs prescribe. Those are real training steps on
  the example batch, so afterwards the parameters, buffers and optimizer state are put back
  to their values before (state the warm-up *created*, such as momentum buffers, is zeroed,
  which for SGD without dampening, Adam and AdamW is exactly a fresh state).
* **Static hyper-parameters.** The optimizer's plain-number hyper-parameters (``lr``,
  ``momentum``, Adam's ``betas``...) and the modules' train/eval flags are baked into the
  graph. When one changed since the capture (a learning-rate scheduler, ``model.eval()``),
  the next call re-captures (with a fresh warm-up). A scheduler that changes the learning rate
  every step would re-capture every step: give the optimizer a tensor learning rate
  (``lr=torch.tensor(0.1, device="cuda")``, which the graph reads from memory) instead; a
  warning says so after repeated re-captures.
* **Randomness.** The start noise and Dropout draw from the default CUDA generator, which
  PyTorch keeps graph-safe (every replay draws fresh numbers). ``generator=`` is not supported.
* **Outputs.** The returned tensors are the graph's static outputs: the next call overwrites
  them. ``.item()`` them or ``.clone()`` them to keep them.

It falls back to the same step run eagerly, with one warning saying why, when capture is
impossible: CPU tensors, a model or optimizer that synchronises with the host or is otherwise
not capturable (e.g. Adam without ``capturable=True``), or a batch whose shape, dtype or
device differs from the example's. (A failed capture keeps its private memory pool until the
process exits: pytorch/pytorch#190308.)

Restoring the warm-up zeroes optimizer state the warm-up created; that equals a fresh state
for SGD without dampening, Adam and AdamW, and other optimizers get a warning.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import torch
from torch import nn

from ._validation import check_lam, check_penalty_mode
from .penalty import LFRLoss, _configure, lfr_loss


def _check_arguments(model, x, y, lfr_kwargs: dict) -> None:
    """Every check :func:`lfr_loss` makes, on the example batch, once, without taking a step."""
    bound = inspect.signature(lfr_loss).bind(model, x, y, **lfr_kwargs)
    bound.apply_defaults()
    args = dict(bound.arguments)
    check_lam(args.pop("lam"))
    check_penalty_mode(args.pop("penalty_mode"))
    args["validate"] = True
    _configure(**args)


class CapturedStep:
    """A whole LFR training step (``lfr_loss`` + ``backward`` + ``optimizer.step``) as one
    CUDA graph.

    Args:
        model, optimizer: trained in place, as by an ordinary loop.
        example_x: (B, ...) a batch with the shapes, dtype and device of every later batch.
        example_y: (B,) its labels.
        warmup_steps: eager iterations before the capture (undone afterwards).
        **lfr_kwargs: the arguments of :func:`lfr_ext.lfr_loss` (``lam``, ``eps``,
            ``step_size``, ``steps``, ``q``, ``hvp``, ``impl``, ...). The inputs are validated
            once, on the example batch; later batches are not checked (that would sync).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, example_x: torch.Tensor,
                 example_y: torch.Tensor, *, warmup_steps: int = 3, **lfr_kwargs):
        if "generator" in lfr_kwargs and lfr_kwargs["generator"] is not None:
            raise ValueError("CapturedStep draws its randomness from the default CUDA generator; generator= "
                             "is not supported")
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an integer >= 1, got {warmup_steps!r}")
        self.model, self.optimizer = model, optimizer
        self.lfr_kwargs = {k: v for k, v in lfr_kwargs.items() if k not in ("validate", "generator")}
        self.warmup_steps = warmup_steps
        _check_arguments(model, example_x, example_y, self.lfr_kwargs)
        self.static_x = example_x.detach().clone()
        self.static_y = example_y.detach().clone()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_out: LFRLoss | None = None
        self.reason: str | None = None  # why the step runs eagerly, if it does
        self._warned: set[str] = set()
        self._captured_with: tuple | None = None
        self._recaptures = 0
        if example_x.device.type != "cuda":
            self._give_up(f"CUDA graphs need CUDA tensors, got {example_x.device}")
            return
        non_capturable = [i for i, g in enumerate(optimizer.param_groups) if g.get("capturable") is False]
        if non_capturable:
            self._give_up(f"{type(optimizer).__name__} was built with capturable=False; construct it with "
                          "capturable=True to capture its step")
            return
        self._capture(warmup=True)

    # -- public ----------------------------------------------------------------------------
    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> LFRLoss:
        """One training step on ``(x, y)``; returns the step's ``LFRLoss`` (detached)."""
        if self.graph is None or not self._fits(x, y):
            if self.graph is not None:
                self._warn_once("shape", f"CapturedStep: batch {tuple(x.shape)} {x.dtype} on {x.device} differs from "
                                f"the captured {tuple(self.static_x.shape)} {self.static_x.dtype} on "
                                f"{self.static_x.device}; running this step eagerly")
            return self._eager_step(x, y)
        if self._captured_with != self._hyperparameters():
            self._recaptures += 1
            if self._recaptures == 3:
                self._warn_once("recapture", "CapturedStep: the optimizer's hyper-parameters or the modules' modes "
                                "keep changing, and every change re-captures the graph; for a per-step learning-rate "
                                "schedule give the optimizer a tensor lr (lr=torch.tensor(..., device='cuda'))")
            self._capture(warmup=True)
            if self.graph is None:
                return self._eager_step(x, y)
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        self.graph.replay()
        return self.static_out

    # -- internals --------------------------------------------------------------------------
    def _fits(self, x, y) -> bool:
        return (x.shape == self.static_x.shape and x.dtype == self.static_x.dtype and x.device == self.static_x.device
                and y.shape == self.static_y.shape and y.dtype == self.static_y.dtype)

    def _hyperparameters(self) -> tuple:
        """What the graph bakes in: the optimizer's plain-number settings and module modes."""
        def plain(value):
            return isinstance(value, (int, float, bool)) or (
                isinstance(value, tuple) and all(isinstance(v, (int, float, bool)) for v in value))

        groups = tuple(tuple(sorted((k, v) for k, v in g.items() if plain(v))) for g in self.optimizer.param_groups)
        return groups, tuple(m.training for m in self.model.modules())

    def _loss(self, x, y) -> LFRLoss:
        return lfr_loss(self.model, x, y, validate=False, **self.lfr_kwargs)

    def _eager_step(self, x, y) -> LFRLoss:
        out = self._loss(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()
        return LFRLoss(*(t.detach() for t in out))

    def _snapshot(self):
        params_and_buffers = {k: v.detach().clone() for k, v in self.model.state_dict(keep_vars=True).items()}
        optimizer_state = {p: {k: (v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in s.items()}
                           for p, s in self.optimizer.state.items()}
        return params_and_buffers, optimizer_state

    @torch.no_grad()
    def _restore(self, snapshot) -> None:
        """Put back parameters, buffers and optimizer state *in place* (the graph holds their
        addresses). State created after the snapshot is zeroed."""
        params_and_buffers, optimizer_state = snapshot
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            tensor.copy_(params_and_buffers[name])
        for param, state in self.optimizer.state.items():
            before = optimizer_state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value):
                    value.copy_(before[key]) if key in before else value.zero_()
                elif key in before:
                    state[key] = before[key]
                elif isinstance(value, (int, float)):
                    state[key] = type(value)(0)

    def _capture(self, warmup: bool) -> None:
        snapshot = self._snapshot()
        try:
            # Warm-up and capture on one side stream (as PyTorch's docs do); thread_local
            # error mode so another thread's CUDA calls (a pin_memory DataLoader) don't
            # invalidate the capture.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            if warmup:
                with torch.cuda.stream(side):
                    for _ in range(self.warmup_steps):
                        self._eager_step(self.static_x, self.static_y)
                torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            self.optimizer.zero_grad(set_to_none=True)
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                out = self._loss(self.static_x, self.static_y)
                out.loss.backward()
                self.optimizer.step()
            self.static_out = LFRLoss(*(t.detach() for t in out))
            self.graph = graph
            self._captured_with = self._hyperparameters()
        except Exception as error:  # noqa: BLE001  (any capture failure means: run eagerly)
            self.graph = None
            torch.cuda.synchronize()
            self._give_up(f"capture failed ({type(error).__name__}: {error})")
        finally:
            self._restore(snapshot)
            if self.graph is not None:
                torch.cuda.synchronize()
        if not self._fresh_state_exact():
            self._warn_once("optimizer", f"CapturedStep: the warm-up's {type(self.optimizer).__name__} state was reset "
                            "by zeroing, which equals a fresh state only for SGD without dampening, Adam and AdamW")

    def _fresh_state_exact(self) -> bool:
        if isinstance(self.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            return True
        return isinstance(self.optimizer, torch.optim.SGD) and all(
            g.get("dampening", 0) == 0 for g in self.optimizer.param_groups)

    def _give_up(self, reason: str) -> None:
        self.reason = reason
        self._warn_once("capture", f"CapturedStep: {reason}; running the LFR step eagerly")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
