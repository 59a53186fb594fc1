"""Which implementation of an op runs (the C++ CPU kernels, the CUDA kernels, Triton, or the
pure-PyTorch reference), and that the choice does not change the penalty.

``impl="auto"`` (or None) takes the first implementation available for the device and dtype;
``LFR_EXT_IMPL`` overrides it; a value that is not an implementation is refused, and an
implementation asked for (by argument or environment) that cannot run here raises with the
reason, from the ops and from ``flatness_penalty`` alike.
"""

import pytest
import torch

import lfr_ext
from lfr_ext.models import SmallCNN
from tests.op_cases import impl_device_cases, make_inputs

KW = dict(eps=0.1, step_size=0.01, steps=2)


@pytest.fixture
def data():
    return SmallCNN(zero_init_last=False), torch.rand(3, 1, 28, 28), torch.randint(0, 10, (3,))


def test_auto_picks_the_first_available_and_env_overrides(monkeypatch):
    x, x_adv, h, g = make_inputs((2, 5), torch.float32, "cpu")
    available = lfr_ext.ops.available_impls("cpu")
    assert available[0] == lfr_ext.ops.resolve_impl("auto", torch.device("cpu"))
    assert "reference" in available
    monkeypatch.setenv("LFR_EXT_IMPL", "reference")
    assert lfr_ext.ops.resolve_impl(None, torch.device("cpu")) == "reference"
    monkeypatch.setenv("LFR_EXT_IMPL", "fastest")
    with pytest.raises(ValueError, match="LFR_EXT_IMPL must be one of"):
        lfr_ext.ops.ascent_step(x, x_adv, h, g, eps=0.1, step_size=0.01)
    with pytest.raises(ValueError, match="impl must be one of"):
        lfr_ext.ops.ascent_step(x, x_adv, h, g, eps=0.1, step_size=0.01, impl="fastest")


def test_env_var_selects_impl(data, monkeypatch):
    model, x, y = data
    monkeypatch.setenv("LFR_EXT_IMPL", "nonsense")
    with pytest.raises(ValueError, match="LFR_EXT_IMPL must be one of"):
        lfr_ext.flatness_penalty(model, x, y, **KW)


def test_explicit_but_unavailable_impl_raises_with_the_reason():
    x, x_adv, h, g = make_inputs((2, 5), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"impl='cuda' is not available on cpu: the CUDA kernels take CUDA"):
        lfr_ext.ops.ascent_step(x, x_adv, h, g, eps=0.1, step_size=0.01, impl="cuda")
    if "triton" in lfr_ext.ops.available_impls("cpu"):  # the Triton kernels have no fp64
        with pytest.raises(RuntimeError, match="fp32, bf16 and fp16"):
            lfr_ext.ops.grad_norm(g.double(), 1, impl="triton")
        assert lfr_ext.ops.resolve_impl("auto", torch.device("cpu"), torch.float64) != "triton"
    else:
        with pytest.raises(RuntimeError, match="impl='triton' is not available"):
            lfr_ext.ops.ascent_step(x, x_adv, h, g, eps=0.1, step_size=0.01, impl="triton")


def test_unavailable_impl_raises_clearly(data):
    model, x, y = data
    with pytest.raises(RuntimeError, match="impl='cuda' is not available on cpu"):
        lfr_ext.flatness_penalty(model, x, y, impl="cuda", **KW)


def test_impl_selection_without_the_library(monkeypatch):
    from lfr_ext import _extension

    broken = _extension.ExtensionStatus(False, error="compiled library lfr_ext/_C not found")
    monkeypatch.setattr(_extension, "status", lambda: broken)
    assert "cpu" not in lfr_ext.ops.available_impls("cpu")
    with pytest.raises(RuntimeError, match="impl='cpu' is not available on cpu: compiled library"):
        lfr_ext.ops.resolve_impl("cpu", torch.device("cpu"))


@pytest.mark.parametrize("impl, device", impl_device_cases())
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_flatness_penalty_same_with_every_impl(impl, device, train):
    """In train mode the Dropout masks of the penalty pass are drawn from the same seed."""
    torch.manual_seed(0)
    model = SmallCNN(zero_init_last=False).to(device).train(train)
    x, y = torch.rand(2, 1, 28, 28, device=device), torch.randint(0, 10, (2,), device=device)
    kw = dict(eps=0.1, step_size=0.02, steps=2, q=1)

    def penalty(which):
        torch.manual_seed(0)  # same Dropout masks in the train-mode penalty pass
        generator = torch.Generator(device=device).manual_seed(0)
        return lfr_ext.flatness_penalty(model, x, y, impl=which, generator=generator, **kw)

    torch.testing.assert_close(penalty(impl), penalty("reference"), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "triton_version, numpy_version, broken",
    [
        ("3.6.0", "2.4.6", True),
        ("3.6.0", "2.5.2", True),
        ("3.6.0", "2.3.5", False),
        ("3.7.0", "2.5.2", False),
        ("3.9.0", "2.4.0", False),
        ("4.0.0", "2.4.0", False),
        ("3.6.0", "1.26.4", False),
    ],
)
def test_triton_interpreter_refuses_the_numpy_it_cannot_run_with(triton_version, numpy_version, broken):
    """Triton before 3.7 interprets with int() of one-element arrays, which numpy 2.4 removed: the
    pair is refused in one sentence that names both versions and the way out."""
    problem = lfr_ext._impl.interpreter_problem(triton_version, numpy_version)
    if broken:
        assert problem == (
            f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) cannot run with numpy "
            f"{numpy_version}: install numpy<2.4 or triton>=3.7"
        )
    else:
        assert problem is None
