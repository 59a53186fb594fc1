"""LFR on attention models: PyTorch's fused attention kernels have no double backward, so the
double-backprop paths run scaled_dot_product_attention on its math backend, say so once, and
match the authors' LFR_loss run on the math backend. (fp32: the authors draw their start noise in
fp32, so an fp64 comparison would start from other points.)"""

import warnings

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import lfr_ext
from tests.authors_lfr import authors_lfr_loss
from tests.models_for_tests import TinyViT


def test_lfr_on_an_attention_model_runs_and_matches_the_authors():
    torch.manual_seed(0)
    model = TinyViT().train()
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 5, (6,))
    torch.manual_seed(7)
    with sdpa_kernel(SDPBackend.MATH):
        expected_total, _, expected_penalty, _ = authors_lfr_loss(
            model, x, y, 0.1, step_size=0.02, epsilon=0.1, perturb_steps=3
        )
        expected = torch.autograd.grad(expected_total, list(model.parameters()))
    torch.manual_seed(7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = lfr_ext.lfr_loss(model, x, y, lam=0.1, eps=0.1, step_size=0.02, steps=3, hvp="double_backprop")
    messages = [str(w.message) for w in caught]
    assert any("math backend" in m for m in messages), messages
    torch.testing.assert_close(out.penalty, expected_penalty, rtol=2e-6, atol=0)
    got = torch.autograd.grad(out.loss, list(model.parameters()))  # the penalty's gradient of a gradient
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
