r"""A whole training step (forward, backward, optimizer step) as one CUDA graph: ``GraphedStep``.

Adversarial training steps are long chains of small kernels (K attack steps, each a forward and
one or two backwards), so on a GPU they are bound by kernel launches. ``GraphedStep`` records
one step of any training objective with ``torch.cuda.graph`` and replays it, so each call is a
copy of the batch into static input buffers plus one graph launch::

    def objective(x, y):                      # -> tuple of tensors, element 0 the scalar loss
        logits = model(x)
        return F.cross_entropy(logits, y), logits
    step = GraphedStep(model, optimizer, objective, x0, y0)
    for x, y in loader:                       # same shapes as x0, y0 (else: eager)
        loss, logits = step(x, y)             # forward + backward + optimizer.step(): one replay

:class:`lfr_ext.CapturedStep` is this for ``lfr_ext.lfr_loss``; ``lfr-train`` uses it for every
method on a GPU.

What it does on your behalf, and how it undoes it:

* **Warm-up.** CUDA graphs need a few eager iterations first (lazy cuBLAS/cuDNN and optimizer
  state), run on a side stream as PyTorch's docs prescribe. Those are real training steps on
  the example batch, so afterwards the parameters, buffers, ``.grad`` values, optimizer state
  and the global RNG states are put back to their values before (state the warm-up *created*,
  such as momentum buffers, is zeroed, which for SGD without dampening, Adam and AdamW is
  exactly a fresh state; other optimizers get a warning).
* **Steps that cannot be captured are found before capturing.** The last warm-up step runs
  under ``torch.cuda.set_sync_debug_mode("error")``: a step that synchronises with the host
  (``.item()``, a data-dependent shape, an optimizer reading a tensor hyper-parameter on the
  host) raises there, and the step runs eagerly without a capture ever being begun. (A failed
  capture is a poor detector: on torch 2.11 it can leave the caching allocator believing a
  capture is still under way, pytorch/pytorch#180395.) A failing capture is still caught, as
  a last resort.
* **Fresh gradient accumulators.** The warm-up and the capture run on parameters replaced by
  new leaves that share their storage. An autograd graph kept alive from an earlier eager step
  (an ``LFRLoss`` of a step run before the ``GraphedStep`` was built, say) keeps the
  parameters' ``AccumulateGrad`` nodes, and with them the stream that step ran on; a
  side-stream capture through them fails (pytorch/pytorch#165065, #166136). The fresh leaves
  have their own. Python hooks on the parameters therefore do not run during the capture
  (they would not run on replay either).
* **Static hyper-parameters.** The optimizer's plain settings (``lr``, ``momentum``, betas, and
  tensor settings that live on the CPU, whose value a kernel reads at launch) and the modules'
  train/eval flags are baked into the graph. When one changed since the capture (a
  learning-rate scheduler, ``model.eval()``), the next call re-captures. A tensor setting on the
  GPU is read from memory by each replay, so a scheduler that updates it in place
  (``fill_``, as PyTorch's schedulers do) needs no re-capture: give ``SGD(..., fused=True)`` or
  ``Adam/AdamW(..., capturable=True)`` a CUDA tensor ``lr`` for a per-step schedule. Other SGD
  and Adam variants read a tensor ``lr`` on the host (``.item()``), which cannot be captured:
  refused, with that advice.
* **Randomness.** Draws come from the default CUDA generator, which PyTorch keeps graph-safe
  (every replay draws fresh numbers, continuing the generator's stream).
* **Outputs and gradients.** The returned tensors are the graph's static outputs: the next call
  overwrites them; ``.item()`` or ``.clone()`` them to keep them. After every call ``p.grad``
  holds that step's gradient, in the graph's own buffers.

It runs the same step eagerly, with one warning saying why, when capture is impossible: CPU
tensors, an optimizer built with ``capturable=False`` (fused or not: ``Optimizer.step`` refuses
a capture then), optimizer state kept on the host (Adagrad's step counters), a step that
synchronises with the host, or a failed capture.

A DistributedDataParallel model is captured on its own parameters (DDP's all-reduce hooks live
on their gradient accumulators, so the fresh leaves cannot be used: build DDP on a side stream,
as :func:`lfr_ext.training.parallel.wrap` does, and keep no autograd graph alive from an
earlier step), after at least 11 DDP warm-up steps (PyTorch's CUDA-graphs notes); NCCL captures
its collectives. An FSDP2 (``fully_shard``) model is refused: its hooks keep per-step state in Python
between their collectives, which a replay would skip. ``model.load_state_dict`` /
``optimizer.load_state_dict`` after a capture *replace* tensors the graph reads and writes: load
before building the step, or build a new one. A batch whose shape, dtype or device differs from the
example's runs eagerly too (one warning; :meth:`GraphedStep.eager` runs a step eagerly without one).
"""

