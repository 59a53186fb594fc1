"""GraphedStep and CapturedStep: a whole training step as one CUDA graph, with an eager fallback.

The decisions (what can be captured, what a capture bakes in, the fresh parameter leaves) are
checked on the CPU; capture and replay themselves on a GPU."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lfr_ext
from lfr_ext.graphed_step import (
    GraphedStep,
    baked_settings,
    capture_problem,
    fresh_parameter_leaves,
    host_state_problem,
)
from lfr_ext.models import ResNet20, SmallCNN
from tests.utils import requires_cuda

KW = dict(lam=0.02, eps=0.1, step_size=0.02, steps=3)
META = torch.device("meta")  # stands in for a GPU tensor in the CPU checks of the rules


def _setup(device="cpu", drop=0.0, model="small_cnn", optimizer="sgd", dtype=torch.float32):
    torch.manual_seed(0)
    if model == "small_cnn":
        net, shape = SmallCNN(drop=drop, zero_init_last=False), (8, 1, 28, 28)
    else:
        net, shape = ResNet20(), (8, 3, 32, 32)
    net = net.to(device=device, dtype=dtype).train()
    x = torch.rand(shape, device=device, dtype=dtype)
    y = torch.randint(0, 10, (8,), device=device)
    return net, _optimizer(net, optimizer), x, y


def _optimizer(model, kind):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)


def _manual_steps(model, optimizer, batches, **kw):
    outs = []
    for x, y in batches:
        out = lfr_ext.lfr_loss(model, x, y, **kw)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        outs.append(out.loss.detach())
    return outs


def _cross_entropy_step(model):
    def objective(x, y):
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    return objective


# ------------------------------------------------------------------------------------------
# CPU: the fallback and the rules
# ------------------------------------------------------------------------------------------
def test_cpu_falls_back_to_the_eager_step():
    model, optimizer, x, y = _setup()
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    with pytest.warns(RuntimeWarning, match="CUDA graphs need CUDA tensors"):
        step = lfr_ext.CapturedStep(model, optimizer, x, y, init_std=0.0, **KW)
    assert not step.captured and "CUDA" in step.reason
    batches = [(torch.rand_like(x), torch.randint(0, 10, (8,))) for _ in range(3)]
    got = [step(bx, by).loss for bx, by in batches]
    expected = _manual_steps(twin, twin_opt, batches, init_std=0.0, **KW)
    torch.testing.assert_close(torch.stack(got), torch.stack(expected), rtol=1e-6, atol=0)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_generic_step_on_cpu_is_an_ordinary_step():
    model, optimizer, x, y = _setup()
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    with pytest.warns(RuntimeWarning, match="CUDA graphs need CUDA tensors"):
        step = GraphedStep(model, optimizer, _cross_entropy_step(model), x, y)
    loss, logits = step(x, y)
    assert not loss.requires_grad and logits.shape == (8, 10)
    twin_loss = F.cross_entropy(twin(x), y)
    twin_opt.zero_grad()
    twin_loss.backward()
    twin_opt.step()
    torch.testing.assert_close(loss, twin_loss.detach())
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)


def test_arguments_checked_at_construction():
    model, optimizer, x, y = _setup()
    with pytest.raises(ValueError, match="eps must be >= 0"):
        lfr_ext.CapturedStep(model, optimizer, x, y, **{**KW, "eps": -1.0})
    with pytest.raises(ValueError, match="x must lie inside clip"):
        lfr_ext.CapturedStep(model, optimizer, x + 2, y, **KW)
    with pytest.raises(ValueError, match="generator= is not supported"):
        lfr_ext.CapturedStep(model, optimizer, x, y, generator=torch.Generator(), **KW)
    with pytest.raises(ValueError, match="lam must be"):
        lfr_ext.CapturedStep(model, optimizer, x, y, **{**KW, "lam": -1})
    with pytest.raises(ValueError, match="warmup_steps must be an integer >= 2"):
        lfr_ext.CapturedStep(model, optimizer, x, y, warmup_steps=1, **KW)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        GraphedStep(model, optimizer, None, x, y)


def _params():
    return [nn.Parameter(torch.zeros(3))]


def _on_device_lr(optimizer):
    """The optimizer with a device tensor as lr (a meta tensor stands in for a GPU one here;
    constructors read the value, so it is put in afterwards)."""
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(0.1, device=META)
    return optimizer


def test_capture_problem_names_host_reads_of_tensor_hyperparameters():
    """foreach SGD and non-capturable Adam turn a tensor lr into a number with .item(): on a GPU
    tensor that is a host sync inside the step. Fused SGD and capturable Adam read it from memory."""
    cuda = torch.device("cuda")
    reason = capture_problem(_on_device_lr(torch.optim.SGD(_params(), lr=0.1, momentum=0.9)), cuda)
    assert "reads its GPU tensor lr on the host" in reason and "SGD(..., fused=True)" in reason
    assert capture_problem(_on_device_lr(torch.optim.SGD(_params(), lr=0.1, momentum=0.9, fused=True)), cuda) is None
    assert capture_problem(_on_device_lr(torch.optim.Adam(_params(), lr=0.1, capturable=True)), cuda) is None
    assert capture_problem(_on_device_lr(torch.optim.AdamW(_params(), lr=0.1, capturable=True)), cuda) is None
    assert "capturable=True" in capture_problem(torch.optim.Adam(_params(), lr=0.1), cuda)
    # Optimizer.step() refuses a capture unless capturable=True, fused or not.
    assert "capturable=True" in capture_problem(torch.optim.Adam(_params(), lr=0.1, fused=True), cuda)
    assert capture_problem(torch.optim.Adam(_params(), lr=0.1, fused=True, capturable=True), cuda) is None
    # A CPU tensor is read at launch: capturable (its value is baked in, see the next test).
    assert capture_problem(torch.optim.SGD(_params(), lr=torch.tensor(0.1)), cuda) is None
    assert "CUDA graphs need CUDA tensors" in capture_problem(torch.optim.SGD(_params(), lr=0.1), torch.device("cpu"))


def test_host_state_problem_names_state_kept_on_the_cpu():
    """Adagrad keeps its step counters on the CPU and updates them on the host: a graph would
    freeze them. (A meta parameter stands in for a GPU one.)"""
    cpu_param = nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adagrad([cpu_param], lr_decay=0.1)
    assert host_state_problem(opt) is None
    opt.state[nn.Parameter(torch.zeros(3, device=META))] = {
        "step": torch.tensor(1.0),
        "sum": torch.zeros(3, device=META),
    }
    assert "keeps step on the CPU" in host_state_problem(opt)


def test_baked_settings_hold_cpu_tensor_values_and_module_modes():
    """What a capture bakes in is the re-capture key: numbers, CPU tensors' values (a scheduler's
    fill_ must re-capture), module modes; never a GPU tensor, which each replay reads."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))
    cpu_lr = torch.tensor(0.1)
    opt = torch.optim.SGD(model.parameters(), lr=cpu_lr, momentum=0.9)
    before = baked_settings(opt, model)
    cpu_lr.fill_(0.01)
    assert baked_settings(opt, model) != before
    opt.param_groups[0]["momentum"] = 0.5
    assert baked_settings(opt, model) != before
    opt = _on_device_lr(torch.optim.SGD(model.parameters(), lr=0.1, fused=True))
    before = baked_settings(opt, model)
    opt.param_groups[0]["lr"].fill_(0.01)
    assert baked_settings(opt, model) == before
    model.eval()
    assert baked_settings(opt, model) != before


