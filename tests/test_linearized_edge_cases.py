"""Models that stress the tangent tape's edges. Whatever the tape does with them (record,
refuse, fall back), hvp='auto' must give exactly what double backprop gives."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lfr_ext
from lfr_ext.linearized import TangentTape
from tests.utils import DEVICES, assert_grads_close, double_vjp_jvp, params_grads, rel_err


class _Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def head(self, t):
        return self.fc(F.max_pool2d(t, 2).flatten(1))


class BatchStatsInEval(_Base):
    """BatchNorm without running statistics: batch statistics even in eval mode (not piecewise linear)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


class NoGradStatistic(_Base):
    """A normaliser computed under no_grad: a constant for autograd, so for the tape too."""

    def forward(self, x):
        with torch.no_grad():
            scale = x.abs().mean() + 0.5
        return self.head(torch.relu(self.conv(x / scale)))


class SetItem(_Base):
    def forward(self, x):
        t = self.conv(x)
        t[:, 0] = 0.0
        return self.head(torch.relu(t))


class InplaceIntoConstant(_Base):
    def forward(self, x):
        acc = torch.zeros(x.shape[0], 4, 8, 8, dtype=x.dtype)
        acc += self.conv(x)
        return self.head(torch.relu(acc))


class IntegerCasts(_Base):
    def forward(self, x):
        t = self.conv(x)
        bucket = (t * 3).to(torch.long).to(t.dtype)  # piecewise constant: zero derivative
        rounded = torch.div(t, 0.7, rounding_mode="floor")
        return self.head(torch.relu(t) + 0.1 * bucket + 0.01 * rounded)


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return -grad


class GradientReversal(_Base):
    def forward(self, x):
        return self.head(torch.relu(_Reverse.apply(self.conv(x))))


class BatchMean(_Base):
    """Mixes samples without BatchNorm: a mean over the batch."""

    def forward(self, x):
        t = self.conv(x)
        return self.head(torch.relu(t - t.mean(0, keepdim=True)))


class DirectPoolWithIndices(_Base):
    def forward(self, x):
        pooled, _ = F.max_pool2d_with_indices(torch.relu(self.conv(x)), 2)
        return self.fc(pooled.flatten(1))


class WhereMethod(_Base):
    def forward(self, x):
        t = self.conv(x)
        return self.head(t.where(t > 0, 0.2 * t))


class DropoutCoupled(_Base):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.bn(self.conv(x)))))


ZOO = [
    BatchStatsInEval,
    NoGradStatistic,
    SetItem,
    InplaceIntoConstant,
    IntegerCasts,
    GradientReversal,
    BatchMean,
    DirectPoolWithIndices,
    WhereMethod,
    DropoutCoupled,
]


def _data(seed=0):
    torch.manual_seed(seed)
    return torch.rand(4, 2, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 1])


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("cls", ZOO, ids=lambda c: c.__name__)
def test_auto_equals_double_backprop(cls, reduction):
    torch.manual_seed(0)
    model = cls().double().train()
    x, y = _data()
    results = {}
    for hvp in ("double_backprop", "auto"):
        torch.manual_seed(9)  # same start noise and Dropout masks
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # auto may fall back, with a warning
            value = lfr_ext.flatness_penalty(model, x, y, eps=0.1, step_size=0.02, steps=3, reduction=reduction)
        results[hvp] = value
        if reduction == "none":
            results[hvp + "_grads"] = [params_grads(model, value[i]) for i in range(len(x))]
        else:
            results[hvp + "_grads"] = [params_grads(model, value)]
    assert rel_err(results["auto"], results["double_backprop"]) < 1e-10
    for got, expected in zip(results["auto_grads"], results["double_backprop_grads"]):
        assert_grads_close(got, expected, 1e-10)
    # The RNG stream ends where double backprop leaves it (a fallback redraws, never skews).
    torch.manual_seed(9)
    lfr_ext.flatness_penalty(model, x, y, eps=0.1, step_size=0.02, steps=3, reduction=reduction, hvp="double_backprop")
    after_reference = torch.rand(3)
    torch.manual_seed(9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lfr_ext.flatness_penalty(model, x, y, eps=0.1, step_size=0.02, steps=3, reduction=reduction)
    assert torch.equal(torch.rand(3), after_reference)


@pytest.mark.parametrize(
    "cls",
    [BatchStatsInEval, NoGradStatistic, IntegerCasts, DirectPoolWithIndices, WhereMethod],
    ids=lambda c: c.__name__,
)
def test_recorded_tangent_matches_oracle(cls):
    torch.manual_seed(0)
    model = cls().double().eval()
    x, _ = _data()
    v = torch.randn_like(x)
    source = x.clone().requires_grad_(True)
    with TangentTape(source) as tape:
        out = model(source)
    assert rel_err(tape.tangent(v, out), double_vjp_jvp(model, x, v, seed=0)) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "in_place"])
@pytest.mark.parametrize("layout", ["contiguous", "misaligned"])
def test_dropout_rule_draws_what_the_unrecorded_call_draws(device, inplace, layout):
    """F.dropout's kernel, hence its RNG draws, depend on the device, the in-place flag (on CUDA
    the fused native_dropout out of place, bernoulli_ in place) and the layout (the fused
    kernel vectorises aligned inputs only): the tape must see the same output and mask.
    The taped source has the layout of the untaped input."""
    base = torch.rand(6, 33, device=device)
    x = base[:, 1:] if layout == "misaligned" else base[:, :32].contiguous()
    source = (base.clone()[:, 1:] if layout == "misaligned" else x.clone()).requires_grad_(True)
    assert source.stride() == x.stride() and source.data_ptr() % 16 == x.data_ptr() % 16

    def forward(t):
        if inplace:
            t = t * 1.0  # in-place dropout on a fresh tensor (the tape refuses in-place writes into views)
        return F.dropout(t, 0.4, True, inplace)

    torch.manual_seed(3)
    expected = forward(x)
    torch.manual_seed(3)
    with TangentTape(source) as tape:
        out = forward(source)
    assert torch.equal(out, expected)
    v = torch.randn_like(x)
    torch.testing.assert_close(tape.tangent(v, out), v * (expected != 0) / 0.6)


def test_host_sync_error_inside_a_rule_is_not_an_uncovered_op(monkeypatch):
    """Under torch.cuda.set_sync_debug_mode("error") (GraphedStep's host-sync check) a rule's
    synchronising call must surface as that error, not as an uncovered op, which would send
    hvp='auto' to double backprop for good."""
    from lfr_ext._cuda import SYNC_ERROR
    from lfr_ext.linearized import rules

    def syncing_relu(tape, func, name, args, kwargs):
        raise RuntimeError(SYNC_ERROR)

    for name in ("torch.relu", "torch.nn.functional.relu"):
        monkeypatch.setitem(rules.RULES, name, syncing_relu)
    x = torch.rand(2, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match=SYNC_ERROR) as caught, TangentTape(x):
        torch.relu(x * 2.0)
    assert not isinstance(caught.value, lfr_ext.linearized.UnsupportedOpError)
