"""What each ``hvp=`` method is and supports, one frozen record per method.

Each method module declares its :class:`MethodFacts` as ``FACTS``; the policy
(:mod:`lfr_ext.hvp.policy`) checks requests against them, and the table of :mod:`lfr_ext.hvp`
and the method list of ``python -m lfr_ext.info`` are generated from them, so the documentation
cannot drift from what the code accepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class MethodFacts:
    """The facts of one ``hvp=`` method.

    * ``exact``: its inner ``H v`` is exact (not an approximation);
    * ``auto_may_choose``: ``hvp="auto"`` may run it;
    * ``takes_grad_scaler``: it runs with an fp16 ``grad_scaler`` (scaled backwards, see
      :mod:`lfr_ext.hvp.scaling`);
    * ``per_sample_penalty``: it gives per-sample penalties (``reduction="none"``);
    * ``penalty_differentiable_in_x``: its penalty is differentiable w.r.t. ``x`` too (when ``x``
      requires grad), not only w.r.t. the parameters;
    * ``needs_default_loss``: it needs the default cross-entropy loss (``loss_fn=None``);
    * ``devices``: the device types it runs on, or None for any device the model runs on;
    * ``description``: one line, for the table.
    """

    name: str
    description: str
    exact: bool
    auto_may_choose: bool
    takes_grad_scaler: bool = True
    per_sample_penalty: bool = True
    penalty_differentiable_in_x: bool = True
    needs_default_loss: bool = False
    devices: tuple[str, ...] | None = None

    def supports_device(self, device_type: str) -> bool:
        return self.devices is None or device_type in self.devices


TABLE_LEGEND = """\
exact: the inner ``H v`` is exact; auto: ``hvp="auto"`` may choose it; scaler: takes an fp16
``grad_scaler``; none: gives per-sample penalties (``reduction="none"``; ``linearized`` not
where the penalty pass couples samples, as train-mode BatchNorm does: there an explicit request
raises and ``auto`` runs double backprop); d/dx: the penalty is differentiable w.r.t. ``x`` too;
loss: the losses it takes (CE: the default cross-entropy only); devices: the device types it runs on."""


def facts_table(methods: Iterable[MethodFacts]) -> str:
    """A reStructuredText simple table of ``methods``, one row each, every field shown."""

    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    header = ("method", "exact", "auto", "scaler", "none", "d/dx", "loss", "devices", "what it is")
    rows = [
        (
            f"``{m.name}``",
            yes(m.exact),
            yes(m.auto_may_choose),
            yes(m.takes_grad_scaler),
            yes(m.per_sample_penalty),
            yes(m.penalty_differentiable_in_x),
            "CE" if m.needs_default_loss else "any",
            ", ".join(m.devices) if m.devices else "any",
            m.description,
        )
        for m in methods
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    rule = " ".join("=" * width for width in widths)

    def line(row) -> str:
        return " ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()

    return "\n".join([rule, line(header), rule, *map(line, rows), rule])
