"""Checks that a recording of :class:`lfr_ext.linearized.TangentTape` is the model's Jacobian
before the engine trusts it: no custom ``autograd.Function`` whose backward the tape cannot see,
an adjoint test against autograd, and whether the recorded map couples samples."""

from __future__ import annotations

import torch

from .calls import UnsupportedOpError
from .tape import TangentTape

# Tolerance of the adjoint test per dtype: rounding (TF32 convolutions included) stays far
# below it, a branch the tape did not see gives an O(1) disagreement.
_ADJOINT_RTOL = {torch.float64: 1e-8, torch.float32: 1e-2}


def custom_functions(root, ignore: tuple[type, ...] = ()) -> list[str]:
    """Names of custom ``autograd.Function`` nodes in the graph behind ``root``: their
    backward may not be the derivative of the forward the tape recorded (straight-through
    estimators, gradient reversal), so they are refused. Subclasses of ``ignore`` (wrappers'
    identity functions, such as FSDP2's post-backward registration) are not counted."""
    found, seen, stack = [], set(), [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction) and not issubclass(node._forward_cls, ignore):
            found.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def verify_recording(
    tape: TangentTape, x: torch.Tensor, logits: torch.Tensor, ignore_functions: tuple[type, ...] = ()
) -> bool:
    """Check the recording against autograd before trusting it; return whether samples couple.

    * No custom ``autograd.Function`` in the graph but ``ignore_functions`` (see
      :func:`custom_functions`).
    * Adjoint test with random ``v`` (like ``x``) and ``w`` (like the logits):
      ``w^T (J v)`` from the tape must equal ``(J^T w)^T v`` from autograd. A computation the
      tape did not see (``torch._C.DisableTorchFunction``, a compiled region) breaks it.
    * Coupling: ``v`` supported on sample 0 only must give a tangent that is exactly 0 on the
      other samples, unless an op mixes samples (batch statistics, a mean over the batch).

    Costs one VJP, two tangent passes and one host sync; run once per model and module modes.
    """
    custom = custom_functions(logits, ignore_functions)
    if custom:
        raise UnsupportedOpError(f"custom autograd.Function {custom[0]}")
    generator = torch.Generator(device=x.device).manual_seed(0)  # private: the global RNG is the user's
    v = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    w = torch.randn(logits.shape, generator=generator, device=x.device, dtype=logits.dtype)
    (jt_w,) = torch.autograd.grad(logits, x, grad_outputs=w, retain_graph=True)
    with torch.no_grad():
        jv = tape.tangent(v, logits)
        v0 = torch.zeros_like(v)
        v0[:1] = v[:1]
        leak = tape.tangent(v0, logits)[1:].abs().sum()
        tape_side = (w.double() * jv.double()).sum()
        autograd_side = (jt_w.double() * v.double()).sum()
        scale = (w.double() * jv.double()).abs().sum() + (jt_w.double() * v.double()).abs().sum()
        checks = torch.stack([(tape_side - autograd_side).abs(), scale, leak.double()]).tolist()
    gap, scale, leak = checks
    if not gap <= _ADJOINT_RTOL.get(logits.dtype, 5e-2) * scale:  # NaN fails too
        raise UnsupportedOpError(
            "a computation the tape did not record (a region hidden from torch's function API?): "
            f"the adjoint test w^T J v = (J^T w)^T v fails by {gap / max(scale, 1e-300):.2e} (relative)"
        )
    return leak > 0 or tape.couples_samples
