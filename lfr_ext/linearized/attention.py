r"""Exact tangents of softmax and attention, for the linearized tangent pass.

Softmax is smooth, so, like the smooth activations, its linear map at ``x`` is built from the
primal output with autograd on (``tape.depends_on_source_through``: the inner HVP then differentiates
the tangent itself, see :mod:`lfr_ext.hvp`):

* ``p = softmax(z)``:       ``dp = p * (dz - sum(p * dz))`` along ``dim``;
* ``l = log_softmax(z)``:   ``dl = dz - sum(softmax(z) * dz)``.

Attention ``O = softmax(s Q K^T + M) V`` (scale ``s``, additive mask ``M``) is bilinear in
its operands around that softmax:

    ``dS = s (dQ K^T + Q dK^T)``,  ``dP = P * (dS - sum(P * dS))``,  ``dO = dP V + P dV``.

The primal output is the op's own (fused kernels included: only a first-order backward of
it is ever taken); ``P`` is recomputed by the math formula for the tangent, which is therefore
differentiable in ``x`` and in the weights. ``nn.MultiheadAttention``'s functional form is one
call to the tape (its inner ops run with the tape switched off), so its rule composes the
projections around the same tangent. Attention dropout is refused: its mask is drawn inside
the kernel, where the tape cannot read it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .calls import UnsupportedOpError, arguments


def _dim_of(name, args, kwargs, position: int = 1):
    dim = kwargs.get("dim", args[position] if len(args) > position else None)
    if dim is None:
        raise UnsupportedOpError(f"{name} without dim (its implicit dim is deprecated)")
    return dim


def softmax(tape, func, name, args, kwargs):
    dim = _dim_of(name, args, kwargs)
    out = func(*args, **kwargs)
    tape.depends_on_source_through("softmax", name)
    tape.keep(out)

    def tangent(t):  # softmax's Jacobian is symmetric: its JVP is ATen's fused backward kernel
        return torch.ops.aten._softmax_backward_data(t.to(out.dtype), out, dim, out.dtype)

    tape.emit([out], tangent, [args[0]])
    return out


def log_softmax(tape, func, name, args, kwargs):
    dim = _dim_of(name, args, kwargs)
    out = func(*args, **kwargs)
    probabilities = out.exp()
    tape.depends_on_source_through("softmax", name)

    def tangent(t):
        t = t.to(out.dtype)
        return t - (probabilities * t).sum(dim, keepdim=True)

    tape.emit([out], tangent, [args[0]])
    return out


# ---------------------------------------------------------------------------------------
# Scaled dot-product attention
# ---------------------------------------------------------------------------------------
def _probabilities(q_scaled, k, additive_mask):
    """``softmax(q_scaled k^T + additive_mask)`` (..., L, S), ``q_scaled = scale * q``,
    differentiable in q and k. A row whose keys are all masked is 0, as PyTorch's attention gives
    it (a plain softmax gives NaN); its scores are zeroed first, so that no NaN reaches the
    backward either. (The scale is applied to q, (..., L, E), not to the (..., L, S) scores.)"""
    scores = q_scaled @ k.transpose(-2, -1)
    if additive_mask is None:
        return torch.softmax(scores, dim=-1)
    scores = scores + additive_mask
    blocked = torch.isneginf(additive_mask).all(-1, keepdim=True)
    return torch.softmax(scores.masked_fill(blocked, 0.0), dim=-1).masked_fill(blocked, 0.0)


def _additive(mask, true_means_masked: bool, like: torch.Tensor):
    """A boolean or additive attention mask as an additive float mask in ``like``'s dtype."""
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(like.dtype)
    blocked = mask if true_means_masked else ~mask
    return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(blocked, float("-inf"))


def _causal(length: int, source_length: int, like: torch.Tensor):
    keep = torch.ones(length, source_length, dtype=torch.bool, device=like.device).tril()
    return _additive(keep, False, like)


def probabilities_tangent(probabilities, q_scaled, k, tq, tk, scale: float):
    """``dP = P * (dS - sum(P * dS))`` for ``dS = (s dQ) K^T + (s Q) dK^T``; None when both
    tangents are (zero). (..., L, S)."""
    scores = None
    if tq is not None:
        scores = (tq * scale) @ k.transpose(-2, -1)
    if tk is not None:
        term = q_scaled @ tk.transpose(-2, -1)
        scores = term if scores is None else scores + term
    if scores is None:
        return None
    return torch.ops.aten._softmax_backward_data(scores, probabilities, -1, probabilities.dtype)


def attention_tangent(probabilities, t_probabilities, v, tv):
    """``dO = dP V + P dV``; ``None`` tangents are zero. (..., L, S), (..., S, Ev) -> (..., L, Ev)."""
    out = None if t_probabilities is None else t_probabilities @ v
    if tv is not None:
        term = probabilities @ tv
        out = term if out is None else out + term
    return out


