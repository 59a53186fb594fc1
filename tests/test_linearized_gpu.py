"""Low precision on GPU: the linearized HVP's sign agreement with an fp64 double-backprop HVP
must be no worse than double backprop's own at the same settings (flash-attention's rule,
applied to what drives the ascent: sign(h))."""

import contextlib

import pytest
import torch

from lfr_ext.hvp import grad_and_hvp_linearized
from lfr_ext.models import SmallCNN
from lfr_ext.reference import default_loss, grad_and_hvp_double_backprop
from tests.models_for_tests import TinyResNet
from tests.utils import requires_cuda


@contextlib.contextmanager
def _precision(setting):
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = setting == "tf32"
    try:
        if setting == "bf16_autocast":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@requires_cuda
@pytest.mark.parametrize("setting", ["fp32", "tf32", "bf16_autocast"])
@pytest.mark.parametrize("name", ["small_cnn", "resnet_bn"])
def test_sign_agreement_no_worse_than_double_backprop(setting, name):
    torch.manual_seed(0)
    if name == "small_cnn":
        model, x, y = SmallCNN(zero_init_last=False), torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    else:
        model, x, y = TinyResNet(), torch.rand(64, 3, 10, 10), torch.randint(0, 5, (64,))
    model = model.cuda().eval()
    x, y = x.cuda(), y.cuda()
    _, h_exact = grad_and_hvp_double_backprop(model.double(), x.double(), y, default_loss, 1)
    model.float()
    with _precision(setting):
        _, h_lin = grad_and_hvp_linearized(model, x, y, default_loss, 1)
        _, h_db = grad_and_hvp_double_backprop(model, x, y, default_loss, 1)
    exact_sign = torch.sign(h_exact)
    agree_lin = (torch.sign(h_lin.double()) == exact_sign).double().mean().item()
    agree_db = (torch.sign(h_db.double()) == exact_sign).double().mean().item()
    assert agree_lin >= agree_db - 0.005, (agree_lin, agree_db)
    if setting == "fp32":
        assert agree_lin > 0.999
