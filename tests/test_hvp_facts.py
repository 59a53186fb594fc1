"""The records of the hvp= methods (lfr_ext.hvp.facts) are what the code does: the table lists
every method with its record, and the checks refuse exactly what the records say."""

import dataclasses

import pytest
import torch
from torch import nn

import lfr_ext
from lfr_ext.hvp import HVP_METHODS, METHODS, SecondOrderEngine
from lfr_ext.hvp.facts import MethodFacts
from lfr_ext.hvp.policy import check_penalty_request, check_request

KW = dict(eps=0.1, step_size=0.02, steps=1)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 3))


def _scale():
    return torch.tensor(2.0)


def test_every_method_has_one_record_and_the_names_keep_their_order():
    assert HVP_METHODS == ("auto", "linearized", "double_backprop", "forward", "finite_difference", "compiled")
    assert all(name == facts.name for name, facts in METHODS.items())
    for name, facts in METHODS.items():
        module = getattr(lfr_ext.hvp, name) if name != "compiled" else lfr_ext.hvp.compiled
        assert module.FACTS is facts
        with pytest.raises(dataclasses.FrozenInstanceError):
            facts.exact = not facts.exact


def test_the_docstring_table_shows_every_record():
    lines = lfr_ext.hvp.__doc__.splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("=====")]
    assert len(rules) == 3  # above the header, below it, below the rows
    rows = {line.split()[0].strip("`"): line.split() for line in lines[rules[1] + 1 : rules[2]]}
    assert set(rows) == set(METHODS)
    for name, facts in METHODS.items():
        yes = [
            "yes" if flag else "no"
            for flag in (
                facts.exact,
                facts.auto_may_choose,
                facts.takes_grad_scaler,
                facts.per_sample_penalty,
                facts.penalty_differentiable_in_x,
            )
        ]
        assert rows[name][1:6] == yes, name
        assert rows[name][6] == ("CE" if facts.needs_default_loss else "any")
        assert " ".join(rows[name][8:]) == facts.description
    assert "{" not in lfr_ext.hvp.__doc__


def test_the_penalty_docstring_names_every_method():
    doc = lfr_ext.flatness_penalty.__doc__
    assert all(f'``"{name}"``' in doc for name in HVP_METHODS)


def test_auto_chooses_only_the_exact_methods_its_records_allow():
    allowed = {name for name, facts in METHODS.items() if facts.auto_may_choose}
    assert allowed == {"linearized", "double_backprop"}
    assert all(METHODS[name].exact for name in allowed)
    model = _model()
    with lfr_ext.hvp.CACHE.scoped():
        chosen = {SecondOrderEngine("auto", model, default_loss).method for default_loss in (True, False)}
        lfr_ext.hvp.CACHE.uncovered[model] = "an op"
        chosen.add(SecondOrderEngine("auto", model, True).method)
    assert chosen == allowed


@pytest.mark.parametrize("name", list(METHODS))
def test_the_engine_refuses_what_the_record_says(name):
    facts, model = METHODS[name], _model()
    if facts.takes_grad_scaler:
        SecondOrderEngine(name, model, True, loss_scale=_scale())
    else:
        with pytest.raises(ValueError, match=f"hvp='{name}' does not take a grad_scaler"):
            SecondOrderEngine(name, model, True, loss_scale=_scale())
    if facts.needs_default_loss:
        with pytest.raises(ValueError, match=f"hvp='{name}' needs the default cross-entropy"):
            SecondOrderEngine(name, model, default_loss=False)
    else:
        SecondOrderEngine(name, model, default_loss=False)
    for reduction, x_requires_grad in (("none", False), ("mean", True)):
        allowed = facts.per_sample_penalty if reduction == "none" else facts.penalty_differentiable_in_x
        if allowed:
            check_penalty_request(facts, reduction=reduction, x_requires_grad=x_requires_grad)
        else:
            with pytest.raises(ValueError, match=f"hvp='{name}' gives"):
                check_penalty_request(facts, reduction=reduction, x_requires_grad=x_requires_grad)


def test_the_public_functions_refuse_a_grad_scaler_where_the_record_says():
    model, x, y = _model(), torch.rand(2, 1, 2, 3), torch.tensor([0, 2])
    for name, facts in METHODS.items():
        if not facts.takes_grad_scaler:
            with pytest.raises(ValueError, match="does not take a grad_scaler"):
                lfr_ext.flatness_penalty(model, x, y, hvp=name, grad_scaler=torch.amp.GradScaler("cpu"), **KW)


def test_the_checks_follow_any_record():
    """A record with other facts than today's methods is refused accordingly: the checks read the
    record, not the method's name."""
    only_cuda = MethodFacts(
        name="cuda_only",
        description="-",
        exact=True,
        auto_may_choose=False,
        per_sample_penalty=True,
        penalty_differentiable_in_x=False,
        devices=("cuda",),
    )
    methods = {"cuda_only": only_cuda}
    with pytest.raises(ValueError, match=r"hvp must be one of \('auto', 'cuda_only'\), got 'linearized'"):
        check_request("linearized", default_loss=True, grad_scaler=False, methods=methods)
    with pytest.raises(ValueError, match="hvp='cuda_only' runs on cuda, not cpu"):
        check_request("cuda_only", default_loss=True, grad_scaler=False, device_type="cpu", methods=methods)
    check_request("cuda_only", default_loss=False, grad_scaler=True, device_type="cuda", methods=methods)
    check_penalty_request(only_cuda, reduction="none", x_requires_grad=False)
    with pytest.raises(ValueError, match=r"hvp='cuda_only' gives the penalty's gradient w.r.t. the parameters only"):
        check_penalty_request(only_cuda, reduction="none", x_requires_grad=True)


def test_an_unknown_method_is_refused_with_the_list():
    with pytest.raises(ValueError, match=r"hvp must be one of \('auto', 'linearized', .*'compiled'\), got 'magic'"):
        SecondOrderEngine("magic", _model(), True)