def scaled_dot_product_attention(tape, func, name, args, kwargs):
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, *, scale,
    enable_gqa)``; a boolean ``attn_mask`` marks the pairs that take part (PyTorch's
    convention)."""
    a = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), args))
    a.update(kwargs)
    q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
    if a.get("dropout_p", 0.0) > 0:
        raise UnsupportedOpError(f"{name} with dropout_p > 0 (its dropout mask is drawn inside the kernel)")
    if tape.carries(mask):
        raise UnsupportedOpError(f"{name} with an input-dependent attn_mask")
    out = func(*args, **kwargs)
    scale = a.get("scale")
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    if a.get("enable_gqa", False) and k.size(-3) != q.size(-3):  # grouped-query: each K/V head serves a group
        group = q.size(-3) // k.size(-3)
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    else:
        group = 1
    additive = _causal(q.size(-2), k.size(-2), q) if a.get("is_causal", False) else _additive(mask, False, q)
    q_scaled = q * scale
    probabilities = _probabilities(q_scaled, k, additive)
    tape.depends_on_source_through("attention", name)
    tape.keep(a["query"], a["key"], a["value"])

    def tangent(tq, tk, tv):
        if group > 1:
            tk = None if tk is None else tk.repeat_interleave(group, dim=-3)
            tv = None if tv is None else tv.repeat_interleave(group, dim=-3)
        t_probabilities = probabilities_tangent(probabilities, q_scaled, k, tq, tk, scale)
        return attention_tangent(probabilities, t_probabilities, v, tv)

    tape.emit([out], tangent, [a["query"], a["key"], a["value"]])
    return out


# ---------------------------------------------------------------------------------------
# nn.MultiheadAttention (F.multi_head_attention_forward)
# ---------------------------------------------------------------------------------------
def multi_head_attention(tape, func, name, args, kwargs):
    """``F.multi_head_attention_forward``: projections, heads, attention, output projection.

    Inputs (L, N, E) / (S, N, E), or unbatched (L, E); the tangent of ``attn_output`` is
    ``W_o merge(dO)`` and that of the weights (when returned) ``dP``, head-averaged or not as
    the primal. Masks as the functional merges them: ``attn_mask`` (L, S) or (N*h, L, S) and
    ``key_padding_mask`` (N, S), boolean True = masked, or additive."""
    a = arguments(F.multi_head_attention_forward, args, kwargs)
    for key in ("bias_k", "bias_v", "static_k", "static_v"):
        if a[key] is not None:
            raise UnsupportedOpError(f"{name} with {key}")
    if a["add_zero_attn"]:
        raise UnsupportedOpError(f"{name} with add_zero_attn")
    if a["training"] and a["dropout_p"] > 0:
        raise UnsupportedOpError(f"{name} with dropout in training (its mask is drawn inside the kernel)")
    constant = (
        "in_proj_weight",
        "in_proj_bias",
        "out_proj_weight",
        "out_proj_bias",
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
        "attn_mask",
        "key_padding_mask",
    )
    if any(tape.carries(a[key]) for key in constant):
        raise UnsupportedOpError(f"{name} with input-dependent weights or masks")
    out, weights = func(*args, **kwargs)

    query, key, value = a["query"], a["key"], a["value"]
    batched = query.dim() == 3
    heads = a["num_heads"]
    embed = query.shape[-1]
    head_dim = embed // heads
    if a["use_separate_proj_weight"]:
        projections = [a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]]
    else:
        projections = list(a["in_proj_weight"].chunk(3))
    biases = [None] * 3 if a["in_proj_bias"] is None else list(a["in_proj_bias"].chunk(3))
    out_weight = a["out_proj_weight"]

    def heads_of(p):
        """(T, N, E) -> (N, h, T, d)."""
        return p.reshape(p.shape[0], p.shape[1], heads, head_dim).permute(1, 2, 0, 3)

    def project(inputs, with_bias: bool):
        """The q, k, v projections' heads of ``inputs`` (three (T, N, E) or (T, E) tensors, or
        None); self-attention with packed weights takes one product for the three."""
        inputs = [None if t is None else (t if batched else t.unsqueeze(1)) for t in inputs]
        if not a["use_separate_proj_weight"] and inputs[0] is not None and inputs[0] is inputs[1] is inputs[2]:
            packed_bias = a["in_proj_bias"] if with_bias else None
            return [heads_of(p) for p in F.linear(inputs[0], a["in_proj_weight"], packed_bias).chunk(3, dim=-1)]
        return [
            None if t is None else heads_of(F.linear(t, w, b if with_bias else None))
            for t, w, b in zip(inputs, projections, biases)
        ]

    q, k, v = project([query, key, value], with_bias=True)
    batch, length, source_length = q.shape[0], q.shape[2], k.shape[2]
    if a["is_causal"] and a["key_padding_mask"] is None and not a["need_weights"]:
        additive = _causal(length, source_length, q)  # the functional's own choice: attn_mask is a hint then
    else:
        additive = _additive(a["attn_mask"], True, q)
        if additive is not None and additive.dim() == 3:  # (N*h, L, S)
            additive = additive.view(batch, heads, length, source_length)
        padding = _additive(a["key_padding_mask"], True, q)
        if padding is not None:
            padding = padding.view(batch, 1, 1, source_length)
            additive = padding if additive is None else additive + padding
    scale = 1.0 / math.sqrt(head_dim)
    q_scaled = q * scale
    probabilities = _probabilities(q_scaled, k, additive)
    tape.depends_on_source_through("attention", name)

    def tangent(t_query, t_key, t_value):
        tq, tk, tv = project([t_query, t_key, t_value], with_bias=False)
        t_probabilities = probabilities_tangent(probabilities, q_scaled, k, tq, tk, scale)  # (N, h, L, S)
        t_heads = attention_tangent(probabilities, t_probabilities, v, tv)  # (N, h, L, d)
        t_out = F.linear(t_heads.permute(2, 0, 1, 3).reshape(length, batch, embed), out_weight)
        if not batched:
            t_out = t_out.squeeze(1)
        if weights is None:
            return t_out
        t_weights = torch.zeros_like(probabilities) if t_probabilities is None else t_probabilities
        if a["average_attn_weights"]:
            t_weights = t_weights.mean(1)
        return t_out, (t_weights if batched else t_weights.squeeze(0))

    outputs = [out] if weights is None else [out, weights]
    tape.emit(outputs, tangent, [query, key, value])
    return out, weights
