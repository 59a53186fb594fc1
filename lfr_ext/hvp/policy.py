"""The policy of ``hvp=``: which method runs each pass of one call, and ``auto``'s fallback."""

from __future__ import annotations

import logging
from typing import Callable, NamedTuple

import torch
from torch import nn

from .._rng import RngState
from ..linearized import DeclinedOpError, UnsupportedOpError
from ..reference import grad_norm_reference
from . import compiled, double_backprop, finite_difference, forward, linearized
from .cache import CACHE
from .facts import MethodFacts
from .finite_difference import grad_and_hvp_finite_difference
from .forward import grad_and_hvp_forward
from .linearized import grad_and_hvp_linearized, penalty_linearized

logger = logging.getLogger("lfr_ext")

# The op classes (lfr_ext.linearized.TangentTape.depends_on_source_through) that hvp="auto" leaves
# to double backprop: those whose inner step bench/bench_tangent.py measured slower on the
# linearized engine than by double backprop, beyond the spread of repeated runs. Each reason cites
# its results files; bench/results/README.md lists them with the runs of the classes kept.
AUTO_DECLINED_CLASSES: dict[str, str] = {
    "attention": "ViT-tiny's inner step measured slower linearized than by double backprop, "
    "bench/results/cpu-2core-x86_64-2026-12-01-tangent-beyond-relu-*.json; "
    "hvp='linearized' still runs it, exactly",
}

# Every method's record, in the order lfr_ext.hvp's table and `python -m lfr_ext.info` list them.
METHODS: dict[str, MethodFacts] = {
    facts.name: facts
    for facts in (linearized.FACTS, double_backprop.FACTS, forward.FACTS, finite_difference.FACTS, compiled.FACTS)
}
HVP_METHODS = ("auto", *METHODS)


def check_request(
    hvp: str,
    *,
    default_loss: bool,
    grad_scaler: bool,
    device_type: str | None = None,
    methods: dict[str, MethodFacts] = METHODS,
) -> None:
    """Refuse, before any work, an ``hvp=`` request its method's record says it cannot serve:
    an unknown name, a ``grad_scaler``, a loss other than the default, a device type. (``auto``
    chooses among methods that serve every request.)"""
    if hvp != "auto" and hvp not in methods:
        raise ValueError(f"hvp must be one of {('auto', *methods)}, got {hvp!r}")
    facts = methods.get(hvp)
    if facts is None:
        return
    if grad_scaler and not facts.takes_grad_scaler:
        raise ValueError(f"hvp={hvp!r} does not take a grad_scaler; use hvp='auto' for fp16 mixed precision")
    if facts.needs_default_loss and not default_loss:
        raise ValueError(
            f"hvp={hvp!r} needs the default cross-entropy loss (its Hessian in the logits is "
            "diag(p) - p p^T); pass loss_fn=None or use hvp='double_backprop'"
        )
    if device_type is not None and not facts.supports_device(device_type):
        raise ValueError(f"hvp={hvp!r} runs on {', '.join(facts.devices)}, not {device_type}; use hvp='auto'")


def check_penalty_request(facts: MethodFacts, *, reduction: str, x_requires_grad: bool) -> None:
    """Refuse a penalty ``facts``' method cannot give: per-sample values (``reduction="none"``)
    or, when ``x`` requires grad, a derivative w.r.t. ``x``."""
    if not (
        (reduction == "none" and not facts.per_sample_penalty)
        or (x_requires_grad and not facts.penalty_differentiable_in_x)
    ):
        return
    gives = []
    if not facts.per_sample_penalty:
        gives.append("the penalty reduced over the batch (reduction='mean' or 'sum')")
    if not facts.penalty_differentiable_in_x:
        whose = "its" if gives else "the penalty's"
        gives.append(f"{whose} gradient w.r.t. the parameters only (x must not require grad)")
    raise ValueError(f"hvp={facts.name!r} gives " + " and ".join(gives))


class Result(NamedTuple):
    """What a linearized pass gives the engine: its ``value`` and whether it couples samples
    (None when not verified in this call); ``rng``, the RNG states before the pass, to rewind to
    for a pass redone another way (which then draws the same start noise and Dropout masks)."""

    value: object
    couples: bool | None
    rng: RngState | None


