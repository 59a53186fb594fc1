"""Evaluating any model: ``lfr_ext.evaluate_model``, ``PixelClassifier`` (normalisation in the
model, logits picked out of tuples and dicts), foreign checkpoints through ``lfr-eval --model
--weights``, clear errors that write nothing, and the gradient-masking flags."""

import json
import warnings

import pytest
import torch
from torch import nn

import lfr_ext
from lfr_ext.evaluation import EvalConfig, load_weights
from lfr_ext.models import SmallCNN
from tests.models_for_tests import TOY_LABELS, LinearToy, toy_data
from tests.utils import needs_fashion_mnist, needs_torchattacks

TINY = EvalConfig(
    n=8, pgd_steps=10, pgd_restarts=2, square_queries=0, curve_n=8, curve_steps=10, lf_n=8, lf_steps=2, batch_size=8
)
MEAN, STD = 0.3, 0.2  # the toy's inputs normalised: z = (x - 0.3) / 0.2


class NormalisedToy(nn.Module):
    """LinearToy for inputs normalised by (MEAN, STD): it un-normalises first, so that
    ``PixelClassifier(NormalisedToy(), mean=MEAN, std=STD)`` is LinearToy in pixel space."""

    def __init__(self):
        super().__init__()
        self.toy = LinearToy()

    def forward(self, z):
        return self.toy(z * STD + MEAN)


class TupleToy(LinearToy):
    def forward(self, x):
        return super().forward(x), x.flatten(1)  # (logits, features)


class DictToy(LinearToy):
    def forward(self, x):
        return {"features": x.flatten(1), "logits": super().forward(x)}


@needs_torchattacks
def test_radius_and_box_are_in_pixel_space_for_a_normalising_model():
    """The toy's hand-computed robustness (robust iff correct and |s| > 4 eps, in pixels) holds
    for the normalising model through mean/std: eps is not rescaled by std, the box is [0, 1]."""
    x, y = toy_data()
    plain = lfr_ext.evaluate_model(LinearToy(), x, y, eps=0.05, config=TINY)
    normalised = lfr_ext.evaluate_model(NormalisedToy(), x, y, eps=0.05, config=TINY, mean=MEAN, std=STD)
    expected_robust = [False, False, True, False, False, False, True, True]
    for result in (plain, normalised):
        assert result.robust == expected_robust
        assert result.accuracy["clean"] == 7 / 8 and result.accuracy["AutoAttack"] == 3 / 8
        # Each attack's per-sample correctness is kept (the results table's paired test needs it).
        assert result.correct["clean"] == [True, True, True, False, True, True, True, True]
        assert result.correct["AutoAttack"] == result.correct["FGSM"] == expected_robust
        assert result.accuracy_vs_eps["accuracy"] == plain.accuracy_vs_eps["accuracy"]


