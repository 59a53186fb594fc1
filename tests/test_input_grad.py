"""``lfr_ext.input_grad`` against double backprop in fp64: ``g``, the loss built on it, and the
gradient of that loss w.r.t. every parameter (and ``x`` where it requires grad), with the running
statistics the forward leaves behind, on every kind of model the tape covers, a critic, custom
losses, two calls in one loss, and the fallback and refusals."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lfr_ext
from lfr_ext.hvp import CACHE
from lfr_ext.linearized import UnsupportedOpError
from tests.models_for_tests import (
    BNNet,
    ConvNeXtBlockNet,
    GeluLayerNormNet,
    SineNet,
    SmoothZooNet,
    TinyResNet,
    TinyViT,
    WrittenOutAttentionNet,
)
from tests.utils import assert_grads_close, rel_err, requires_cuda

RTOL = 1e-10


class Critic(nn.Module):
    """A GAN critic: conv, LeakyReLU, conv, LeakyReLU, linear to one score. (B, 1, 8, 8) -> (B, 1)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(4, 8, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(8 * 2 * 2, 1),
        )

    def forward(self, x):
        return self.net(x)


def score(outputs, _y):
    return outputs.squeeze(-1)


def margin(outputs, y):
    """A per-sample multi-class margin loss (a loss head other than the cross-entropy)."""
    true = outputs.gather(1, y[:, None]).squeeze(1)
    others = outputs.masked_fill(F.one_hot(y, outputs.shape[1]).bool(), float("-inf")).amax(1)
    return F.softplus(others - true)


# name -> (factory, input shape, classes or None for a critic, train mode)
MODELS = {
    "bn_relu_train": (lambda: BNNet(drop=0.25), (1, 8, 8), 3, True),
    "bn_relu_eval": (lambda: BNNet(drop=0.25), (1, 8, 8), 3, False),
    "resnet_bn_train": (lambda: TinyResNet(drop=0.0), (3, 10, 10), 5, True),
    "smooth_zoo_groupnorm": (SmoothZooNet, (2, 6, 6), 4, True),
    "gelu_layernorm": (GeluLayerNormNet, (6,), 3, True),
    "convnext_block": (ConvNeXtBlockNet, (3, 8, 8), None, True),
    "vit": (TinyViT, (3, 8, 8), 5, True),
    "attention_written_out": (WrittenOutAttentionNet, (24,), 3, True),
    "critic_leaky_relu": (Critic, (1, 8, 8), None, True),
}


def _setup(name, batch=6, x_requires_grad=False):
    factory, shape, classes, train = MODELS[name]
    torch.manual_seed(0)
    model = factory().double().train(train)
    x = torch.rand(batch, *shape, dtype=torch.float64)
    if classes is None and name != "critic_leaky_relu":  # a classifier whose class count we read
        classes = model(x).shape[1]
    y = torch.randint(0, classes, (batch,)) if classes else None
    return model, x.requires_grad_(x_requires_grad), y


def _phi(g, outputs, y, loss_fn):
    """A loss mixing what penalties do with g (L1, squared L2 per sample) and an ordinary loss on
    the same forward's outputs."""
    flat = g.flatten(1)
    natural = (loss_fn or lfr_ext.reference.default_loss)(outputs, y).mean()
    return natural + 0.3 * flat.abs().sum(1).mean() + 0.7 * (flat**2).sum(1).mean()


def _run(model, x, y, hvp, loss_fn=None, seed=3):
    """g, the loss, its gradients w.r.t. the parameters (and x), and the buffers after."""
    model = copy.deepcopy(model)
    torch.manual_seed(seed)  # the same Dropout masks for every method
    g, outputs = lfr_ext.input_grad(model, x, y, loss_fn=loss_fn, hvp=hvp, return_outputs=True)
    loss = _phi(g, outputs, y, loss_fn)
    targets = [p for p in model.parameters()] + ([x] if x.requires_grad else [])
    grads = torch.autograd.grad(loss, targets)
    return g.detach(), loss.detach(), grads, [b.clone() for b in model.buffers()]


def _assert_same(got, expected):
    g, loss, grads, buffers = got
    g_ref, loss_ref, grads_ref, buffers_ref = expected
    assert rel_err(g, g_ref) <= RTOL
    assert rel_err(loss, loss_ref) <= RTOL
    assert_grads_close(grads, grads_ref, RTOL)
    for a, b in zip(buffers, buffers_ref):
        assert torch.equal(a, b)  # the running statistics updated once, as model(x) does


