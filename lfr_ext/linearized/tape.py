r"""Recording a forward pass for the exact linearized tangent pass.

For a network that is piecewise linear in its input (convolutions, linear layers, ReLU-like
activations, pooling, BatchNorm, Dropout, residual adds, reshapes), the Jacobian-vector product
``J v`` of the logits at ``x`` is ``v`` pushed through each layer's *linear map at x*: the
weights without their biases, the ReLU slope masks, the max-pool argmax indices, the Dropout
masks and BatchNorm's exact Jacobian, all taken from the primal pass. :class:`TangentTape` is a
``TorchFunctionMode`` that watches one forward, lets it run unchanged, and records, for every
op whose inputs depend on ``x``, a small closure mapping input tangents to output tangents
(``lfr_ext.linearized.rules``). :meth:`TangentTape.tangent` replays those closures on any ``v``.

Recording at the ``torch.*`` / ``torch.nn.functional`` level sits *above* autograd: the
recorded weights, masks and statistics are ordinary autograd tensors, so a replay with grad
enabled is differentiable w.r.t. the parameters (the outer LFR gradient) and w.r.t. ``x``.
Only the ops that actually ran are recorded, so Python control flow in ``forward`` is fine.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch.overrides import TorchFunctionMode, resolve_name

from .._cuda import is_host_sync_error
from .calls import DeclinedOpError
from .rules import RULES, UnsupportedOpError, is_metadata_output

# Each torch function's printable name, memoised: torch.overrides.resolve_name enters
# warnings.catch_warnings on every call (its @_disable_user_warnings), and the tape names every
# op it records. Process-wide on purpose, not in lfr_ext.hvp.CACHE: a function's name is a fact
# of the function, the same for every model and never stale, so there is nothing to forget; the
# memo is bounded by the distinct torch functions called. Unhashable callables are not kept.
_NAMES: dict = {}


def _name(func) -> str:
    try:
        return _NAMES[func]
    except (KeyError, TypeError):
        name = resolve_name(func) or getattr(func, "__qualname__", repr(func))
        try:
            _NAMES[func] = name
        except TypeError:
            pass
        return name


def _tensors(obj):
    """Tensors inside args/kwargs (one level of list/tuple nesting, as torch ops take them)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            if isinstance(item, torch.Tensor):
                yield item
            elif isinstance(item, (list, tuple)):
                yield from (t for t in item if isinstance(t, torch.Tensor))
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.device == b.device
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )


