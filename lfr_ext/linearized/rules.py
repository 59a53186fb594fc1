r"""Exact linearizations of the ops networks are made of.

Each rule runs the primal op (unchanged, or with the extra outputs it needs, such as pooling
indices) and records on the tape how the op maps input tangents ``t`` to output tangents:

=============================  ======================================================
op                             tangent of the output
=============================  ======================================================
conv*, conv_transpose*, linear the same op on ``t`` without the bias
matmul / mm / bmm / ``@``      the same product with the constant operand; with two
mul, div                       input-dependent operands ``da b + a db`` (``(da - out db) / b``)
relu (any spelling, in place)  ``t * (out > 0)`` (PyTorch's ``relu'(0) = 0``)
leaky_relu(slope)              ``t * where(out > 0, 1, slope)``
hardtanh / relu6               ``t * (min < out < max)``
max-pool, adaptive max-pool    ``t`` gathered at the primal's argmax indices
avg-pool, adaptive avg-pool,   the same op on ``t`` (they are linear)
mean, sum, interpolate, pad
reshapes, views, indexing,     the same op on ``t``
cat, stack, split, chunk
add, sub, neg, mul/div by a    the linear combination of the input tangents
constant, where(const mask)
dropout (train)                ``t * mask / (1 - p)`` with the primal's mask
batch_norm (running stats)     ``t * gamma / sqrt(running_var + eps)`` per channel
batch_norm (batch stats)       ``gamma/sigma_B * (t - mean(t) - x_hat * mean(x_hat * t))``
layer_norm, group_norm         the same formula with the per-sample (per-group) statistics
silu, gelu (both), softplus,   ``t * sigma'(z)``, the slope at the primal input ``z``
elu, tanh, sigmoid
softmax, log_softmax,          see :mod:`lfr_ext.linearized.attention`
scaled_dot_product_attention,
multi_head_attention_forward
detach, comparisons, argmax    no tangent (constant, or zero derivative a.e.)
=============================  ======================================================

The maps of the normalisations, smooth activations, softmax, attention and two-operand products
depend on the input: they are built with autograd on and set ``tape.depends_on_source``, so the
inner HVP differentiates the tangent itself (``H v = grad_x[(p - e_y)^T J(x) v]``, exact for any
network) and the penalty's parameter gradient is the backward of the tangent pass. Anything else
that depends on the input raises :class:`UnsupportedOpError` naming the op (attention dropout,
in-place writes into views, ops with no rule such as ``torch.sin``, ...).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from .attention import log_softmax, multi_head_attention, scaled_dot_product_attention, softmax
from .calls import UnsupportedOpError
from .calls import arguments as _arguments


def _differentiable(t) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


def is_metadata_output(out) -> bool:
    """True when an op's output carries no derivative: shapes, numbers, strings, integer or
    boolean tensors. ``None`` is not metadata: it is what in-place writers such as
    ``__setitem__`` return, and those change a tensor the tape would not know about."""
    if out is None:
        return False
    if isinstance(out, torch.Tensor):
        return not _differentiable(out)
    if isinstance(out, (tuple, list)):
        return all(o is not None and is_metadata_output(o) for o in out)
    return True


def _zero_if_none(t, like):
    return torch.zeros_like(like) if t is None else t


def _only_first_carries(tape, name, args, kwargs):
    """The rules below that re-apply an op to the tangent need every *other* floating tensor
    argument to be constant (not depending on the input)."""
    others = [a for a in list(args[1:]) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
    if name.endswith("_as"):  # view_as(other), expand_as(other), ...: other only gives a shape/dtype
        others = []
    if any(tape.carries(a) for a in others):
        raise UnsupportedOpError(f"{name} (with more than one input-dependent operand)")
    if not tape.carries(args[0]):
        raise UnsupportedOpError(f"{name} (input dependence only through a non-leading argument)")


def _outputs(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


_INPLACE_DUNDERS = frozenset(
    {"torch.Tensor.__iadd__", "torch.Tensor.__isub__", "torch.Tensor.__imul__", "torch.Tensor.__itruediv__"}
)


def is_inplace(name: str, args=(), kwargs=None, flag_at: int | None = None) -> bool:
    """Whether a call writes its first argument: a trailing-underscore name (``relu_``), an
    in-place operator (``+=``), or an ``inplace`` argument (keyword, or positional at ``flag_at``)."""
    if (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_DUNDERS:
        return True
    if flag_at is None:
        return False
    kwargs = kwargs or {}
    return bool(kwargs.get("inplace", args[flag_at] if len(args) > flag_at else False))


# ---------------------------------------------------------------------------------------
# Linear maps applied to the tangent as they are ("same op")
# ---------------------------------------------------------------------------------------
def same_op(tape, func, name, args, kwargs):
    """Ops linear in their (single) input-dependent argument: views, reshapes, indexing,
    pooling by averaging, sums, interpolation, dtype/device moves."""
    _only_first_carries(tape, name, args, kwargs)
    if is_inplace(name):
        tape.check_inplace_target(args[0], name)
    out = func(*args, **kwargs)
    rest, kw = args[1:], kwargs
    multi = isinstance(out, (tuple, list))
    outputs = _outputs(out)
    if not all(_differentiable(o) for o in outputs):
        if any(_differentiable(o) for o in outputs):
            raise UnsupportedOpError(f"{name} (mixed floating and non-floating outputs)")
        return out  # integer casts, strings (x.type()), ...: no derivative, no tangent

    def tangent(t):
        result = func(t, *rest, **kw)
        return tuple(result) if multi else result

    tape.emit(outputs, tangent, [args[0]])
    return out


def pad(tape, func, name, args, kwargs):
    """F.pad: constant padding pads the tangent with 0 (the pad value is a constant)."""
    _only_first_carries(tape, name, args, kwargs)
    out = func(*args, **kwargs)
    arguments = _arguments(F.pad, args, kwargs)
    mode, pads = arguments["mode"], arguments["pad"]

    def tangent(t):
        return F.pad(t, pads, mode=mode, value=0.0) if mode == "constant" else F.pad(t, pads, mode=mode)

    tape.emit([out], tangent, [args[0]])
    return out


def bias_free(bias_position: int):
    """conv*, conv_transpose*, linear: the same op on the tangent, bias dropped."""

    def rule(tape, func, name, args, kwargs):
        _only_first_carries(tape, name, args, kwargs)
        out = func(*args, **kwargs)
        rest = list(args[1:])
        kw = dict(kwargs)
        if "bias" in kw:
            kw["bias"] = None
        elif len(args) > bias_position:
            rest[bias_position - 1] = None

        def tangent(t):
            return func(t, *rest, **kw)

        tape.emit([out], tangent, [args[0]])
        return out

    return rule


def product(tape, func, name, args, kwargs):
    """matmul/mm/bmm/mul/div. With one input-dependent operand, the same product with the
    constant one (linear). With two (attention written out, gating), the product rule
    ``d(ab) = da b + a db`` and ``d(a/b) = (da - (a/b) db) / b``: bilinear, so its map is built
    from the primal operands with autograd on (``depends_on_source``)."""
    a, b = args[0], args[1]
    carries_a, carries_b = tape.carries(a), tape.carries(b)
    is_div = "div" in name
    if is_div and kwargs.get("rounding_mode") is not None:
        return func(*args, **kwargs)  # floor/trunc division: zero derivative a.e. (autograd agrees)
    if is_inplace(name):
        if carries_b:
            raise UnsupportedOpError(f"{name} in place by an input-dependent tensor")
        tape.check_inplace_into_constant(a, name)
        tape.check_inplace_target(a, name)
    rest, kw = args[2:], kwargs
    out = func(*args, **kwargs)
    outplace = _OUTPLACE.get(name, func)
    if carries_b and (carries_a or is_div):
        tape.depends_on_source_through("product", name)
        tape.keep(a, b, out) if is_div else tape.keep(a, b)
        if is_div:

            def tangent(ta, tb):
                return ((0 if ta is None else ta) - out * tb) / b
        else:

            def tangent(ta, tb):
                return outplace(ta, b, *rest, **kw) + outplace(a, tb, *rest, **kw)

        tape.emit([out], tangent, [a, b])
        return out
    if carries_a:

        def tangent(t):
            return outplace(t, b, *rest, **kw)

        source = a
    else:

        def tangent(t):
            return outplace(a, t, *rest, **kw)

        source = b
    tape.keep(b if carries_a else a)  # the constant operand the tangent reads
    tape.emit([out], tangent, [source])
    return out


def add_sub(tape, func, name, args, kwargs):
    """add/sub/rsub (any spelling, in place or not, with ``alpha``): tangents combine linearly.

    ``add(a, b) = a + alpha b``, ``sub(a, b) = a - alpha b``, ``rsub(a, b) = b - alpha a``.
    """
    a = args[0]
    b = args[1] if len(args) > 1 else kwargs.get("other")
    alpha = kwargs.get("alpha", 1)
    reverse = name in ("torch.Tensor.__rsub__", "torch.rsub")
    subtract = "sub" in name and not reverse
    coef_a = -alpha if reverse else 1
    coef_b = 1 if reverse else (-alpha if subtract else alpha)
    if is_inplace(name):
        tape.check_inplace_into_constant(a, name)
        tape.check_inplace_target(a, name)
    out = func(*args, **kwargs)
    out_shape = out.shape

    def tangent(ta, tb):
        total = None
        for t, coef in ((ta, coef_a), (tb, coef_b)):
            if t is not None:
                term = t if coef == 1 else coef * t
                total = term if total is None else total + term
        return total if total.shape == out_shape else total.expand(out_shape)

    tape.emit([out], tangent, [a if isinstance(a, torch.Tensor) else None, b if isinstance(b, torch.Tensor) else None])
    return out


def neg(tape, func, name, args, kwargs):
    out = func(*args, **kwargs)
    tape.emit([out], lambda t: -t, [args[0]])
    return out


def where(tape, func, name, args, kwargs):
    """where(cond, a, b) with a constant condition: where(cond, t_a, t_b). The method spelling
    is ``a.where(cond, b)``."""
    if name == "torch.Tensor.where":
        a, cond, b = args[0], args[1], args[2] if len(args) > 2 else kwargs["other"]
    else:
        cond, a, b = args[0], args[1], args[2] if len(args) > 2 else kwargs["other"]
    if tape.carries(cond) and cond.is_floating_point():
        raise UnsupportedOpError(f"{name} with an input-dependent floating condition")
    out = func(*args, **kwargs)

    def tangent(ta, tb):
        zero = torch.zeros((), dtype=out.dtype, device=out.device)
        return torch.where(cond, zero if ta is None else ta, zero if tb is None else tb).expand(out.shape)

    tape.emit([out], tangent, [a if isinstance(a, torch.Tensor) else None, b if isinstance(b, torch.Tensor) else None])
    return out


def concat(tape, func, name, args, kwargs):
    """cat/stack: the same op on the tangents, zeros for constant pieces."""
    pieces = list(args[0])
    rest, kw = args[1:], kwargs
    out = func(*args, **kwargs)

    def tangent(*ts):
        return func([_zero_if_none(t, p) for t, p in zip(ts, pieces)], *rest, **kw)

    tape.emit([out], tangent, pieces)
    return out


def no_tangent(tape, func, name, args, kwargs):
    """detach and friends: the output does not depend on the input (for derivatives)."""
    return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------
# Piecewise-linear activations: a mask from the primal output
# ---------------------------------------------------------------------------------------
def relu(tape, func, name, args, kwargs):
    if is_inplace(name, args, kwargs, flag_at=1):
        tape.check_inplace_target(args[0], name)
    out = func(*args, **kwargs)
    mask = out > 0  # relu'(0) = 0, as PyTorch's threshold_backward
    tape.emit([out], lambda t: t * mask, [args[0]])
    return out


def leaky_relu(tape, func, name, args, kwargs):
    slope = kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01)
    if is_inplace(name, args, kwargs, flag_at=2):
        tape.check_inplace_target(args[0], name)
    out = func(*args, **kwargs)
    if slope <= 0:
        raise UnsupportedOpError(f"{name} with negative_slope <= 0")
    # Built in out's dtype: a float32 0.01 would not be PyTorch's slope in float64.
    factor = torch.where(out > 0, torch.ones_like(out), torch.full_like(out, float(slope)))
    tape.emit([out], lambda t: t * factor, [args[0]])
    return out


def hardtanh(tape, func, name, args, kwargs):
    if name.endswith("relu6"):
        low, high, position = 0.0, 6.0, 1
    else:
        low = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
        high = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
        position = 3
    if is_inplace(name, args, kwargs, flag_at=position):
        tape.check_inplace_target(args[0], name)
    out = func(*args, **kwargs)
    mask = (out > low) & (out < high)  # hardtanh_backward: 0 at and beyond the limits
    tape.emit([out], lambda t: t * mask, [args[0]])
    return out


# ---------------------------------------------------------------------------------------
# Smooth activations: the slope sigma'(z) at the primal input
# ---------------------------------------------------------------------------------------
# Not piecewise linear: the slope depends on x (and on the weights before the activation), so the
# tangent is built from the primal input with autograd on, and ``depends_on_source`` makes the
# inner HVP take the derivative of the tangent itself (exact for any network, see lfr_ext/hvp/).
# The slope of an elementwise activation is diagonal, so its JVP is its VJP: ATen's backward
# kernel of the activation, one fused kernel whose own derivatives are those double backprop uses.
# (SiLU's backward kernel has no derivative in ATen, so its slope is written out.)
_ATEN = torch.ops.aten


def _silu_tangent(z, out, args, kwargs):
    s = torch.sigmoid(z)
    slope = s * (1 + z * (1 - s))
    return lambda t: t * slope


def _gelu_tangent(z, out, args, kwargs):
    approximate = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
    if approximate not in ("none", "tanh"):
        raise UnsupportedOpError(f"gelu with approximate={approximate!r}")
    return lambda t: _ATEN.gelu_backward(t.to(z.dtype), z, approximate=approximate)


def _softplus_tangent(z, out, args, kwargs):
    beta = kwargs.get("beta", args[1] if len(args) > 1 else 1.0)
    threshold = kwargs.get("threshold", args[2] if len(args) > 2 else 20.0)
    return lambda t: _ATEN.softplus_backward(t.to(z.dtype), z, beta, threshold)


def _elu_tangent(z, out, args, kwargs):
    alpha = kwargs.get("alpha", args[1] if len(args) > 1 else 1.0)
    return lambda t: _ATEN.elu_backward(t.to(z.dtype), alpha, 1.0, 1.0, False, z)


def _tanh_tangent(z, out, args, kwargs):
    return lambda t: _ATEN.tanh_backward(t.to(out.dtype), out)


def _sigmoid_tangent(z, out, args, kwargs):
    return lambda t: _ATEN.sigmoid_backward(t.to(out.dtype), out)


def smooth(tangent_of, inplace_at: int | None = None, reads_output: bool = False):
    """The rule of an elementwise activation whose tangent map at input ``z`` (output ``out``) is
    ``tangent_of(z, out, args, kwargs)``; ``inplace_at``: the position of its ``inplace``
    argument, if it has one; ``reads_output``: the map reads ``out`` (else ``z``)."""

    def rule(tape, func, name, args, kwargs):
        z = args[0]
        inplace = is_inplace(name, args, kwargs, flag_at=inplace_at)
        if inplace:
            tape.check_inplace_target(z, name)
            # The tangent is a function of the input, which the activation overwrites: build it
            # from a copy, so that its autograd graph does not save the overwritten tensor.
            z = z.clone()
        out = func(*args, **kwargs)
        tape.depends_on_source_through("smooth activation", name)
        tape.keep(out if reads_output else z)
        tape.emit([out], tangent_of(z, None if inplace else out, args, kwargs), [args[0]])
        return out

    return rule


# ---------------------------------------------------------------------------------------
# LayerNorm and GroupNorm: their exact Jacobian (per sample, no coupling)
# ---------------------------------------------------------------------------------------
def _normalised_tangent(t, x_hat, invstd, dims):
    """``invstd * (t - mean(t) - x_hat * mean(x_hat * t))`` with means over ``dims``."""
    centred = t - t.mean(dims, keepdim=True)
    return invstd * (centred - x_hat * (x_hat * t).mean(dims, keepdim=True))


def layer_norm(tape, func, name, args, kwargs):
    a = _arguments(F.layer_norm, args, kwargs)
    x, shape, weight, eps = a["input"], tuple(a["normalized_shape"]), a["weight"], a["eps"]
    if tape.carries(weight) or tape.carries(a["bias"]):
        raise UnsupportedOpError(f"{name} with input-dependent affine parameters")
    dims = tuple(range(x.dim() - len(shape), x.dim()))
    mean = x.mean(dims, keepdim=True)
    invstd = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + eps)
    x_hat = (x - mean) * invstd
    out = func(*args, **kwargs)
    tape.depends_on_source_through("normalisation", name)

    def tangent(t):
        normalised = _normalised_tangent(t, x_hat, invstd, dims)
        return normalised if weight is None else normalised * weight

    tape.emit([out], tangent, [x])
    return out


def group_norm(tape, func, name, args, kwargs):
    a = _arguments(F.group_norm, args, kwargs)
    x, groups, weight, eps = a["input"], a["num_groups"], a["weight"], a["eps"]
    if tape.carries(weight) or tape.carries(a["bias"]):
        raise UnsupportedOpError(f"{name} with input-dependent affine parameters")
    grouped_shape = (x.shape[0], groups, -1)
    xg = x.reshape(grouped_shape)
    mean = xg.mean(-1, keepdim=True)
    invstd = torch.rsqrt(xg.var(-1, unbiased=False, keepdim=True) + eps)
    x_hat = (xg - mean) * invstd
    channel_shape = (1, -1) + (1,) * (x.dim() - 2)
    out = func(*args, **kwargs)
    tape.depends_on_source_through("normalisation", name)

    def tangent(t):
        normalised = _normalised_tangent(t.reshape(grouped_shape), x_hat, invstd, -1).reshape(t.shape)
        return normalised if weight is None else normalised * weight.view(channel_shape)

    tape.emit([out], tangent, [x])
    return out


# ---------------------------------------------------------------------------------------
# Max pooling: gather at the argmax indices of the primal
# ---------------------------------------------------------------------------------------
_MAX_POOL_WITH_INDICES = {
    "torch.nn.functional.max_pool1d": F.max_pool1d_with_indices,
    "torch.nn.functional.max_pool2d": F.max_pool2d_with_indices,
    "torch.nn.functional.max_pool3d": F.max_pool3d_with_indices,
    "torch.nn.functional.max_pool1d_with_indices": F.max_pool1d_with_indices,
    "torch.nn.functional.max_pool2d_with_indices": F.max_pool2d_with_indices,
    "torch.nn.functional.max_pool3d_with_indices": F.max_pool3d_with_indices,
    "torch.nn.functional.adaptive_max_pool1d": F.adaptive_max_pool1d_with_indices,
    "torch.nn.functional.adaptive_max_pool2d": F.adaptive_max_pool2d_with_indices,
    "torch.nn.functional.adaptive_max_pool3d": F.adaptive_max_pool3d_with_indices,
    "torch.nn.functional.adaptive_max_pool1d_with_indices": F.adaptive_max_pool1d_with_indices,
    "torch.nn.functional.adaptive_max_pool2d_with_indices": F.adaptive_max_pool2d_with_indices,
    "torch.nn.functional.adaptive_max_pool3d_with_indices": F.adaptive_max_pool3d_with_indices,
}


def max_pool(tape, func, name, args, kwargs):
    with_indices = _MAX_POOL_WITH_INDICES[name]
    arguments = _arguments(with_indices, args, kwargs)
    # The *_with_indices functions always return the pair, whatever return_indices says.
    wants_indices = arguments["return_indices"] or name.endswith("_with_indices")
    arguments["return_indices"] = True
    values, indices = with_indices(**arguments)
    # Indices address the flattened spatial positions of each (sample, channel) plane.
    lead = values.dim() - int(re.search(r"(\d)d", name).group(1))

    def tangent(t):
        return t.flatten(lead).gather(lead, indices.flatten(lead)).view(values.shape)

    tape.emit([values], tangent, [args[0]])
    return (values, indices) if wants_indices else values


# ---------------------------------------------------------------------------------------
# Dropout and BatchNorm
# ---------------------------------------------------------------------------------------
def dropout(tape, func, name, args, kwargs):
    """Train-mode dropout is ``x * mask / (1 - p)``. The rule makes the same RNG draws as the
    unrecorded call, so output and mask are the same as without the tape, and keeps the mask:

    * ``F.dropout`` out of place on a GPU tensor (0 < p < 1, non-empty) is ATen's fused
      ``native_dropout``, whose kernel (hence its draws) depends on the layout of ``x``
      (``get_vector_size`` in ATen's Dropout.cu): call it on ``x`` itself and take its mask.
    * Everything else (CPU, in place on any device, feature dropout) draws ``bernoulli_`` on a
      fresh tensor shaped like ``x`` (``empty_like(x)``, or (N, C, 1, ...) for feature dropout)
      and multiplies: the same function on ``ones_like(x)`` with the same ``inplace`` flag
      returns the scaled mask from the same draws.
    """
    arguments = _arguments(func, args, kwargs)
    x, p, training, inplace = (arguments[k] for k in ("input", "p", "training", "inplace"))
    if not training or p == 0:
        out = func(*args, **kwargs)
        tape.emit([out], lambda t: t, [x])
        return out
    if inplace:
        tape.check_inplace_target(x, name)
    fused = (
        name == "torch.nn.functional.dropout" and not inplace and x.device.type != "cpu" and 0 < p < 1 and x.numel() > 0
    )
    if fused:
        out, mask = torch.native_dropout(x, p, True)
        scale = 1.0 / (1.0 - p)
        tape.emit([out], lambda t: torch.ops.aten.native_dropout_backward(t, mask, scale), [x])
        return out
    scaled_mask = func(torch.ones_like(x), p, True, bool(inplace))
    out = x.mul_(scaled_mask) if inplace else x * scaled_mask
    tape.emit([out], lambda t: t * scaled_mask, [x])
    return out


def batch_norm(tape, func, name, args, kwargs):
    a = _arguments(F.batch_norm, args, kwargs)
    x, weight, training, eps = a["input"], a["weight"], a["training"], a["eps"]
    if any(tape.carries(a[k]) for k in ("running_mean", "running_var", "weight", "bias")):
        raise UnsupportedOpError(f"{name} with input-dependent statistics or affine parameters")
    channel_shape = (1, -1) + (1,) * (x.dim() - 2)
    reduce_dims = [0] + list(range(2, x.dim()))
    if training:
        # Batch statistics: the normalisation couples the samples. Exact Jacobian:
        #   J t = gamma / sigma_B * (t - mean(t) - x_hat * mean(x_hat * t)),  means over (N, spatial)
        mean = x.mean(reduce_dims, keepdim=True)
        invstd = torch.rsqrt(x.var(reduce_dims, unbiased=False, keepdim=True) + eps)
        x_hat = (x - mean) * invstd
        scale = invstd if weight is None else invstd * weight.view(channel_shape)
        out = func(*args, **kwargs)
        tape.couples_samples = True
        tape.depends_on_source_through("batch statistics", name)

        def tangent(t):
            centred = t - t.mean(reduce_dims, keepdim=True)
            return scale * (centred - x_hat * (x_hat * t).mean(reduce_dims, keepdim=True))
    else:
        out = func(*args, **kwargs)
        scale = torch.rsqrt(a["running_var"] + eps)
        if weight is not None:
            scale = scale * weight
        scale = scale.view(channel_shape)

        def tangent(t):
            return t * scale

    tape.emit([out], tangent, [x])
    return out


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------
_OUTPLACE = {
    "torch.Tensor.mul_": torch.mul,
    "torch.Tensor.__imul__": torch.mul,
    "torch.Tensor.div_": torch.div,
    "torch.Tensor.__itruediv__": torch.div,
}

RULES: dict = {}


def _register(names, rule):
    for name in names:
        RULES[name] = rule


_T = "torch.Tensor."
_F = "torch.nn.functional."
_register([_F + f"conv{d}d" for d in (1, 2, 3)] + [f"torch.conv{d}d" for d in (1, 2, 3)], bias_free(2))
_register(
    [_F + f"conv_transpose{d}d" for d in (1, 2, 3)] + [f"torch.conv_transpose{d}d" for d in (1, 2, 3)], bias_free(2)
)
_register([_F + "linear"], bias_free(2))
_register(
    [
        "torch.matmul",
        "torch.mm",
        "torch.bmm",
        _T + "matmul",
        _T + "mm",
        _T + "bmm",
        _T + "__matmul__",
        _T + "__rmatmul__",
        "torch.mul",
        _T + "mul",
        _T + "mul_",
        _T + "__mul__",
        _T + "__rmul__",
        _T + "__imul__",
        "torch.div",
        _T + "div",
        _T + "div_",
        _T + "__truediv__",
        _T + "__itruediv__",
        "torch.true_divide",
    ],
    product,
)
_register(
    [
        "torch.add",
        _T + "add",
        _T + "add_",
        _T + "__add__",
        _T + "__radd__",
        _T + "__iadd__",
        "torch.sub",
        _T + "sub",
        _T + "sub_",
        _T + "__sub__",
        _T + "__isub__",
        _T + "__rsub__",
        "torch.rsub",
    ],
    add_sub,
)
_register(["torch.neg", _T + "neg", _T + "__neg__"], neg)
_register(["torch.where", _T + "where"], where)
_register(["torch.cat", "torch.concat", "torch.concatenate", "torch.stack"], concat)
_register(
    [
        _T + "detach",
        "torch.detach",
        "torch.zeros_like",
        "torch.ones_like",
        "torch.empty_like",
        "torch.full_like",
        "torch.rand_like",
        "torch.randn_like",
        _T + "new_zeros",
        _T + "new_ones",
        _T + "new_empty",
        _T + "new_full",
    ],
    no_tangent,
)
# An accessor returns a tensor that already exists: it keeps whatever tangent the tape gave it
# (FSDP2's pre-backward hook reads ``output._base`` to warn about views).
_register([_T + "_base.__get__"], no_tangent)
_register([_F + "relu", _F + "relu_", "torch.relu", "torch.relu_", _T + "relu", _T + "relu_"], relu)
_register([_F + "leaky_relu", _F + "leaky_relu_"], leaky_relu)
_register([_F + "hardtanh", _F + "hardtanh_", _F + "relu6"], hardtanh)
_register(list(_MAX_POOL_WITH_INDICES), max_pool)
_register([_F + "dropout", _F + "dropout1d", _F + "dropout2d", _F + "dropout3d"], dropout)
_register([_F + "batch_norm"], batch_norm)
_register([_F + "layer_norm"], layer_norm)
_register([_F + "group_norm"], group_norm)
_register([_F + "silu"], smooth(_silu_tangent, inplace_at=1))
_register([_F + "gelu"], smooth(_gelu_tangent))
_register([_F + "softplus"], smooth(_softplus_tangent))
_register([_F + "elu", _F + "elu_"], smooth(_elu_tangent, inplace_at=2))
_register(["torch.tanh", _T + "tanh", _F + "tanh"], smooth(_tanh_tangent, reads_output=True))
_register(["torch.sigmoid", _T + "sigmoid", _F + "sigmoid"], smooth(_sigmoid_tangent, reads_output=True))
_register(["torch.softmax", _T + "softmax", _F + "softmax"], softmax)
_register(["torch.log_softmax", _T + "log_softmax", _F + "log_softmax"], log_softmax)
_register([_F + "scaled_dot_product_attention"], scaled_dot_product_attention)
_register([_F + "multi_head_attention_forward"], multi_head_attention)
_register([_F + "pad"], pad)
_register(
    [_F + f"avg_pool{d}d" for d in (1, 2, 3)]
    + [_F + f"adaptive_avg_pool{d}d" for d in (1, 2, 3)]
    + ["torch.avg_pool1d", _F + "interpolate", _F + "pixel_shuffle", _F + "pixel_unshuffle"]
    + [
        "torch.flatten",
        "torch.reshape",
        "torch.permute",
        "torch.transpose",
        "torch.squeeze",
        "torch.unsqueeze",
        "torch.mean",
        "torch.sum",
        "torch.chunk",
        "torch.split",
        "torch.narrow",
        "torch.select",
        "torch.movedim",
        "torch.flip",
        "torch.roll",
        "torch.clone",
        "torch.t",
        "torch.unbind",
    ]
    + [
        _T + n
        for n in (
            "flatten",
            "view",
            "view_as",
            "reshape",
            "reshape_as",
            "permute",
            "transpose",
            "t",
            "contiguous",
            "squeeze",
            "unsqueeze",
            "__getitem__",
            "expand",
            "expand_as",
            "repeat",
            "clone",
            "narrow",
            "select",
            "mean",
            "sum",
            "chunk",
            "split",
            "unbind",
            "movedim",
            "flip",
            "roll",
            "to",
            "float",
            "double",
            "half",
            "bfloat16",
            "type",
            "type_as",
            "cuda",
            "cpu",
            "__pos__",
            "positive",
            "T.__get__",
            "mT.__get__",
        )
    ]
    + ["torch.positive"],
    same_op,
)

SUPPORTED_OPS = frozenset(RULES)