@pytest.mark.parametrize("name", list(MODELS))
def test_equals_double_backprop(name):
    model, x, y = _setup(name)
    loss_fn = score if name == "critic_leaky_relu" else None
    expected = _run(model, x, y, "double_backprop", loss_fn)
    _assert_same(_run(model, x, y, "linearized", loss_fn), expected)


@pytest.mark.parametrize("name", ["bn_relu_train", "gelu_layernorm", "critic_leaky_relu", "vit"])
def test_derivative_in_x_equals_double_backprop(name):
    """When x requires grad (a WGAN-GP interpolate), g's backward reaches it: the HVP."""
    model, x, y = _setup(name, x_requires_grad=True)
    loss_fn = score if name == "critic_leaky_relu" else None
    expected = _run(model, x, y, "double_backprop", loss_fn)
    _assert_same(_run(model, x, y, "linearized", loss_fn), expected)


def test_x_that_depends_on_parameters_upstream():
    """x made by a generator: the gradient flows through g's backward into the generator (the
    loss head is curved, so that g depends on x through it)."""
    torch.manual_seed(0)
    critic, generator = Critic().double(), nn.Linear(4, 64).double()
    z = torch.randn(5, 4, dtype=torch.float64)
    results = {}
    for hvp in ("double_backprop", "linearized"):
        c, gen = copy.deepcopy(critic), copy.deepcopy(generator)
        x = torch.sigmoid(gen(z)).view(5, 1, 8, 8)
        g = lfr_ext.input_grad(c, x, loss_fn=lambda out, _: F.softplus(out.squeeze(-1)), hvp=hvp)
        penalty = ((g.flatten(1).norm(dim=1) - 1) ** 2).mean()
        results[hvp] = torch.autograd.grad(penalty, [*c.parameters(), *gen.parameters()])
    assert_grads_close(results["linearized"], results["double_backprop"], RTOL)


def test_a_parameter_that_also_produced_x_gets_the_path_through_x_once():
    """A tied embedding: x = emb(tokens) and the head reads emb.weight again. The recording runs
    on a leaf copy of x, so the path through x reaches emb.weight once, from autograd."""
    torch.manual_seed(0)
    emb, body = nn.Embedding(7, 5).double(), nn.Sequential(nn.Linear(5, 5), nn.Tanh()).double()

    class TiedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.body = emb, body

        def forward(self, x):
            return self.body(x).mean(1) @ self.emb.weight.t()

    tokens, y = torch.randint(0, 7, (4, 3)), torch.randint(0, 7, (4,))
    results = {}
    for hvp in ("double_backprop", "linearized"):
        model = copy.deepcopy(TiedHead())
        g = lfr_ext.input_grad(model, model.emb(tokens), y, hvp=hvp)
        results[hvp] = torch.autograd.grad((g**2).sum(), list(model.parameters()))
    assert_grads_close(results["linearized"], results["double_backprop"], RTOL)


def test_a_backward_with_create_graph_is_refused():
    """Third-order derivatives through g are not the tangent pass's: refused, not wrong."""
    model, x, y = _setup("gelu_layernorm")
    g = lfr_ext.input_grad(model, x, y, hvp="linearized")
    with pytest.raises(RuntimeError, match="create_graph=True through g"):
        torch.autograd.grad((g**2).sum(), list(model.parameters()), create_graph=True)


