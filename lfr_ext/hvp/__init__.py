r"""How LFR's second-order products are computed: the ``hvp=`` selector.

Every inner ascent step needs the input gradient ``g = grad_x' sum_i l_i`` and the
Hessian-vector product ``h = H v`` with ``v = d sum_i ||g_i||_q / dg`` (``sign(g)`` for q=1);
the penalty needs ``grad_theta mean_i ||g_i||_q``. Each method is a module of this package,
whose docstring gives its math:

{methods}

{legend}

``auto`` (the default) runs ``linearized`` when the loss is the default cross-entropy and every
op of the model is covered, else ``double_backprop`` (with a one-time warning naming the op
that is not covered). Op classes measured slower on the linearized engine
(:data:`AUTO_DECLINED_CLASSES`, shown by ``python -m lfr_ext.info``) are left to double
backprop too. The measurements behind these choices are the files of bench/results/, listed
in bench/results/README.md.

:class:`SecondOrderEngine` (:mod:`lfr_ext.hvp.policy`) resolves ``hvp=`` for one call, checks
the request against the method's record (:mod:`lfr_ext.hvp.facts`) and computes both the inner
products and the penalty. fp16 loss scaling is in :mod:`lfr_ext.hvp.scaling`, the norm
subgradient ``v`` the methods share in :mod:`lfr_ext.hvp.subgradient`. What the engines
learn about a model (a refused recording, a verified one) lives in one
explicit :class:`EngineCache`, :data:`CACHE` (:mod:`lfr_ext.hvp.cache`).
"""

from __future__ import annotations

from . import compiled
from .cache import CACHE, EngineCache
from .double_backprop import twice_differentiable_attention
from .facts import TABLE_LEGEND, MethodFacts, facts_table
from .finite_difference import FINITE_DIFFERENCE_RADIUS, grad_and_hvp_finite_difference
from .forward import grad_and_hvp_forward
from .linearized import grad_and_hvp_linearized, penalty_linearized
from .policy import AUTO_DECLINED_CLASSES, HVP_METHODS, METHODS, SecondOrderEngine
from .subgradient import norm_subgradient

__all__ = [
    "AUTO_DECLINED_CLASSES",
    "CACHE",
    "EngineCache",
    "FINITE_DIFFERENCE_RADIUS",
    "HVP_METHODS",
    "METHODS",
    "MethodFacts",
    "SecondOrderEngine",
    "compiled",
    "grad_and_hvp_finite_difference",
    "grad_and_hvp_forward",
    "grad_and_hvp_linearized",
    "norm_subgradient",
    "penalty_linearized",
    "twice_differentiable_attention",
]

# The table is generated from the records, so it lists exactly what the policy accepts (no
# docstring to fill under python -OO).
if __doc__:
    __doc__ = __doc__.replace("{methods}", facts_table(METHODS.values())).replace("{legend}", TABLE_LEGEND)