class SecondOrderEngine:
    """``hvp=`` for one call: the inner ``(g, H v)`` and the penalty, each by the method chosen.

    ``method`` is read per pass from the request and :data:`CACHE`: ``auto`` gives
    ``linearized`` for the default loss until the model's recording is refused, and
    ``double_backprop`` after that (a refusal is remembered, warned once, and the pass redone by
    double backprop from the same RNG state); an explicit ``linearized`` raises instead.
    """

    def __init__(
        self,
        hvp: str,
        model: nn.Module,
        default_loss: bool,
        norm_fn: Callable = grad_norm_reference,
        loss_scale: torch.Tensor | None = None,
        device: torch.device | None = None,
        caller_depth: int = 5,
    ):
        """``caller_depth``: the frames from ``warnings.warn`` in :data:`CACHE` up to the user's
        call of the public function, for the fallback warning to point at it."""
        check_request(
            hvp,
            default_loss=default_loss,
            grad_scaler=loss_scale is not None,
            device_type=None if device is None else torch.device(device).type,
        )
        self.requested = hvp
        self.model = model
        self.default_loss = default_loss
        self.norm_fn = norm_fn  # per-sample ||g||_q of the double-backprop paths (the fused op)
        self.loss_scale = loss_scale  # GradScaler's scale (fp16 mixed precision), or None
        # auto leaves the op classes it measured slower on the linearized engine to double backprop.
        self.declined = AUTO_DECLINED_CLASSES if hvp == "auto" else None
        self.caller_depth = caller_depth
        logger.debug("lfr_ext: hvp=%r -> %s", hvp, self.method)

    @property
    def method(self) -> str:
        if self.requested != "auto":
            return self.requested
        if not self.default_loss or self.model in CACHE.uncovered:
            return "double_backprop"
        return "linearized"

    def _key(self, kind: str) -> tuple:
        return kind, tuple(m.training for m in self.model.modules())

    def linearized_pass(self, kind: str, x_adv: torch.Tensor, run: Callable[[bool], tuple]) -> Result | None:
        """``run(verify) -> (value, couples)``, verified the first time for this model and modes
        (not while a CUDA graph is being captured: verification syncs). None when the recording
        was refused under ``auto``: the refusal is in :data:`CACHE`. A pass that was being
        verified rewinds the RNG when refused (so the double-backprop redo draws the same noise
        and Dropout masks); a refusal after verification (data-dependent control flow) does not."""
        key = self._key(kind)
        verified = CACHE.verified.get(self.model, {})
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        verify = key not in verified and not capturing
        rng = RngState.of_device(x_adv.device) if verify else None
        try:
            value, couples = run(verify)
        except UnsupportedOpError as error:
            if rng is not None:
                rng.restore()
            if self.requested != "auto":
                raise
            self._remember_refusal(error)
            return None
        if verify:
            CACHE.verified.setdefault(self.model, {})[key] = couples
        return Result(value, verified.get(key, couples), rng)

    def _remember_refusal(self, error: UnsupportedOpError) -> None:
        CACHE.uncovered[self.model] = error.op
        name = type(self.model).__name__
        if isinstance(error, DeclinedOpError):  # a measured choice, not a gap: said in lfr_ext.info and here
            logger.info("lfr_ext: hvp='auto' -> double_backprop for %s: %s", name, error)
            return
        CACHE.warn_once(
            (type(self.model).__qualname__, error.op),
            f"lfr_ext: hvp='auto' falls back to double backprop for {name}: {error}",
            stacklevel=self.caller_depth,
        )
        logger.debug("lfr_ext: hvp='auto' -> double_backprop (%s)", error.op)

    def grad_and_hvp(self, model, x_adv, y, loss_fn, q):
        """``(g, H v)`` at ``x_adv`` (B, ...) each, detached."""
        method = self.method
        if method == "linearized":
            result = self.linearized_pass(
                "inner",
                x_adv,
                lambda verify: (
                    grad_and_hvp_linearized(
                        model, x_adv, y, loss_fn, q, verify, loss_scale=self.loss_scale, declined=self.declined
                    ),
                    None,
                ),
            )
            if result is not None:
                return result.value
            method = "double_backprop"
        if method == "double_backprop":
            return double_backprop.grad_and_hvp(model, x_adv, y, loss_fn, q, self.norm_fn, self.loss_scale)
        if method == "compiled":
            return compiled.engine_for(model, loss_fn, q).grad_and_hvp(x_adv, y)
        if method == "forward":
            return grad_and_hvp_forward(model, x_adv, y, loss_fn, q, loss_scale=self.loss_scale)
        return grad_and_hvp_finite_difference(model, x_adv, y, loss_fn, q, loss_scale=self.loss_scale)

    def penalty(self, model, x_adv, y, loss_fn, q, reduction: str) -> torch.Tensor:
        """Per-sample penalties (B,) in the model's current mode, by the first case that applies:

        * ``compiled``: the compiled engine (batch-reduced, parameter gradients only);
        * ``linearized`` whose pass is known to couple samples, with ``reduction="none"``:
          double backprop (only the batch sum has exact per-parameter gradients there; an
          explicit ``linearized`` raises);
        * ``linearized``: the linearized pass, unless its recording is refused (``auto``: double
          backprop) or turns out to couple samples with ``reduction="none"`` (as above, redone
          from the same RNG state, so with the same Dropout masks);
        * every other method: double backprop (the authors' penalty).
        """
        method = self.method
        check_penalty_request(METHODS[method], reduction=reduction, x_requires_grad=x_adv.requires_grad)
        if method == "compiled":
            return compiled.engine_for(model, loss_fn, q).penalty(x_adv, y)
        if (
            method == "linearized"
            and reduction == "none"
            and CACHE.verified.get(self.model, {}).get(self._key("penalty"))
        ):
            self._refuse_or_skip_coupled()
            return self._penalty_double_backprop(model, x_adv, y, loss_fn, q)
        if method == "linearized":
            result = self.linearized_pass(
                "penalty",
                x_adv,
                lambda verify: penalty_linearized(
                    model, x_adv, y, q, verify, loss_scale=self.loss_scale, declined=self.declined
                ),
            )
            if result is not None and not (result.couples and reduction == "none"):
                return result.value
            if result is not None:
                self._refuse_or_skip_coupled()
                if result.rng is not None:
                    result.rng.restore()
        return self._penalty_double_backprop(model, x_adv, y, loss_fn, q)

    def _penalty_double_backprop(self, model, x_adv, y, loss_fn, q) -> torch.Tensor:
        return double_backprop.penalty(model, x_adv, y, loss_fn, q, self.norm_fn, self.loss_scale)

    def _refuse_or_skip_coupled(self) -> None:
        if self.requested == "linearized":
            raise ValueError(
                "hvp='linearized' with reduction='none' on a model whose penalty pass couples samples "
                "(train-mode BatchNorm, a mean over the batch): only the batch sum has exact per-parameter "
                "gradients; use reduction='mean'/'sum', penalty_mode='eval', or hvp='double_backprop'"
            )
        logger.debug("lfr_ext: reduction='none' on a sample-coupling pass -> double_backprop")
