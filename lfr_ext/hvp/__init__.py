r"""How LFR's second-order products are computed: the ``hvp=`` selector.

Every inner ascent step needs the input gradient ``g = grad_x' sum_i l_i`` and the
Hessian-vector product ``h = H v`` with ``v = d sum_i ||g_i||_q / dg`` (``sign(g)`` for q=1);
the penalty needs ``grad_theta mean_i ||g_i||_q``.

==================== ====================================================================
``double_backprop``  the authors' way: ``create_graph=True`` and a gradient of a gradient
                     (exact, any model; ~4.7x a gradient per HVP on GPU)
``linearized``       the exact linearized tangent pass (:mod:`lfr_ext.linearized`), for the
                     cross-entropy loss: for networks piecewise linear in x,
                     ``H v = J^T (diag(p) - p p^T) J v``: one tangent pass plus one VJP
                     through the graph the gradient pass kept (~2 gradients per step); for
                     any other network of covered ops (smooth activations, normalisations,
                     softmax, attention) ``H v = grad_x[(p - e_y)^T J(x) v]``, the tangent
                     replayed under autograd and one more backward. The
                     penalty's weight gradient backprops ``sum_i (p_i - e_{y_i})^T (J s)_i``
                     with ``s = d||g||_q/dg`` fixed, which equals ``sum_i ||g_i||_q`` as a
                     function of the weights around the current point: exact, train-mode
                     BatchNorm included. (For q=2, ``s = g/||g||`` moves with the weights, so
                     only first derivatives are exact, which is what training uses; for
                     q=1 and inf, ``s`` is locally constant and all orders are exact.)
``forward``          ``torch.func`` forward-over-reverse for the inner HVPs (exact for
                     smooth and piecewise-linear models; measured slower on GPU); the
                     penalty uses double backprop (never forward AD for the outer gradient:
                     PyTorch's train-mode batch_norm forward-AD rule is wrong there).
``finite_difference``central differences of the gradient along ``v`` (an approximation:
                     O(r^2) inside a linear region, arbitrary across ReLU kinks); the
                     penalty uses double backprop. Never picked by ``auto``.
``compiled``         double backprop with each inner step and the penalty step compiled
                     whole by ``torch.compile`` (autograd traced into the graph,
                     :mod:`lfr_ext.hvp.compiled`); penalty exact to first order, batch-reduced
                     only. Never picked by ``auto``.
``auto``             ``linearized`` when the loss is the default cross-entropy and every op
                     of the model is covered, else ``double_backprop`` (with a one-time
                     warning naming the op that is not covered). Op classes measured slower
                     on the linearized engine (:data:`AUTO_DECLINED_CLASSES`, shown by
                     ``python -m lfr_ext.info``) are left to double backprop too.
==================== ====================================================================

:class:`SecondOrderEngine` (:mod:`lfr_ext.hvp.policy`) resolves ``hvp=`` for one call and
computes both the inner products and the penalty, each method in a module of its own
(:mod:`lfr_ext.hvp.double_backprop`, ``.linearized``, ``.forward``, ``.finite_difference``,
``.compiled``); what it learns about a model (a refused recording, a verified one) lives in
one explicit :class:`EngineCache`, :data:`CACHE` (:mod:`lfr_ext.hvp.cache`).
"""

from __future__ import annotations

from . import compiled
from .cache import CACHE, EngineCache
from .double_backprop import twice_differentiable_attention
from .finite_difference import FINITE_DIFFERENCE_RADIUS, grad_and_hvp_finite_difference
from .forward import grad_and_hvp_forward
from .linearized import grad_and_hvp_linearized, penalty_linearized
from .policy import AUTO_DECLINED_CLASSES, HVP_METHODS, SecondOrderEngine
from .subgradient import norm_subgradient

__all__ = ["AUTO_DECLINED_CLASSES", "CACHE", "EngineCache", "FINITE_DIFFERENCE_RADIUS", "HVP_METHODS",
           "SecondOrderEngine", "compiled", "grad_and_hvp_finite_difference", "grad_and_hvp_forward",
           "grad_and_hvp_linearized", "norm_subgradient", "penalty_linearized", "twice_differentiable_attention"]