from __future__ import annotations

import contextlib
import copy
import numbers
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ._cuda import is_host_sync_error
from ._rng import RngState
from ._warn_once import WarnOnce
from .wrapped import sharded_modules, unwrapped

StepFn = Callable[[torch.Tensor, torch.Tensor], tuple]

# Replays between two re-captures below which re-capturing counts as "every few steps".
_FREQUENT_RECAPTURE_REPLAYS = 10


class GraphedStep:
    """A whole training step, ``loss_fn`` + ``backward`` + ``optimizer.step()``, as one CUDA graph.

    Args:
        model, optimizer: trained in place, as by an ordinary loop.
        loss_fn: ``(x, y) -> outputs``, a tuple (or NamedTuple) of tensors whose element 0 is
            the scalar loss to minimise; it may switch module modes on the way, but must leave
            them as it found them.
        example_x: (B, ...) a batch with the shape, dtype and device of every later batch.
        example_y: (B, ...) its targets.
        warmup_steps: eager iterations before the capture (undone afterwards), >= 2: the last
            one checks for host synchronisations, which the first may legitimately make (the
            linearized engine verifies each model once, with one host sync).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: StepFn,
        example_x: torch.Tensor,
        example_y: torch.Tensor,
        *,
        warmup_steps: int = 3,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (x, y) -> outputs, got {type(loss_fn).__name__}")
        if not (isinstance(example_x, torch.Tensor) and isinstance(example_y, torch.Tensor)):
            raise TypeError("example_x and example_y must be tensors")
        if example_x.device != example_y.device:
            raise ValueError(f"example_y is on {example_y.device} but example_x is on {example_x.device}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 2:
            raise ValueError(f"warmup_steps must be an integer >= 2, got {warmup_steps!r}")
        if sharded_modules(unwrapped(model)):
            raise NotImplementedError(
                "a CUDA graph cannot hold an FSDP2 (fully_shard) step: FSDP's hooks keep per-step state in Python "
                "between their collectives, which a replay skips. Step the FSDP2 model eagerly (lfr_loss, "
                "flatness_penalty) or capture a DistributedDataParallel model"
            )
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.warmup_steps = warmup_steps
        self.static_x = example_x.detach().clone()
        self.static_y = example_y.detach().clone()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_out = None
        self.reason: str | None = None  # why the step runs eagerly, if it does
        self._static_grads: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._captured_with: tuple | None = None
        self._replays_since_capture = 0
        self._frequent_recaptures = 0
        self._warned = WarnOnce()
        self._capture()

    # -- public ----------------------------------------------------------------------------
    @property
    def captured(self) -> bool:
        return self.graph is not None

    def fits(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Whether ``(x, y)`` has the captured shapes, dtypes and device (a replay can take it)."""
        return (
            x.shape == self.static_x.shape
            and x.dtype == self.static_x.dtype
            and x.device == self.static_x.device
            and y.shape == self.static_y.shape
            and y.dtype == self.static_y.dtype
            and y.device == self.static_y.device
        )

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        """One training step on ``(x, y)``; returns ``loss_fn``'s outputs, detached."""
        if self.graph is None:
            return self.eager(x, y)
        if not self.fits(x, y):
            self._warn_once(
                "shape",
                f"{type(self).__name__}: batch {tuple(x.shape)} {x.dtype} on {x.device} differs "
                f"from the captured {tuple(self.static_x.shape)} {self.static_x.dtype} on "
                f"{self.static_x.device}; running this step eagerly",
            )
            return self.eager(x, y)
        if self._captured_with != baked_settings(self.optimizer, self.model):
            self._count_recapture()
            self._capture()
            if self.graph is None:
                return self.eager(x, y)
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        self.graph.replay()
        self._replays_since_capture += 1
        self._point_grads_at_graph()
        return self.static_out

    def eager(self, x: torch.Tensor, y: torch.Tensor):
        """The same step, run eagerly (e.g. a last, smaller batch); returns the outputs detached.
        After a capture, the gradients still land in the graph's buffers, so ``p.grad`` stays the
        tensor every replay writes."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for param, grad in self._static_grads:
                grad.zero_()
                param.grad = grad  # the backward below accumulates into it, in place
        out = self.loss_fn(x, y)
        _loss_of(out).backward()
        self.optimizer.step()
        return _detached(out)

    # -- capture ---------------------------------------------------------------------------
    def _capture(self) -> None:
        """Warm up, check for host syncs, capture; everything the warm-up changed is put back."""
        self.graph, self._static_grads = None, []
        device = self.static_x.device
        problem = capture_problem(self.optimizer, device)
        if problem is not None:
            self._give_up(problem)
            return
        saved = _TrainingState.save(self.model, self.optimizer, device)
        graph = None
        try:
            with torch.cuda.device(device), _capture_leaves(self.model) as leaves:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                try:
                    with torch.cuda.stream(side):
                        for _ in range(self._warmup_steps() - 1):
                            self._leaf_step(leaves)
                        problem = host_state_problem(self.optimizer) or self._host_sync_in_step(leaves)
                except Exception as error:
                    self.reason = f"the warm-up step raised {type(error).__name__}: {error}"
                    raise
                finally:
                    torch.cuda.current_stream().wait_stream(side)  # the restore below runs after it
                if problem is not None:
                    self._give_up(problem)
                    return
                saved.restore_rng()  # the replays draw what eager steps from the caller's RNG state would
                for _, leaf in leaves:
                    leaf.grad = None  # the captured backward allocates the static gradients
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                        out = self._leaf_step(leaves)
                except Exception as error:  # noqa: BLE001  (last resort: the sync check passed, capture did not)
                    torch.cuda.synchronize()
                    self._give_up(
                        f"capture failed ({type(error).__name__}: {error}); if the error names a stream, "
                        "another stream's work is entangled with the step"
                    )
                    return
                self._static_grads = [(param, leaf.grad) for param, leaf in leaves if leaf.grad is not None]
                torch.cuda.synchronize()
            self.static_out = _detached(out)
            self.graph = graph
            self._captured_with = baked_settings(self.optimizer, self.model)
            self._replays_since_capture = 0
        finally:
            saved.restore(self.model, self.optimizer, self._static_grads if self.graph is not None else None)
        if not _fresh_state_is_exact(self.optimizer):
            self._warn_once(
                "optimizer",
                f"{type(self).__name__}: the warm-up's {type(self.optimizer).__name__} state "
                "was reset by zeroing, which equals a fresh state only for SGD without dampening, Adam "
                "and AdamW",
            )

    def _warmup_steps(self) -> int:
        # PyTorch's CUDA-graphs notes: DDP needs at least 11 eager iterations before a capture.
        return max(self.warmup_steps, 11) if isinstance(self.model, DistributedDataParallel) else self.warmup_steps

    def _leaf_step(self, leaves: list[tuple[nn.Parameter, nn.Parameter]]):
        """One step on the fresh leaves: their gradients become the parameters' ``.grad``."""
        for _, leaf in leaves:
            leaf.grad = None
        out = self.loss_fn(self.static_x, self.static_y)
        _loss_of(out).backward()
        for param, leaf in leaves:
            param.grad = leaf.grad
        self.optimizer.step()
        return out

    def _host_sync_in_step(self, leaves) -> str | None:
        """Run one more warm-up step with host synchronisations raising; the reason if one did."""
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            self._leaf_step(leaves)
        except RuntimeError as error:
            if not is_host_sync_error(error):
                raise
            return (
                f"the step synchronises with the host ({error}), which a CUDA graph cannot capture: an .item(), "
                "a data-dependent shape, or an optimizer reading a tensor hyper-parameter on the host"
            )
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        return None

    def _point_grads_at_graph(self) -> None:
        for param, grad in self._static_grads:
            if param.grad is not grad:  # e.g. optimizer.zero_grad() set it to None between steps
                param.grad = grad

    def _count_recapture(self) -> None:
        if self._replays_since_capture < _FREQUENT_RECAPTURE_REPLAYS:
            self._frequent_recaptures += 1
        if self._frequent_recaptures == 3:
            self._warn_once(
                "recapture",
                f"{type(self).__name__}: the optimizer's hyper-parameters or the modules' "
                "modes keep changing, and every change re-captures the graph; for a per-step "
                "learning-rate schedule give SGD(..., fused=True) or Adam/AdamW(..., capturable=True) a "
                "CUDA tensor lr, which the graph reads from memory",
            )

    def _give_up(self, reason: str) -> None:
        self.reason = reason
        self._warn_once("capture", f"{type(self).__name__}: {reason}; running the step eagerly")

    def _warn_once(self, key: str, message: str) -> None:
        self._warned.warn(key, message, stacklevel=3)


