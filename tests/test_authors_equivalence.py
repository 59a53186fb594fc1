"""flatness_penalty / lfr_loss against a literal transcription of the authors' LFR_loss."""

import pytest
import torch

import lfr_ext
from lfr_ext.models import SmallCNN
from tests.authors_lfr import authors_lfr_loss

SETTINGS = dict(eps=0.3, step_size=0.01, steps=6)


def _mnist_like_batch(batch=16):
    # A batch with the features of real MNIST that matter here: many exact zeros (box clip
    # active), values in (0, 1], and a power-of-two batch (the authors' batch-mean loss then
    # rescales exactly).
    x = torch.rand(batch, 1, 28, 28)
    x = torch.where(x < 0.5, torch.zeros_like(x), x)
    return x, torch.randint(0, 10, (batch,))


def _random_small_cnn(drop):
    model = SmallCNN(drop=drop, zero_init_last=False)
    model.train()
    return model


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_flatness_penalty_equals_authors_penalty(impl):
    model = _random_small_cnn(drop=0.0)  # dropout RNG draws differ in order between the two
    x, y = _mnist_like_batch()
    torch.manual_seed(123)
    _, _, expected, _ = authors_lfr_loss(model, x, y, 0.02, step_size=0.01, epsilon=0.3, perturb_steps=6)
    torch.manual_seed(123)
    got = lfr_ext.flatness_penalty(model, x, y, impl=impl, **SETTINGS)
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=0)
    assert got.item() > 0


@pytest.mark.parametrize("drop", [0.0, 0.5])
def test_lfr_loss_equals_authors_loss(drop):
    """The whole loss, Dropout in train mode included (same RNG order as the authors)."""
    model = _random_small_cnn(drop)
    x, y = _mnist_like_batch()
    torch.manual_seed(7)
    exp_total, exp_natural, exp_penalty, _ = authors_lfr_loss(
        model, x, y, 0.02, step_size=0.01, epsilon=0.3, perturb_steps=6
    )
    exp_grads = torch.autograd.grad(exp_total, list(model.parameters()))
    torch.manual_seed(7)
    out = lfr_ext.lfr_loss(model, x, y, lam=0.02, **SETTINGS)
    torch.testing.assert_close(out.natural_loss, exp_natural, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.penalty, exp_penalty, rtol=2e-6, atol=0)
    torch.testing.assert_close(out.loss, exp_total, rtol=2e-6, atol=0)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    for got, expected in zip(grads, exp_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_reference_oracle_matches_authors():
    model = _random_small_cnn(drop=0.0)
    x, y = _mnist_like_batch()
    torch.manual_seed(5)
    _, _, expected, _ = authors_lfr_loss(model, x, y, 0.02, step_size=0.01, epsilon=0.3, perturb_steps=6)
    torch.manual_seed(5)
    got = lfr_ext.reference.flatness_penalty_reference(model, x, y, **SETTINGS)
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=0)