def test_a_target_that_requires_grad_is_refused_by_the_tangent_pass(auto_linearized_on_cpu):
    """y = x (a reconstruction loss) adds a path to g that l'(f)^T J v does not have: refused by
    name, and auto runs double backprop."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh()).double()
    x = torch.rand(4, 6, dtype=torch.float64, requires_grad=True)

    def mse(out, target):
        return ((out - target) ** 2).sum(1)

    with pytest.raises(ValueError, match="needs y not to require grad"):
        lfr_ext.input_grad(model, x, x, loss_fn=mse, hvp="linearized")
    grads = {}
    for hvp in ("double_backprop", "auto"):
        g = lfr_ext.input_grad(model, x, x, loss_fn=mse, hvp=hvp)
        grads[hvp] = torch.autograd.grad((g**2).sum(), [*model.parameters(), x])
    assert_grads_close(grads["auto"], grads["double_backprop"], RTOL)


def test_custom_loss_head():
    model, x, y = _setup("resnet_bn_train")
    expected = _run(model, x, y, "double_backprop", margin)
    _assert_same(_run(model, x, y, "linearized", margin), expected)


def test_two_calls_in_one_loss():
    """CURE's and GradAlign's shape: a second input gradient at a point built from the first."""
    model, x, y = _setup("bn_relu_train")
    results = {}
    for hvp in ("double_backprop", "linearized"):
        net = copy.deepcopy(model)
        torch.manual_seed(5)
        g0, outputs = lfr_ext.input_grad(net, x, y, hvp=hvp, return_outputs=True)
        z = g0.detach().sign()
        g1 = lfr_ext.input_grad(net, (x + 0.05 * z).clamp(0, 1), y, hvp=hvp)
        cosine = F.cosine_similarity(g0.flatten(1), g1.flatten(1)).mean()
        loss = F.cross_entropy(outputs, y) + ((g1 - g0) ** 2).sum() + (1 - cosine)
        grads = torch.autograd.grad(loss, list(net.parameters()))
        results[hvp] = (loss.detach(), grads, [b.clone() for b in net.buffers()])
    assert rel_err(results["linearized"][0], results["double_backprop"][0]) <= RTOL
    assert_grads_close(results["linearized"][1], results["double_backprop"][1], RTOL)
    assert all(torch.equal(a, b) for a, b in zip(results["linearized"][2], results["double_backprop"][2]))


def test_backward_composes_with_other_losses_and_accumulates():
    """One backward() of (an ordinary loss + a penalty on g) writes .grad, like double backprop."""
    model, x, y = _setup("resnet_bn_train")
    grads = {}
    for hvp in ("double_backprop", "linearized"):
        net = copy.deepcopy(model)
        logits = net(x)
        g = lfr_ext.input_grad(net, x, y, hvp=hvp)
        (F.cross_entropy(logits, y) + 0.5 * g.abs().sum()).backward()
        grads[hvp] = [p.grad for p in net.parameters()]
    assert_grads_close(grads["linearized"], grads["double_backprop"], RTOL)


def test_second_backward_with_retained_graph():
    """retain_graph=True keeps the recording: a second backward gives the same gradients."""
    model, x, y = _setup("bn_relu_eval")
    params = list(model.parameters())
    net = copy.deepcopy(model)
    g = lfr_ext.input_grad(net, x, y, hvp="linearized")
    loss = (g**2).sum()
    once = torch.autograd.grad(loss, list(net.parameters()), retain_graph=True)
    twice = torch.autograd.grad(loss, list(net.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(once, twice)) and len(once) == len(params)


@pytest.fixture
def auto_linearized_on_cpu(monkeypatch):
    """``hvp="auto"`` as it runs on CUDA (the tangent pass first), on the CPU."""
    monkeypatch.setitem(lfr_ext.input_gradients.AUTO_BY_DEVICE, "cpu", "linearized")


def test_auto_runs_what_was_measured_faster_on_the_device():
    model, x, y = _setup("resnet_bn_train")
    g = lfr_ext.input_grad(model, x, y)
    assert "TangentBackward" not in type(g.grad_fn).__name__  # double backprop, measured faster on the CPU
    g = lfr_ext.input_grad(model, x, y, hvp="linearized")
    assert "TangentBackward" in type(g.grad_fn).__name__


def test_auto_runs_the_tangent_pass_where_covered_and_says_nothing(auto_linearized_on_cpu):
    model, x, y = _setup("resnet_bn_train")
    with CACHE.scoped(), warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = _run(model, x, y, "double_backprop")
        got = _run(model, x, y, "auto")
        _assert_same(got, expected)
        assert model not in CACHE.uncovered
        g = lfr_ext.input_grad(model, x, y)
        assert "TangentBackward" in type(g.grad_fn).__name__


def test_auto_falls_back_once_with_the_running_statistics_updated_once(auto_linearized_on_cpu):
    """An op with no rule after a train-mode BatchNorm: the refused pass is redone by double
    backprop from the buffers and RNG state before it, warned once."""

    class BNSine(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn, self.drop, self.head = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), SineNet()

        def forward(self, x):
            return self.head(self.drop(self.bn(self.fc(x)))[:, :6])

    torch.manual_seed(0)
    model = BNSine().double().train()
    x, y = torch.rand(7, 6, dtype=torch.float64), torch.randint(0, 3, (7,))
    with CACHE.scoped():
        expected = _run(model, x, y, "double_backprop")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = _run(model, x, y, "auto")
            _run(model, x, y, "auto")
        falls_back = [w for w in caught if "falls back to double backprop" in str(w.message)]
        assert len(falls_back) == 1 and "torch.sin" in str(falls_back[0].message)
        _assert_same(got, expected)
        with pytest.raises(UnsupportedOpError, match="sin"):
            lfr_ext.input_grad(copy.deepcopy(model), x, y, hvp="linearized")


def test_auto_leaves_attention_to_double_backprop_quietly(auto_linearized_on_cpu):
    model, x, y = _setup("vit")
    with CACHE.scoped(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected = _run(model, x, y, "double_backprop")
        _assert_same(_run(model, x, y, "auto"), expected)
        lfr_ext.input_grad(model, x, y)
        assert not [w for w in caught if "falls back" in str(w.message)]
        assert "attention" in CACHE.uncovered[model]  # declined (a measured choice), remembered


def test_grad_scaler_gives_the_unscaled_gradient():
    """fp16 loss scaling: g is taken on the scaled loss and unscaled; the penalty's parameter
    gradients under grad_scaler.scale(loss).backward() are the scale times the unscaled ones."""
    model, x, y = _setup("resnet_bn_train")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    reference = _run(model, x, y, "double_backprop")
    for hvp in ("linearized", "double_backprop"):
        net = copy.deepcopy(model)
        g, outputs = lfr_ext.input_grad(net, x, y, hvp=hvp, grad_scaler=scaler, return_outputs=True)
        assert rel_err(g.detach(), reference[0]) <= RTOL
        grads = torch.autograd.grad(scaler.scale(_phi(g, outputs, y, None)), list(net.parameters()))
        assert_grads_close([a / 1024.0 for a in grads], reference[2], RTOL)


def test_empty_batch():
    model, x, y = _setup("bn_relu_eval", batch=0)
    g = lfr_ext.input_grad(model, x, y)
    assert g.shape == x.shape
    (g.abs().sum()).backward()


def test_nothing_of_the_callers_changes():
    model, x, y = _setup("bn_relu_eval", x_requires_grad=False)
    before = copy.deepcopy(model.state_dict())
    x_before, y_before, rng = x.clone(), y.clone(), torch.get_rng_state()
    g = lfr_ext.input_grad(model, x, y, hvp="linearized")
    assert torch.equal(torch.get_rng_state(), rng)  # eval mode: no Dropout draw, and no draw of lfr_ext's
    assert torch.equal(x, x_before) and torch.equal(y, y_before) and not x.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert g.requires_grad


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(hvp="forward"), ValueError, "hvp must be one of"),
        (dict(y=torch.zeros(6)), ValueError, "class indices"),
        (dict(y=torch.zeros(5, dtype=torch.long)), ValueError, "class indices"),
        (dict(loss_fn=lambda out, y: out.sum()), ValueError, "one loss per sample"),
        (dict(loss_fn="ce"), TypeError, "callable"),
        (dict(grad_scaler=object()), TypeError, "GradScaler"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, match):
    model, x, y = _setup("bn_relu_eval")
    arguments = {"y": y, **kwargs}
    with pytest.raises(error, match=match):
        lfr_ext.input_grad(model, x, arguments.pop("y"), **arguments)


def test_integer_x_and_non_module_are_refused():
    model, x, y = _setup("bn_relu_eval")
    with pytest.raises(TypeError, match="floating"):
        lfr_ext.input_grad(model, x.long(), y)
    with pytest.raises(TypeError, match="nn.Module"):
        lfr_ext.input_grad(lambda t: t, x, y)


def _ddp_on_ranks(rank, world):
    """One backward of (CE on the wrapper's forward + penalties on two input_grad calls) on each
    rank: every rank's gradient is the mean of the per-rank double-backprop gradients, with the
    tangent pass in use; return_outputs, which would skip the wrapper's forward, is refused."""
    from torch.nn.parallel import DistributedDataParallel

    from tests.dist_helpers import relative_errors

    torch.manual_seed(0)
    model = TinyResNet(drop=0.0).double().train()
    x = torch.rand(4 * world, 3, 10, 10, dtype=torch.float64).chunk(world)
    y = torch.randint(0, 5, (4 * world,)).chunk(world)

    def loss_of(net, xs, ys, hvp):  # two input gradients, as CURE and GradAlign take
        outputs = net(xs)  # first (before torch 2.13, DDP's forward broadcasts buffers in place)
        g = lfr_ext.input_grad(net, xs, ys, hvp=hvp)
        g_near = lfr_ext.input_grad(net, (xs + 0.03 * g.detach().sign()).clamp(0, 1), ys, hvp=hvp)
        return F.cross_entropy(outputs, ys) + g.flatten(1).abs().sum(1).mean() + ((g_near - g) ** 2).sum()

    expected_per_rank = []
    for r in range(world):
        single = copy.deepcopy(model)
        expected_per_rank.append(
            torch.autograd.grad(loss_of(single, x[r], y[r], "double_backprop"), list(single.parameters()))
        )
    expected = [sum(grads) / world for grads in zip(*expected_per_rank)]
    ddp = DistributedDataParallel(copy.deepcopy(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        loss_of(ddp, x[rank], y[rank], "linearized").backward()
    got = [p.grad for p in ddp.module.parameters()]
    with pytest.raises(ValueError, match="through the wrapper"):
        lfr_ext.input_grad(ddp, x[rank], y[rank], return_outputs=True)
    assert max(relative_errors(got, expected)) < RTOL, max(relative_errors(got, expected))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_gradient_is_the_mean_of_per_rank_double_backprop_gradients():
    from tests.dist_helpers import run_on_ranks

    run_on_ranks(_ddp_on_ranks, 2)


def _graphed_steps_against_eager(device):
    """Three SGD steps of Gradient Norm on input_grad's tangent pass, as GraphedStep runs them (one
    CUDA graph on a GPU, eagerly on the CPU) and as an eager loop: the same parameters after."""
    from lfr_ext import regularizers

    torch.manual_seed(0)
    model = TinyResNet(drop=0.0).to(device).train()
    twin = copy.deepcopy(model)
    x, y = torch.rand(8, 3, 10, 10, device=device), torch.randint(0, 5, (8,), device=device)

    def objective_of(net):
        def objective(a, b):
            out = regularizers.gradient_norm(net, a, b, eps=0.1, std=1.0, hvp="linearized")
            return out.loss, out.penalty

        return objective

    opt, twin_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(twin.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # on the CPU: "running the step eagerly"
        step = lfr_ext.GraphedStep(model, opt, objective_of(model), x, y)
    for _ in range(3):
        step(x, y)
        twin_opt.zero_grad()
        objective_of(twin)(x, y)[0].backward()
        twin_opt.step()
    return step, list(model.parameters()), list(twin.parameters())


def test_graphed_step_runs_input_grad_eagerly_on_the_cpu():
    step, params, twin_params = _graphed_steps_against_eager("cpu")
    assert not step.captured
    for a, b in zip(params, twin_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@requires_cuda
def test_graphed_step_captures_input_grad_and_replays_like_eager():
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # both runs in full fp32
        step, params, twin_params = _graphed_steps_against_eager("cuda")
    assert step.captured, step.reason
    for a, b in zip(params, twin_params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet_bn_train", "gelu_layernorm"])
def test_bf16_autocast_error_at_most_twice_double_backprops(name):
    """Under bf16 autocast the penalty's parameter gradients by the tangent pass are as close to
    the fp64 ones as double backprop's in the same dtype (at most twice its error)."""
    model, x, y = _setup(name, batch=16)
    reference = _run(model, x, y, "double_backprop")[2]  # fp64
    errors = {}
    for hvp in ("linearized", "double_backprop"):
        net = copy.deepcopy(model).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            g, outputs = lfr_ext.input_grad(net, x.float(), y, hvp=hvp, return_outputs=True)
            loss = _phi(g, outputs, y, None)
        grads = torch.autograd.grad(loss, list(net.parameters()))
        errors[hvp] = max(rel_err(a.double(), b) for a, b in zip(grads, reference) if b.norm() > 1e-8)
    assert errors["linearized"] <= 2 * errors["double_backprop"], errors