# ------------------------------------------------------------------------------------------
# What can be captured, and what a capture bakes in
# ------------------------------------------------------------------------------------------
def _reads_device_tensors_in_the_graph(optimizer: torch.optim.Optimizer, group: dict) -> bool | None:
    """Whether this optimizer's step reads tensor hyper-parameters from device memory (True), on
    the host with ``.item()`` (False), or None when lfr_ext does not know (the host-sync check of
    the warm-up then decides)."""
    if isinstance(optimizer, torch.optim.SGD):
        return bool(group.get("fused"))
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return bool(group.get("capturable"))
    return None


def capture_problem(optimizer: torch.optim.Optimizer, device: torch.device) -> str | None:
    """Why a step with this optimizer on ``device`` cannot be captured, known before trying."""
    if device.type != "cuda":
        return f"CUDA graphs need CUDA tensors, got {device}"
    name = type(optimizer).__name__
    for group in optimizer.param_groups:
        # Optimizer.step() raises inside a capture unless capturable=True, fused or not.
        if group.get("capturable") is False:
            return f"{name} was built with capturable=False; construct it with capturable=True to capture its step"
        on_device = sorted(k for k, v in group.items() if k != "params" and _holds_device_tensor(v))
        if on_device and _reads_device_tensors_in_the_graph(optimizer, group) is False:
            fix = "SGD(..., fused=True)" if isinstance(optimizer, torch.optim.SGD) else f"{name}(..., capturable=True)"
            return (
                f"{name} reads its GPU tensor {', '.join(on_device)} on the host (.item()) in every step, which a "
                f"CUDA graph cannot do; construct {fix}, which reads it from device memory"
            )
    return None