def test_fresh_parameter_leaves_share_storage_and_come_back():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)
            self.b.weight = self.a.weight  # one parameter in two modules
            self.frozen = nn.Linear(3, 1)
            self.frozen.requires_grad_(False)

        def forward(self, x):
            return self.frozen(self.b(self.a(x)))

    model = Tied()
    originals = dict(model.named_parameters())
    weight_before = originals["a.weight"].detach().clone()
    with fresh_parameter_leaves(model) as leaves:
        assert model.a.weight is model.b.weight and model.a.weight is not originals["a.weight"]
        assert model.a.weight.data_ptr() == originals["a.weight"].data_ptr()
        assert model.frozen.weight is originals["frozen.weight"]  # no accumulator to replace
        assert {id(p) for p, _ in leaves} == {id(p) for p in originals.values() if p.requires_grad}
        model(torch.rand(2, 3)).sum().backward()
        with torch.no_grad():
            model.a.weight.add_(1.0)  # one storage: the parameter sees it
    assert all(originals[name] is p for name, p in model.named_parameters())
    assert all(p.grad is None for p in originals.values())  # gradients went to the leaves
    assert all(leaf.grad is not None for _, leaf in leaves)
    torch.testing.assert_close(originals["a.weight"], weight_before + 1.0)
    with pytest.raises(RuntimeError, match="boom"), fresh_parameter_leaves(model):
        raise RuntimeError("boom")
    assert all(originals[name] is p for name, p in model.named_parameters())