def test_pixel_classifier_keeps_the_box_and_the_engine():
    """An attack on the wrapped model stays in the L-inf ball and [0, 1] in pixel space, and the
    linearized engine records the normalisation (no fallback), matching double backprop."""
    torch.manual_seed(0)
    inner = SmallCNN(drop=0.0, zero_init_last=False).double().eval()
    net = lfr_ext.PixelClassifier(inner, mean=[0.5], std=[0.25])
    x, y = torch.rand(4, 1, 28, 28, dtype=torch.float64), torch.tensor([0, 3, 5, 9])
    kw = dict(eps=0.1, step_size=0.03, steps=3, init_std=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to double backprop would warn
        fast = lfr_ext.flatness_penalty(net, x, y, hvp="linearized", **kw)
    exact = lfr_ext.flatness_penalty(net, x, y, hvp="double_backprop", **kw)
    torch.testing.assert_close(fast, exact, rtol=1e-10, atol=0)
    assert list(net.state_dict()) == [f"model.{k}" for k in inner.state_dict()]  # mean/std are not saved


@pytest.mark.parametrize(
    "model, selector", [(TupleToy(), 0), (DictToy(), "logits"), (DictToy(), lambda out: out["logits"])]
)
def test_tuple_and_dict_outputs_take_a_logits_selector(model, selector):
    x, y = toy_data()
    plain = lfr_ext.local_flatness(LinearToy(), x, y, eps=0.05, step_size=0.02, steps=2, init_std=0.0)
    net = lfr_ext.PixelClassifier(model, logits=selector)
    torch.testing.assert_close(
        lfr_ext.local_flatness(net, x, y, eps=0.05, step_size=0.02, steps=2, init_std=0.0), plain
    )
    out = lfr_ext.lfr_loss(net, x, y, lam=0.5, eps=0.05, step_size=0.02, steps=2)
    assert out.logits.shape == (8, 4)
    for hvp in ("auto", "double_backprop"):
        with pytest.raises(TypeError, match="PixelClassifier\\(model, logits=...\\)"):
            lfr_ext.flatness_penalty(model, x, y, eps=0.05, step_size=0.02, steps=1, hvp=hvp)


def test_selector_and_normalisation_errors_name_the_problem():
    x, y = toy_data()
    with pytest.raises(KeyError, match="keys: \\['features', 'logits'\\]"):
        lfr_ext.PixelClassifier(DictToy(), logits="scores")(x)
    with pytest.raises(TypeError, match="indexes a tuple"):
        lfr_ext.PixelClassifier(DictToy(), logits=0)(x)
    with pytest.raises(ValueError, match="std must be positive"):
        lfr_ext.PixelClassifier(LinearToy(), mean=0.5, std=0.0)
    with pytest.raises(ValueError, match="both mean and std"):
        lfr_ext.PixelClassifier(LinearToy(), mean=0.5)
    with pytest.raises(ValueError, match="3 channels but x has 1"):
        lfr_ext.PixelClassifier(LinearToy(), mean=[0.5] * 3, std=[0.2] * 3)(x)
    with pytest.raises(ValueError, match="3 channels but x has 1"):
        lfr_ext.PixelClassifier(LinearToy(), mean=[0.5], std=[0.2, 0.3, 0.4])(x)
    with pytest.raises(ValueError, match="both mean and std"):  # std alone is not silently ignored
        lfr_ext.evaluate_model(LinearToy(), x, torch.tensor(TOY_LABELS), eps=0.05, std=0.2, config=TINY)


def test_bad_inputs_are_refused_before_any_attack():
    x, y = toy_data()
    model = LinearToy()
    with pytest.raises(ValueError, match="must lie in \\[0, 1\\]"):
        lfr_ext.evaluate_model(model, x * 3, y, eps=0.05, config=TINY)
    with pytest.raises(ValueError, match="labels must lie in \\[0, 4\\)"):
        lfr_ext.evaluate_model(model, x, y + 4, eps=0.05, config=TINY)
    for eps in (0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="eps must be a positive number"):
            lfr_ext.evaluate_model(model, x, y, eps=eps, config=TINY)
    with pytest.raises(ValueError, match="autoattack_impl"):
        lfr_ext.evaluate_model(model, x, y, eps=0.05, config=EvalConfig(autoattack_impl="fast"))


@pytest.mark.parametrize("dtype", [torch.int8, torch.float32])
def test_labels_follow_the_one_label_rule(dtype):
    """The evaluation takes the label dtypes the penalty takes (lfr_ext._validation.LABEL_DTYPES):
    int8 is refused on both paths, the integer dtypes that can index any class set are accepted."""
    from lfr_ext._validation import LABEL_DTYPES

    assert LABEL_DTYPES == (torch.int64, torch.int32, torch.int16, torch.uint8)
    x, y = toy_data()
    with pytest.raises(TypeError, match="integer tensor of class labels"):
        lfr_ext.evaluate_model(LinearToy(), x, y.to(dtype), eps=0.05, config=TINY)
    with pytest.raises(TypeError, match="integer tensor of class indices"):
        lfr_ext.flatness_penalty(LinearToy(), x, y.to(dtype), eps=0.05, step_size=0.01, steps=1)


def test_weights_in_foreign_formats_load_and_misfits_are_named(tmp_path):
    torch.manual_seed(0)
    source = SmallCNN()
    state = source.state_dict()
    for i, checkpoint in enumerate(
        [
            state,
            {"state_dict": state, "epoch": 7},
            {"model": state, "optimizer": {}},
            {f"module.{k}": v for k, v in state.items()},
            {f"_orig_mod.module.{k}": v for k, v in state.items()},
        ]
    ):
        path = tmp_path / f"w{i}.pt"
        torch.save(checkpoint, path)
        target = load_weights(SmallCNN(), path)
        assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), state.values()))
    wrong = dict(state)
    wrong["extra.weight"] = torch.zeros(1)
    first = next(iter(state))
    wrong[first] = torch.zeros(3)
    del wrong[list(state)[-1]]
    model = SmallCNN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as error:
        load_weights(model, wrong)
    message = str(error.value)
    assert "missing keys (1)" in message and "unexpected keys (1): extra.weight" in message
    assert f"{first}: checkpoint (3,) vs model" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing loaded
    import numpy as np

    pickled = tmp_path / "with_numpy.pt"
    torch.save({"state_dict": state, "rng": np.random.get_state()}, pickled)
    with pytest.raises(ValueError, match="holds more than tensors"):
        load_weights(SmallCNN(), pickled)
    with pytest.raises(ValueError, match="saved inside lfr_ext.PixelClassifier"):
        load_weights(SmallCNN(), {f"model.{k}": v for k, v in state.items()})


def test_robustbench_eps_is_a_fraction_only_where_tables_write_one():
    from lfr_ext.evaluation.model_eval import _eps_text

    assert [_eps_text(e) for e in (8 / 255, 0.0313725, 4 / 255, 0.031, 0.1, 0.2, 0.3)] == [
        "8/255",
        "8/255",
        "4/255",
        "0.031",
        "0.1",
        "0.2",
        "0.3",
    ]