def host_state_problem(optimizer: torch.optim.Optimizer) -> str | None:
    """Why the optimizer's state, as a warm-up left it, cannot live in a graph: state tensors on
    the CPU next to GPU parameters (step counters of optimizers without a ``capturable`` mode,
    such as Adagrad) are updated by host arithmetic that a capture would freeze."""
    for param, state in optimizer.state.items():
        if param.device.type == "cpu":
            continue
        on_host = sorted(k for k, v in state.items() if isinstance(v, torch.Tensor) and v.device.type == "cpu")
        if on_host:
            return (
                f"{type(optimizer).__name__} keeps {', '.join(on_host)} on the CPU and updates it on the host, "
                "which a CUDA graph would freeze; use an optimizer with capturable=True"
            )
    return None


def _holds_device_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.device.type != "cpu"
    return isinstance(value, (tuple, list)) and any(_holds_device_tensor(v) for v in value)


_NOT_BAKED = object()


def _baked(value):
    """What a capture bakes in for one setting: plain values and CPU tensors (their values are
    read when a kernel is launched); device tensors are read from memory by each replay."""
    if value is None or isinstance(value, (bool, str, numbers.Number)):
        return value
    if isinstance(value, torch.Tensor):
        return _NOT_BAKED if value.device.type != "cpu" else ("cpu tensor", tuple(value.detach().flatten().tolist()))
    if isinstance(value, (tuple, list)):
        parts = tuple(_baked(v) for v in value)
        return _NOT_BAKED if any(p is _NOT_BAKED for p in parts) else parts
    return _NOT_BAKED


