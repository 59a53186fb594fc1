"""hvp='compiled': double backprop with each inner step and the penalty step compiled whole
(autograd traced into the graph), checked against eager double backprop in fp64: the ascended
point, the penalty and every parameter gradient; Dropout draws the same masks."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lfr_ext
from lfr_ext.hvp import CACHE, compiled
from lfr_ext.models import SmallCNN
from lfr_ext.reference import default_loss, flatness_ascent_reference
from tests.models_for_tests import TinyResNet
from tests.utils import assert_grads_close, params_grads, rel_err

# No skip where the engine is unavailable: every supported torch (2.11 and later) must compile
# these steps, and a skip would hide the torch that cannot.
MODELS = {
    "small_cnn_dropout": (lambda: SmallCNN(drop=0.3, zero_init_last=False), (4, 1, 28, 28), 10),
    "resnet_bn": (TinyResNet, (4, 3, 10, 10), 5),
}
KW = dict(eps=0.1, step_size=0.02, steps=3)


def _problem(name):
    factory, shape, classes = MODELS[name]
    torch.manual_seed(0)
    model = factory().double().train()
    return model, torch.rand(shape, dtype=torch.float64), torch.randint(0, classes, (shape[0],))


def _equals_double_backprop(name):
    model, x, y = _problem(name)
    results = {}
    for hvp in ("double_backprop", "compiled"):
        torch.manual_seed(5)
        value = lfr_ext.flatness_penalty(model, x, y, hvp=hvp, **KW)
        results[hvp] = (value, params_grads(model, value))
    assert rel_err(results["compiled"][0], results["double_backprop"][0]) < 1e-12
    assert_grads_close(results["compiled"][1], results["double_backprop"][1], 1e-10)
    model.eval()
    points = []
    for hvp in ("double_backprop", "compiled"):
        plan = lfr_ext.hvp.SecondOrderEngine(hvp, model, True)
        points.append(
            flatness_ascent_reference(
                model, x, y, generator=torch.Generator().manual_seed(1), grad_and_hvp=plan.grad_and_hvp, **KW
            )[0]
        )
    assert torch.equal(points[0], points[1])


@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_equals_double_backprop_fp64_aot_eager(monkeypatch, name):
    monkeypatch.setenv("LFR_EXT_COMPILE_BACKEND", "aot_eager")
    _equals_double_backprop(name)


def test_this_torch_compiles_the_steps():
    assert compiled.compile_support_problem() is None


def test_compiled_equals_double_backprop_fp64_inductor(monkeypatch):
    monkeypatch.setenv("LFR_EXT_COMPILE_BACKEND", "inductor")
    _equals_double_backprop("resnet_bn")


def test_what_the_compiled_engine_refuses(monkeypatch):
    monkeypatch.setenv("LFR_EXT_COMPILE_BACKEND", "aot_eager")
    model, x, y = _problem("resnet_bn")
    with pytest.raises(ValueError, match="reduced over the batch"):
        lfr_ext.flatness_penalty(model, x, y, hvp="compiled", reduction="none", **KW)
    with pytest.raises(ValueError, match="does not take a grad_scaler"):
        lfr_ext.flatness_penalty(model, x, y, hvp="compiled", grad_scaler=torch.amp.GradScaler("cpu"), **KW)
    monkeypatch.delattr(torch._dynamo.config, "trace_autograd_ops")
    with pytest.raises(RuntimeError, match="cannot trace autograd.grad"):
        lfr_ext.flatness_penalty(model, x, y, hvp="compiled", **KW)


def test_lfr_loss_with_the_compiled_engine_trains(monkeypatch):
    monkeypatch.setenv("LFR_EXT_COMPILE_BACKEND", "aot_eager")
    model, x, y = _problem("small_cnn_dropout")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        out = lfr_ext.lfr_loss(model, x, y, lam=0.1, hvp="compiled", **KW)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p).all() for p in model.parameters())


def test_gradients_reach_the_parameters_of_the_call(monkeypatch):
    """The engine is cached per model; parameters swapped after it was built (GraphedStep's
    fresh leaves, during and after a capture) still get the penalty's gradients."""
    from lfr_ext.graphed_step import fresh_parameter_leaves

    monkeypatch.setenv("LFR_EXT_COMPILE_BACKEND", "aot_eager")
    model, x, y = _problem("resnet_bn")
    torch.manual_seed(5)
    expected = params_grads(model, lfr_ext.flatness_penalty(model, x, y, hvp="double_backprop", **KW))
    for _ in range(2):
        with fresh_parameter_leaves(model) as leaves:
            torch.manual_seed(5)
            inside = params_grads(model, lfr_ext.flatness_penalty(model, x, y, hvp="compiled", **KW))
        assert_grads_close(inside, expected, 1e-10)
        torch.manual_seed(5)
        after = params_grads(model, lfr_ext.flatness_penalty(model, x, y, hvp="compiled", **KW))
        assert_grads_close(after, expected, 1e-10)
    assert leaves


def test_clearing_the_cache_forgets_the_compiled_engines_and_the_trial(monkeypatch):
    """The compiled steps per model and the trial compile's answer live in lfr_ext.hvp.CACHE:
    CACHE.clear() forgets both, and the next call tries and compiles again."""
    monkeypatch.setenv("LFR_EXT_COMPILE_BACKEND", "aot_eager")
    trials = []
    trial = compiled._trial_compile_problem
    monkeypatch.setattr(compiled, "_trial_compile_problem", lambda: trials.append(1) or trial())
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with CACHE.scoped():
        engine = compiled.engine_for(model, default_loss, 1)
        assert compiled.engine_for(model, default_loss, 1) is engine and len(trials) == 1
        CACHE.clear()
        assert model not in CACHE.compiled and CACHE.compile_trial is None
        assert compiled.engine_for(model, default_loss, 1) is not engine and len(trials) == 2
    assert model not in CACHE.compiled  # the scope put the process's cache back


def test_the_first_compiled_call_leaves_the_global_rng_alone():
    """Whether this torch can compile the steps is tried once per process, inside the first
    hvp='compiled' call: that trial must not draw from the global RNG (a fresh process, so
    that the trial has not run yet)."""
    code = textwrap.dedent("""
        import torch
        from lfr_ext.hvp import compiled
        torch.manual_seed(7)
        expected = torch.rand(3)
        torch.manual_seed(7)
        assert compiled.compile_support_problem() is None
        assert torch.equal(torch.rand(3), expected), "the trial compile drew from the global RNG"
    """)
    env = {**os.environ, "LFR_EXT_COMPILE_BACKEND": "aot_eager"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