@needs_fashion_mnist
@needs_torchattacks
def test_lfr_eval_on_foreign_weights_writes_robustbench_json(tmp_path, capsys):
    from lfr_ext.cli.evaluate import main

    torch.manual_seed(0)
    weights = tmp_path / "foreign.pt"
    state = SmallCNN(zero_init_last=False).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, weights)
    budget = [
        "--n",
        "12",
        "--pgd-steps",
        "2",
        "--pgd-restarts",
        "1",
        "--square-queries",
        "10",
        "--curve-n",
        "8",
        "--lf-n",
        "4",
        "--clean-n",
        "32",
        "--landscape-points",
        "1",
        "--device",
        "cpu",
    ]
    out = tmp_path / "out"
    bad = tmp_path / "bad.pt"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    assert main(["--model", "small_cnn", "--weights", str(bad), "--eps", "0.1", "--out", str(out), *budget]) == 2
    assert "do not fit SmallCNN" in capsys.readouterr().err and not out.exists()  # nothing written
    assert main(["--model", "small_cnn", "--weights", str(weights), "--eps", "8/255", "--out", str(out), *budget]) == 0
    result = json.loads((out / "evaluation.json").read_text())
    entry = json.loads((out / "robustbench.json").read_text())
    assert result["n"] == 12 and result["autoattack"]["implementation"].startswith("reference")
    assert entry["dataset"] == "fashion-mnist" and entry["threat_model"] == "Linf" and entry["n_examples"] == 12
    assert entry["eps"] == "8/255" and entry["architecture"] == "small_cnn" and entry["name"] == "foreign"
    assert float(entry["autoattack_acc"]) == pytest.approx(100 * result["accuracy"]["AutoAttack"], abs=0.005)
    assert float(entry["clean_acc"]) == pytest.approx(100 * result["accuracy"]["clean"], abs=0.005)


class HonestToy(LinearToy):
    """LinearToy whose two losing classes move with the score too (s/2 - 1, -s/2 - 1: they still
    never win), so that no loss the attacks use (AutoAttack's DLR included) is flat."""

    def forward(self, x):
        s = ((x - 0.5).flatten(1) * self.w).sum(1)
        return torch.stack([s, -s, s / 2 - 1, -s / 2 - 1], dim=1)


class Quantised(nn.Module):
    """A gradient-masking defence: the input is rounded to 8 levels first, so the gradient is
    zero almost everywhere and gradient attacks cannot move; a black-box search can."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 8) / 8)


@needs_torchattacks
def test_masking_checks_flag_a_quantised_model_and_not_an_honest_one():
    torch.manual_seed(0)
    scores = torch.linspace(-0.6, 0.6, 48)
    x = (scores.view(-1, 1, 1, 1).expand(-1, 1, 2, 2) / 4 + 0.5 + 0.01).contiguous()
    y = (scores < 0).long()
    config = EvalConfig(
        n=48,
        pgd_steps=10,
        pgd_restarts=1,
        square_queries=300,
        curve_n=48,
        curve_steps=10,
        lf_n=8,
        lf_steps=2,
        batch_size=48,
    )
    honest = lfr_ext.evaluate_model(HonestToy(), x, y, eps=0.1, config=config)
    assert honest.flags == [], honest.flags
    masked = lfr_ext.evaluate_model(Quantised(HonestToy()), x, y, eps=0.1, config=config)
    assert any(flag.startswith("black-box does not beat white-box") for flag in masked.flags), masked.flags
    assert any("zero gradient" in flag for flag in masked.flags), masked.flags  # the reference's own check


@needs_torchattacks
def test_evaluate_model_leaves_the_rng_and_the_model_as_they_were():
    x, y = toy_data()
    model = LinearToy().train()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    lfr_ext.evaluate_model(
        model,
        x,
        y,
        eps=0.05,
        config=EvalConfig(
            n=8, autoattack=False, square_queries=0, curve_n=8, lf_n=4, lf_steps=1, pgd_steps=2, pgd_restarts=1
        ),
    )
    assert torch.equal(torch.rand(3), expected) and model.training


@needs_fashion_mnist
def test_lfr_train_with_normalisation_trains_and_evaluates_in_pixel_space(tmp_path):
    """``--mean/--std``: the run's model normalises inside (PixelClassifier), its checkpoint
    loads back into the same, and the saved config refuses mismatched values."""
    from lfr_ext.evaluation import load_trained_model
    from lfr_ext.training import resolve_config, train

    with pytest.raises(ValueError, match="std must be positive"):
        resolve_config(dict(mean=[0.5], std=[0.0]))
    with pytest.raises(ValueError, match="1 or 1 values"):
        resolve_config(dict(mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2]))
    cfg = resolve_config(
        dict(
            method="lfr",
            train_subset=64,
            batch_size=32,
            epochs=1,
            val_size=32,
            val_robust_size=8,
            val_attack_steps=2,
            steps=2,
            milestones=[1],
            mean=[0.2860],
            std=[0.3530],
        )
    )
    train(cfg, str(tmp_path / "run"), device="cpu", progress=False, log=lambda s: None)
    model, saved, _ = load_trained_model(str(tmp_path / "run"), "last")
    assert isinstance(model, lfr_ext.PixelClassifier) and saved.mean == [0.2860]
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(model(x), model.model((x - 0.2860) / 0.3530))