def baked_settings(optimizer: torch.optim.Optimizer, model: nn.Module) -> tuple:
    """The re-capture key: every optimizer setting a capture bakes in, and the module modes."""
    groups = []
    for group in optimizer.param_groups:
        settings = [(key, _baked(value)) for key, value in sorted(group.items()) if key != "params"]
        groups.append(tuple((key, value) for key, value in settings if value is not _NOT_BAKED))
    return tuple(groups), tuple(module.training for module in model.modules())


def _fresh_state_is_exact(optimizer: torch.optim.Optimizer) -> bool:
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return True
    return isinstance(optimizer, torch.optim.SGD) and all(g.get("dampening", 0) == 0 for g in optimizer.param_groups)


# ------------------------------------------------------------------------------------------
# Fresh leaves and the state a warm-up must leave as it found it
# ------------------------------------------------------------------------------------------
def _capture_leaves(model: nn.Module):
    """The leaves a capture trains: fresh ones (:func:`fresh_parameter_leaves`), except under
    DDP, whose gradient all-reduce hooks live on the parameters' own accumulators."""
    if isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext([(p, p) for p in model.parameters() if p.requires_grad])
    return fresh_parameter_leaves(model)


@contextlib.contextmanager
def fresh_parameter_leaves(model: nn.Module):
    """Inside the block, every trainable parameter of ``model`` is replaced, in every module that
    holds it, by a new ``nn.Parameter`` sharing its storage: a new autograd leaf with its own
    gradient accumulator. Yields ``[(parameter, leaf)]``; the modules get their parameters back
    on exit. Values written through either are seen by both (one storage)."""
    leaf_of: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}
    replaced = []
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or not param.requires_grad:
                continue
            if id(param) not in leaf_of:
                leaf_of[id(param)] = (param, nn.Parameter(param.detach(), requires_grad=True))
            replaced.append((module, name, param))
            setattr(module, name, leaf_of[id(param)][1])  # setattr: modules that mirror parameters see it
    try:
        yield list(leaf_of.values())
    finally:
        for module, name, param in reversed(replaced):
            setattr(module, name, param)


class _TrainingState:
    """Parameters, buffers, ``.grad`` values, module modes, optimizer state and RNG states
    before a warm-up."""

    def __init__(self, tensors, grads, modes, optimizer_state, rng):
        self.tensors, self.grads, self.modes, self.optimizer_state, self.rng = (
            tensors,
            grads,
            modes,
            optimizer_state,
            rng,
        )

    @classmethod
    def save(cls, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> "_TrainingState":
        tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        grads = {p: p.grad.detach().clone() for p in model.parameters() if p.grad is not None}
        modes = [(module, module.training) for module in model.modules()]
        optimizer_state = {
            p: {k: (v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in s.items()}
            for p, s in optimizer.state.items()
        }
        return cls(tensors, grads, modes, optimizer_state, RngState.of_device(device))

    def restore_rng(self) -> None:
        self.rng.restore()

    @torch.no_grad()
    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, static_grads) -> None:
        """Put everything back *in place* (a graph holds the addresses). State created after the
        save is zeroed. ``static_grads``: the graph's gradient buffers, which become ``p.grad``
        with the saved values (zeros where there were none); None when nothing was captured."""
        self.restore_rng()
        for module, training in self.modes:
            module.training = training
        for name, tensor in model.state_dict(keep_vars=True).items():
            tensor.copy_(self.tensors[name])
        for param, state in optimizer.state.items():
            before = self.optimizer_state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value):
                    value.copy_(before[key]) if key in before else value.zero_()
                elif key in before:
                    state[key] = before[key]
                elif isinstance(value, (int, float)):
                    state[key] = type(value)(0)
        if static_grads is None:
            for param in model.parameters():
                param.grad = self.grads.get(param)
            return
        for param, grad in static_grads:
            grad.copy_(self.grads[param]) if param in self.grads else grad.zero_()
            param.grad = grad


def _loss_of(outputs) -> torch.Tensor:
    loss = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError("loss_fn must return a tuple of tensors whose element 0 is the scalar loss (or that loss)")
    return loss


def _detached(outputs):
    if isinstance(outputs, torch.Tensor):
        return outputs.detach()
    items = [t.detach() if isinstance(t, torch.Tensor) else t for t in outputs]
    return type(outputs)(*items) if hasattr(outputs, "_fields") else type(outputs)(items)


__all__ = ["GraphedStep", "baked_settings", "capture_problem", "fresh_parameter_leaves"]