class TangentTape(TorchFunctionMode):
    """Context manager recording the linear map at ``source`` of the forward run inside it.

    Example::

        x = x.detach().requires_grad_(True)
        with TangentTape(x) as tape:
            logits = model(x)                      # runs exactly as without the tape
        jv = tape.tangent(v, logits)               # J v, (B, C): one cheap "tangent forward"

    Raises :class:`UnsupportedOpError` (naming the op) inside the forward when an op that
    depends on ``source`` has no exact linearization here, or belongs to a declined class.
    """

    def __init__(self, source: torch.Tensor, declined: Mapping[str, str] | None = None):
        """``declined``: op classes (see :meth:`depends_on_source_through`) to refuse, each with
        the reason (``hvp='auto'`` keeps double backprop for the classes it measured slower)."""
        super().__init__()
        self._declined = dict(declined or {})
        self._slots: dict[int, int] = {id(source): 0}
        self._alive: list = [source]  # keeps ids unique while the tape lives
        self._viewed: set[int] = set()  # ids of tensors that a recorded view aliases
        # Tensors of the model's that recorded maps read, with their version then (see keep()).
        self._kept: list[tuple[torch.Tensor, int]] = []
        self._program: list[tuple[Callable, tuple, tuple]] = []
        self._num_slots = 1
        self.couples_samples = False  # True once an op mixes samples (batch statistics)
        # True once a recorded linear map itself depends on the source (batch statistics): the
        # network is then not piecewise linear in x and H v has a term beyond J^T H_z J v.
        self.depends_on_source = False
        self.source_dependent_classes: set[str] = set()  # the classes of the ops that made it so
        self.ops_seen: set[str] = set()

    # -- recording -------------------------------------------------------------------
    def carries(self, t) -> bool:
        """Whether ``t`` depends on the source (has a tangent)."""
        return isinstance(t, torch.Tensor) and id(t) in self._slots

    def slot(self, t) -> int | None:
        return self._slots.get(id(t)) if isinstance(t, torch.Tensor) else None

    def emit(self, outputs: Sequence[torch.Tensor], fn: Callable, inputs: Sequence) -> None:
        """Record ``fn(*input_tangents) -> output tangent(s)``. Input tangents are resolved
        now (an in-place op later gives its tensor a new slot); a non-carrying input's
        tangent is None. Floating outputs get fresh slots."""
        in_slots = tuple(self.slot(t) if self.carries(t) else None for t in inputs)
        out_slots = []
        for out in outputs:
            self._slots[id(out)] = self._num_slots
            self._alive.append(out)
            if out._base is not None:
                self._viewed.add(id(out._base))
            out_slots.append(self._num_slots)
            self._num_slots += 1
        self._program.append((fn, in_slots, tuple(out_slots)))

    def depends_on_source_through(self, op_class: str, name: str) -> None:
        """A rule's linear map depends on the source: ``op_class`` is one of ``"batch statistics"``,
        ``"normalisation"``, ``"smooth activation"``, ``"softmax"``, ``"attention"`` (the attention
        functions) or ``"product"`` (of two input-dependent tensors: gates, attention written out).
        Refused if the class is declined."""
        if op_class in self._declined:
            raise DeclinedOpError(name, op_class, self._declined[op_class])
        self.depends_on_source = True
        self.source_dependent_classes.add(op_class)

    def keep(self, *tensors) -> None:
        """A recorded map reads these tensors of the forward's (an activation's input or output,
        a product's operands): :meth:`tangent` refuses to replay once one of them was written in
        place after it was recorded (autograd's own saved-tensor check, for the tape)."""
        self._kept.extend((t, t._version) for t in tensors if isinstance(t, torch.Tensor))

    def check_inplace_target(self, target: torch.Tensor, name: str) -> None:
        """An in-place op on a tensor that aliases another recorded tensor would silently
        change that tensor's tangent too; refuse instead of being wrong."""
        if target._base is not None or id(target) in self._viewed:
            raise UnsupportedOpError(f"{name} (in place on a view)")

    def _any_carried(self, args, kwargs) -> bool:
        # Hot path (every torch call in the forward lands here): plain loops, no generators.
        slots = self._slots
        for arg in args:
            if isinstance(arg, torch.Tensor):
                if id(arg) in slots:
                    return True
            elif isinstance(arg, (list, tuple)):
                for item in arg:
                    if isinstance(item, torch.Tensor) and id(item) in slots:
                        return True
        return bool(kwargs) and any(self.carries(t) for t in _tensors(kwargs))

    def check_inplace_into_constant(self, target: torch.Tensor, name: str) -> None:
        """Writing input-dependent values in place into a constant tensor would leave every
        earlier alias of that tensor (which the tape cannot enumerate) without its tangent."""
        if not self.carries(target):
            raise UnsupportedOpError(f"{name} (in place into a tensor that did not depend on the input)")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._any_carried(args, kwargs) or not torch.is_grad_enabled():
            # Constant w.r.t. the source, or computed where autograd treats it as a constant
            # (no_grad / inference_mode): nothing to record, exactly as autograd sees it.
            return func(*args, **kwargs)
        name = _name(func)
        rule = RULES.get(name)
        if rule is None:
            out = func(*args, **kwargs)
            if is_metadata_output(out):  # .shape, .size(), comparisons, argmax: no tangent
                return out
            raise UnsupportedOpError(name)
        self.ops_seen.add(name)
        try:
            return rule(self, func, name, args, kwargs)
        except UnsupportedOpError:
            raise
        except Exception as error:
            if is_host_sync_error(error):  # torch.cuda.set_sync_debug_mode("error"): not the rule's fault
                raise
            # A call shape the rule does not know: refuse, never guess.
            raise UnsupportedOpError(f"{name} ({type(error).__name__}: {error})") from error

    @contextlib.contextmanager
    def through_input_aliases(self, modules: Sequence[torch.nn.Module]) -> Iterator[None]:
        """Inside the block, when a forward pre-hook of one of ``modules`` replaces an input that
        carries a tangent by an *alias* of it (same storage, offset, sizes, strides and dtype),
        the alias carries the same tangent.

        FSDP2's pre-forward hook passes each module's inputs (cast first under a mixed-precision
        policy) through an identity ``autograd.Function`` (its post-backward registration), which
        returns views that no torch function produced. One hook before the module's own hooks
        remembers the inputs, one after them pairs each replacement with its original: the input
        itself, or the tensor the replacement views.
        """
        handles = []
        for module in modules:
            pending: list = []

            def remember(_module, args, kwargs, pending=pending):
                pending.append([*_tensors(args), *_tensors(kwargs)])

            def alias(_module, args, kwargs, pending=pending):
                for before, after in zip(pending.pop(), [*_tensors(args), *_tensors(kwargs)]):
                    if self.carries(after):
                        continue
                    # The original is the input itself or, when a hook first cast it (FSDP2's
                    # mixed precision, recorded by the tape), the cast tensor the alias views.
                    for original in (before, after._base):
                        if original is not None and self.carries(original) and _same_memory(original, after):
                            self._slots[id(after)] = self._slots[id(original)]
                            self._alive.append(after)
                            self._viewed.add(id(original))  # an in-place write to either changes both
                            break

            handles.append(module.register_forward_pre_hook(remember, prepend=True, with_kwargs=True))
            handles.append(module.register_forward_pre_hook(alias, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # -- replay ----------------------------------------------------------------------
    def tangent(self, v: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``J v``: the tangent of ``output`` for source tangent ``v`` (same shape as the
        source). Differentiable w.r.t. whatever the recorded maps depend on when grad mode is
        on; run it under ``torch.no_grad()`` when only the value is needed."""
        if not self.carries(output):
            return torch.zeros_like(output)
        for kept, version in self._kept:
            if kept._version != version:
                raise UnsupportedOpError(
                    "an in-place write, after it was recorded, to a tensor that a recorded linear "
                    f"map reads (shape {tuple(kept.shape)})"
                )
        env: list = [None] * self._num_slots
        env[0] = v
        for fn, in_slots, out_slots in self._program:
            result = fn(*[env[s] if s is not None else None for s in in_slots])
            if len(out_slots) == 1:
                env[out_slots[0]] = result
            else:
                for s, r in zip(out_slots, result):
                    env[s] = r
        return env[self.slot(output)]
