"""Nothing of the caller's model or data changes behind their back."""

import copy

import pytest
import torch
from torch import nn

import lfr_ext
from lfr_ext.models import SmallCNN
from tests.models_for_tests import BNNet

KW = dict(eps=0.1, step_size=0.02, steps=3)


def _snapshot(model, x, y):
    return {
        "modes": [m.training for m in model.modules()],
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "buffer_versions": {n: b._version for n, b in model.named_buffers()},
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "x": x.clone(),
        "y": y.clone(),
        "x_requires_grad": x.requires_grad,
    }


def _assert_unchanged(before, model, x, y, *, allow_grads=False):
    after = _snapshot(model, x, y)
    assert after["modes"] == before["modes"]
    for name in before["buffers"]:
        assert torch.equal(after["buffers"][name], before["buffers"][name]), name
    for name in before["params"]:
        assert torch.equal(after["params"][name], before["params"][name]), name
    assert after["requires_grad"] == before["requires_grad"]
    if not allow_grads:
        for name, g in before["grads"].items():
            got = after["grads"][name]
            assert (got is None and g is None) or torch.equal(got, g), name
    assert torch.equal(after["x"], before["x"]) and torch.equal(after["y"], before["y"])
    assert after["x_requires_grad"] == before["x_requires_grad"]


def _bn_setup(train: bool, frozen: bool):
    model = BNNet()
    with torch.no_grad():  # non-trivial running statistics
        model.bn.running_mean.uniform_(-0.1, 0.1)
        model.bn.running_var.uniform_(0.5, 1.5)
    model.train(train)
    if frozen:
        for p in model.conv.parameters():
            p.requires_grad_(False)
    x = torch.rand(6, 1, 8, 8)
    y = torch.randint(0, 3, (6,))
    return model, x, y


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("penalty_mode", ["caller", "eval"])
@pytest.mark.parametrize("fn", ["flatness_penalty", "local_flatness"])
def test_state_preserved_batchnorm_dropout_frozen(train, frozen, penalty_mode, fn):
    model, x, y = _bn_setup(train, frozen)
    model.bn.train(not train)  # mixed modes: one BatchNorm set apart by the user
    before = _snapshot(model, x, y)
    if fn == "flatness_penalty":
        out = lfr_ext.flatness_penalty(model, x, y, penalty_mode=penalty_mode, **KW)
    else:
        out = lfr_ext.local_flatness(model, x, y, **KW)
    _assert_unchanged(before, model, x, y)
    if fn == "flatness_penalty":
        out.backward()  # only this writes grads, and only to trainable parameters
        for name, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, name
        _assert_unchanged(before, model, x, y, allow_grads=True)


def test_existing_grads_and_graphs_untouched():
    """A caller's accumulated .grad and an eval-mode graph that saved running_var survive."""
    model, x, y = _bn_setup(train=False, frozen=False)
    out = model(x).sum()  # eval BatchNorm saves running_var for its backward
    out.backward(retain_graph=True)
    before = _snapshot(model, x, y)
    lfr_ext.flatness_penalty(model, x, y, **KW)
    _assert_unchanged(before, model, x, y)
    out.backward()  # would raise if a saved buffer had been written in place


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("raise_at", [1, 3, 4])
@pytest.mark.parametrize("train", [True, False])
def test_state_restored_when_loss_fn_raises(raise_at, train):
    model, x, y = _bn_setup(train, frozen=False)
    calls = {"n": 0}

    def flaky_loss(logits, target):
        calls["n"] += 1
        if calls["n"] == raise_at:
            raise _Boom("loss exploded")
        return nn.functional.cross_entropy(logits, target, reduction="none")

    before = _snapshot(model, x, y)
    with pytest.raises(_Boom):
        lfr_ext.flatness_penalty(model, x, y, loss_fn=flaky_loss, **KW)  # 3 ascent calls + 1 penalty call
    _assert_unchanged(before, model, x, y)


def test_running_stats_not_updated_but_batch_stats_used():
    """Train-mode penalty normalises with batch statistics (like the authors) and writes nothing."""
    model, x, y = _bn_setup(train=True, frozen=False)
    model.drop.p = 0.0
    reference_model = copy.deepcopy(model)
    got = lfr_ext.flatness_penalty(model, x, y, generator=torch.Generator().manual_seed(0), **KW)
    # Same computation by hand on a copy: ascent in eval mode, penalty in train mode.
    reference_model.eval()
    x_adv, _ = lfr_ext.reference.flatness_ascent_reference(
        reference_model, x, y, generator=torch.Generator().manual_seed(0), **KW
    )
    reference_model.train()
    expected = lfr_ext.reference.penalty_at(reference_model, x_adv, y).mean()
    torch.testing.assert_close(got, expected)
    assert not torch.equal(reference_model.bn.running_mean, model.bn.running_mean)  # the copy did update


def test_lfr_loss_clean_forward_updates_stats_like_a_plain_forward():
    model, x, y = _bn_setup(train=True, frozen=False)
    plain = copy.deepcopy(model)
    plain(x)
    lfr_ext.lfr_loss(model, x, y, lam=0.1, **KW)
    for (name, a), (_, b) in zip(model.named_buffers(), plain.named_buffers()):
        assert torch.equal(a, b), name


def test_small_cnn_shared_inplace_relu_state():
    model = SmallCNN(zero_init_last=False).train()
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    before = _snapshot(model, x, y)
    lfr_ext.lfr_loss(model, x, y, lam=0.02, **KW).loss.backward()
    _assert_unchanged(before, model, x, y, allow_grads=True)


def test_the_one_rng_helper_puts_the_states_back():
    """lfr_ext._rng serves every rewind of the global RNG (the engine's redo, GraphedStep, the
    evaluation, the checkpoints): a state captured, drawn past and restored draws the same again."""
    from lfr_ext._rng import RngState, preserved_rng

    torch.manual_seed(3)
    state = RngState.of_device(torch.device("cpu"))
    first = torch.rand(4)
    state.restore()
    assert torch.equal(torch.rand(4), first)
    with preserved_rng():
        torch.rand(100)
    after = torch.rand(4)
    state.restore()
    torch.rand(4)
    assert torch.equal(torch.rand(4), after)  # the block's draws left no trace
    assert state.cuda == {}  # a CPU computation draws from no GPU's generator