# ------------------------------------------------------------------------------------------
# GPU: capture, replay, fallbacks
# ------------------------------------------------------------------------------------------
def _training_state(model, optimizer):
    return (
        copy.deepcopy(model.state_dict()),
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        copy.deepcopy(optimizer.state_dict()),
        torch.get_rng_state(),
        torch.cuda.get_rng_state(),
    )


def _assert_same_state(a, b):
    for name in a[0]:
        assert torch.equal(a[0][name], b[0][name]), name
    assert all((g is None and h is None) or torch.equal(g, h) for g, h in zip(a[1], b[1]))
    for (pa, sa), (pb, sb) in zip(a[2]["state"].items(), b[2]["state"].items()):
        assert pa == pb and sa.keys() == sb.keys()
        assert all(torch.equal(torch.as_tensor(sa[k]).cpu(), torch.as_tensor(sb[k]).cpu()) for k in sa)
    assert torch.equal(a[3], b[3]) and torch.equal(a[4], b[4]), "the global RNG states moved"


CONFIGS = [("small_cnn", 0.3), ("resnet20", 0.0)]  # Dropout; BatchNorm (train mode: batch statistics)


@requires_cuda
@pytest.mark.parametrize("hvp", ["auto", "double_backprop"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("model_name, drop", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_capture_leaves_state_as_before_and_replays_match_eager(exact_fp32, model_name, drop, optimizer, hvp):
    """Built after an eager step (so there is optimizer state to put back): parameters, buffers,
    .grad, optimizer state and RNG states are as before; then replays equal eager steps drawn
    from the same RNG state (start noise, Dropout masks)."""
    model, opt, x, y = _setup("cuda", drop=drop, model=model_name, optimizer=optimizer)
    _manual_steps(model, opt, [(x, y)], hvp=hvp, **KW)
    twin = copy.deepcopy(model)
    twin_opt = _optimizer(twin, optimizer)
    twin_opt.load_state_dict(opt.state_dict())
    before = _training_state(model, opt)
    step = lfr_ext.CapturedStep(model, opt, x, y, hvp=hvp, **KW)
    assert step.captured, step.reason
    _assert_same_state(before, _training_state(model, opt))
    batches = [(torch.rand_like(x), torch.randint(0, 10, (8,), device="cuda")) for _ in range(3)]
    torch.manual_seed(11)
    got = [step(bx, by).loss.clone() for bx, by in batches]
    torch.manual_seed(11)
    expected = _manual_steps(twin, twin_opt, batches, hvp=hvp, **KW)
    torch.testing.assert_close(torch.stack(got), torch.stack(expected), rtol=1e-4, atol=1e-6)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    for a, b in zip(model.buffers(), twin.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@requires_cuda
def test_captured_engine_equals_eager_double_backprop_fp64():
    """The captured engine (linearized, one graph) against the authors' double backprop run
    eagerly, in fp64: the loss, the penalty and every parameter gradient (lr = 0 keeps the
    weights, so .grad after the replay is the gradient at the same point). The ascended point
    enters both through the penalty. tests/test_authors_equivalence.py ties lfr_ext's
    double backprop to a transcription of the authors' code."""
    model, _, x, y = _setup("cuda", model="resnet20", dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    step = lfr_ext.CapturedStep(model, opt, x, y, **KW)
    assert step.captured, step.reason
    reference = copy.deepcopy(model)  # before the replay updates the BatchNorm running statistics
    torch.manual_seed(5)
    out = step(x, y)
    grads = [p.grad.clone() for p in model.parameters()]
    torch.manual_seed(5)
    ref = lfr_ext.lfr_loss(reference, x, y, hvp="double_backprop", **KW)
    ref_grads = torch.autograd.grad(ref.loss, list(reference.parameters()))
    torch.testing.assert_close(out.penalty, ref.penalty.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(out.loss, ref.loss.detach(), rtol=1e-10, atol=0)
    for (name, _), got, want in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=name)


@requires_cuda
def test_eager_output_kept_alive_does_not_break_the_capture():
    """An eager step's LFRLoss still alive keeps the parameters' AccumulateGrad nodes on the
    default stream (pytorch/pytorch#165065); the capture uses fresh leaves and succeeds."""
    model, opt, x, y = _setup("cuda")
    out = lfr_ext.lfr_loss(model, x, y, **KW)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    step = lfr_ext.CapturedStep(model, opt, x, y, **KW)
    assert step.captured, step.reason
    assert torch.isfinite(step(x, y).loss)
    assert out.loss.grad_fn is not None  # still alive


@requires_cuda
def test_host_sync_found_before_any_capture(monkeypatch):
    class Syncing(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x) * (1.0 + 0.0 * x.sum().item())  # .item(): a host sync

    model = Syncing().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(6, 4, device="cuda"), torch.randint(0, 3, (6,), device="cuda")

    def no_capture(*args, **kwargs):
        raise AssertionError("a capture was begun for a step known to synchronise")

    monkeypatch.setattr(torch.cuda, "graph", no_capture)
    with pytest.warns(RuntimeWarning, match="synchronises with the host"):
        step = GraphedStep(model, opt, _cross_entropy_step(model), x, y)
    assert not step.captured
    assert torch.cuda.get_sync_debug_mode() == 0  # put back
    step(x, y)  # runs eagerly


@requires_cuda
def test_tensor_learning_rate():
    """A CUDA tensor lr is read by each replay (fused SGD); foreach SGD would .item() it and is
    refused; a CPU tensor lr is baked in, so changing it re-captures."""
    model, _, x, y = _setup("cuda")
    lr = torch.tensor(0.05, device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=lr, fused=True)
    step = lfr_ext.CapturedStep(model, opt, x, y, **KW)
    assert step.captured, step.reason
    graph = step.graph
    lr.fill_(0.0)  # what a scheduler does to a tensor lr
    weights = [p.detach().clone() for p in model.parameters()]
    step(x, y)
    assert step.graph is graph  # no re-capture
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights))

    with pytest.warns(RuntimeWarning, match="fused=True"):
        refused = lfr_ext.CapturedStep(model, torch.optim.SGD(model.parameters(), lr=lr), x, y, **KW)
    assert not refused.captured

    cpu_lr = torch.tensor(0.05)
    step = lfr_ext.CapturedStep(model, torch.optim.SGD(model.parameters(), lr=cpu_lr), x, y, **KW)
    assert step.captured, step.reason
    graph = step.graph
    cpu_lr.fill_(0.0)
    weights = [p.detach().clone() for p in model.parameters()]
    step(x, y)
    assert step.graph is not graph  # the baked-in value changed: re-captured
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights))


@requires_cuda
def test_grad_is_the_graphs_buffer_after_an_eager_fallback():
    model, opt, x, y = _setup("cuda")
    step = lfr_ext.CapturedStep(model, opt, x, y, **KW)
    assert step.captured, step.reason
    step(x, y)
    buffers = [p.grad for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="differs from the captured"):
        step(x[:4], y[:4])
    assert all(p.grad is g for p, g in zip(model.parameters(), buffers))
    opt.zero_grad(set_to_none=True)
    step(x, y)
    assert all(p.grad is g for p, g in zip(model.parameters(), buffers))


@requires_cuda
def test_other_shape_runs_eagerly_and_lr_change_recaptures():
    model, optimizer, x, y = _setup("cuda")
    step = lfr_ext.CapturedStep(model, optimizer, x, y, **KW)
    with pytest.warns(RuntimeWarning, match="differs from the captured"):
        step(x[:4], y[:4])
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    params = [p.detach().clone() for p in model.parameters()]
    for group in optimizer.param_groups:
        group["momentum"] = 0.0  # with lr 0 and no momentum, a step must leave the weights alone
    step(x, y)
    assert step.captured
    for a, b in zip(model.parameters(), params):
        assert torch.equal(a, b)


@requires_cuda
def test_non_capturable_optimizer_falls_back():
    model, _, x, y = _setup("cuda")
    optimizer = torch.optim.Adam(model.parameters(), capturable=False)
    with pytest.warns(RuntimeWarning, match="capturable=True"):
        step = lfr_ext.CapturedStep(model, optimizer, x, y, **KW)
    assert not step.captured
    step(x, y)


@requires_cuda
def test_frequent_recaptures_warn():
    model, optimizer, x, y = _setup("cuda")
    step = GraphedStep(model, optimizer, _cross_entropy_step(model), x, y)
    with pytest.warns(RuntimeWarning, match="keep changing"):
        for value in (0.04, 0.03, 0.02, 0.01):
            optimizer.param_groups[0]["lr"] = value
            step(x, y)
