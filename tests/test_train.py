"""The trainer end to end on a tiny Fashion-MNIST subset: every method, the run files, resume
after a crash (an injected exception, and a real SIGKILL mid-epoch), config presets."""

import functools
import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from lfr_ext.data import load_dataset
from lfr_ext.training import METHODS, PRESETS, TrainConfig, resolve_config, train
from lfr_ext.training import loop as loop_module
from lfr_ext.training.checkpoint import atomic_torch_save, load_checkpoint
from lfr_ext.training.monitor import collapse_message
from tests.utils import FASHION_MNIST_MARKS, requires_cuda

pytestmark = FASHION_MNIST_MARKS

# Small enough for a few seconds per run on 2 CPU cores, big enough to exercise every part.
TINY = dict(
    train_subset=64,
    batch_size=32,
    epochs=2,
    val_size=48,
    val_robust_size=16,
    val_attack_steps=2,
    steps=2,
    step_size=0.05,
    milestones=[2],
    lr=0.05,
)


@pytest.fixture(autouse=True)
def _cached_data(monkeypatch):
    """Decode the 60k training images once per session instead of once per run."""
    monkeypatch.setattr(loop_module, "load_dataset", _cached_load)


@functools.lru_cache(maxsize=None)
def _cached_load(name, split, directory=None):
    return load_dataset(name, split, directory)


def tiny_config(method="lfr", **overrides) -> TrainConfig:
    return resolve_config({**TINY, "method": method, **overrides})


def _comparable(history):
    return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in history]


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_end_to_end(tmp_path, method):
    cfg = tiny_config(method)
    result = train(cfg, str(tmp_path), device="cpu", progress=False, log=lambda s: None)
    assert [row["epoch"] for row in result.history] == [1, 2]
    for name in ("config.json", "last.pt", "metrics.csv", "metrics.json", "summary.json"):
        assert (tmp_path / name).exists(), name
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(cfg.to_json())
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert len(rows) == 2 and all(math.isfinite(r["train_loss"]) for r in rows)
    assert all(0 <= r["val_clean_acc"] <= 1 and 0 <= r["val_robust_acc"] <= 1 for r in rows)
    has_penalty = method not in ("pgd_at", "plain")
    assert all((r["train_penalty"] is not None) == has_penalty for r in rows)
    csv_lines = (tmp_path / "metrics.csv").read_text().strip().splitlines()
    assert csv_lines[0].startswith("epoch,lr,train_loss") and len(csv_lines) == 3
    checkpoint = load_checkpoint(str(tmp_path / "last.pt"))
    assert checkpoint["epoch"] == 2 and set(checkpoint["rng"]) == {"torch_cpu", "torch_cuda", "numpy", "python"}
    assert {"model", "optimizer", "scheduler"} <= set(checkpoint)
    if result.best_epoch is not None:
        assert load_checkpoint(str(tmp_path / "best.pt"))["epoch"] == result.best_epoch


class Crash(RuntimeError):
    pass


def test_resume_after_a_crash_mid_epoch_gives_identical_results(tmp_path):
    """LFR draws from the global RNG (start noise, Dropout): a run that crashes in the middle of
    epoch 2 and is resumed must end bit-for-bit where an uninterrupted run ends."""
    cfg = tiny_config("lfr")
    reference = train(cfg, str(tmp_path / "straight"), device="cpu", progress=False, log=lambda s: None)

    def crash_in_epoch_2(epoch, batch):
        if epoch == 2 and batch == 0:  # after the first of the epoch's two optimizer steps
            raise Crash("simulated crash")

    crashed_dir = str(tmp_path / "crashed")
    with pytest.raises(Crash):
        train(cfg, crashed_dir, device="cpu", progress=False, log=lambda s: None, batch_hook=crash_in_epoch_2)
    assert load_checkpoint(os.path.join(crashed_dir, "last.pt"))["epoch"] == 1  # epoch 1 kept
    torch.manual_seed(1234)  # the resumed run must not depend on the RNG state it starts in
    resumed = train(cfg, crashed_dir, resume=True, device="cpu", progress=False, log=lambda s: None)
    assert _comparable(resumed.history) == _comparable(reference.history)
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_resume_after_sigkill_mid_epoch(tmp_path):
    """A real kill -9 of a training process in the middle of epoch 2, then ``--resume``."""
    cfg = tiny_config("trades")
    reference = train(cfg, str(tmp_path / "straight"), device="cpu", progress=False, log=lambda s: None)
    killed_dir = str(tmp_path / "killed")
    script = textwrap.dedent(f"""
        import os, signal
        from lfr_ext.training import TrainConfig, train
        cfg = TrainConfig.from_dict({json.loads(cfg.to_json())!r})
        def kill_in_epoch_2(epoch, batch):
            if epoch == 2 and batch == 0:
                os.kill(os.getpid(), signal.SIGKILL)
        train(cfg, {killed_dir!r}, device="cpu", progress=False, batch_hook=kill_in_epoch_2)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert load_checkpoint(os.path.join(killed_dir, "last.pt"))["epoch"] == 1
    assert not [f for f in os.listdir(killed_dir) if f.startswith(".tmp-")]  # no torn temp files left behind
    resumed = train(cfg, killed_dir, resume=True, device="cpu", progress=False, log=lambda s: None)
    assert _comparable(resumed.history) == _comparable(reference.history)
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_resume_refuses_a_different_config_and_fresh_runs_refuse_to_overwrite(tmp_path):
    cfg = tiny_config("plain", epochs=1)
    train(cfg, str(tmp_path), device="cpu", progress=False, log=lambda s: None)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, str(tmp_path), device="cpu", progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="lr: saved 0.05, now 0.1"):
        train(
            tiny_config("plain", epochs=1, lr=0.1),
            str(tmp_path),
            resume=True,
            device="cpu",
            progress=False,
            log=lambda s: None,
        )


def test_atomic_save_keeps_the_old_checkpoint_when_writing_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    atomic_torch_save({"epoch": 1}, path)

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["last.pt"]


def test_collapse_detection():
    history = [{"epoch": 1, "val_clean_acc": 0.62}, {"epoch": 2, "val_clean_acc": 0.71}]
    assert collapse_message(history, num_classes=10, margin=0.05) == ""
    history.append({"epoch": 3, "val_clean_acc": 0.10})
    assert collapse_message(history, 10, 0.05).startswith("COLLAPSE: clean accuracy fell to 0.100")
    assert collapse_message([{"epoch": 1, "val_clean_acc": 0.12}], 10, 0.05).startswith("AT CHANCE")


def test_presets_reproduce_the_authors_settings_and_flags_override():
    mnist = resolve_config({"data": "mnist", "budget": "full"})
    assert (mnist.model, mnist.eps, mnist.steps, mnist.step_size, mnist.lam, mnist.lr, mnist.batch_size) == (
        "small_cnn",
        0.3,
        40,
        0.01,
        0.02,
        0.01,
        128,
    )
    cifar = resolve_config({"data": "cifar10", "budget": "full"})
    assert (cifar.model, cifar.eps, cifar.steps, cifar.step_size, cifar.lam, cifar.lr, cifar.weight_decay) == (
        "resnet20",
        0.031,
        10,
        0.007,
        0.03,
        0.1,
        2e-4,
    )
    fashion = resolve_config({"budget": "full"})
    assert (fashion.data, fashion.eps, fashion.train_subset) == ("fashion-mnist", 0.1, 0)
    quick = resolve_config({})
    assert (
        quick.budget == "quick" and quick.train_subset > 0 and quick.step_size == pytest.approx(2.5 * 0.1 / quick.steps)
    )
    assert resolve_config({"eps": 0.2, "lam": 0.5, "model": "resnet20"}).eps == 0.2
    assert set(PRESETS) == {"fashion-mnist", "mnist", "cifar10"}
    with pytest.raises(ValueError, match="method must be one of"):
        resolve_config({"method": "mart"})
    with pytest.raises(ValueError, match="val_robust_size"):
        resolve_config({"val_size": 10, "val_robust_size": 20})


def test_cli_reports_missing_data_clearly(tmp_path, capsys):
    from lfr_ext.cli.train import main

    code = main(["--data", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 2
    assert "CIFAR-10 not found" in capsys.readouterr().err


@requires_cuda
@pytest.mark.parametrize("method", METHODS)
def test_gpu_training_captures_every_method(tmp_path, method):
    """On a GPU every method's step is one CUDA graph (the schedule's lr change at epoch 2
    re-captures); nothing falls back to eager."""
    import warnings

    cfg = tiny_config(method, milestones=[1])  # lr drops after epoch 1: the key changes, a re-capture
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(cfg, str(tmp_path), device="cuda", progress=False, log=lambda s: None)
    eager = [str(w.message) for w in caught if "running the step eagerly" in str(w.message)]
    assert not eager, eager
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps_ran"] == "captured" and summary["device"].startswith("cuda")
    assert all(math.isfinite(row["train_loss"]) for row in result.history)


@requires_cuda
def test_validation_monitor_same_attack_on_gpu_and_cpu():
    """The robust monitor's PGD start comes from a private CPU generator: on a GPU it must draw
    the same start (and so give the same accuracy, up to GPU arithmetic) as on the CPU."""
    from lfr_ext.models import SmallCNN
    from lfr_ext.training.monitor import validation_accuracies

    torch.manual_seed(0)
    model = SmallCNN(zero_init_last=False).eval()
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    on_cpu = validation_accuracies(model, x, y, robust_size=64, eps=0.1, steps=3, seed=0)
    on_gpu = validation_accuracies(model.cuda(), x.cuda(), y.cuda(), robust_size=64, eps=0.1, steps=3, seed=0)
    assert on_cpu[0] == on_gpu[0] and abs(on_cpu[1] - on_gpu[1]) <= 2 / 64


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_training_on_the_cpu(tmp_path, method):
    result = train(
        tiny_config(method, amp="bf16", epochs=1), str(tmp_path), device="cpu", progress=False, log=lambda s: None
    )
    assert math.isfinite(result.history[0]["train_loss"])


def test_fp16_needs_a_gpu_and_old_configs_resume(tmp_path):
    with pytest.raises(ValueError, match="amp='fp16'.*needs a CUDA GPU"):
        train(tiny_config("plain", amp="fp16", epochs=1), str(tmp_path), device="cpu", progress=False)
    with pytest.raises(ValueError, match="amp must be one of"):
        tiny_config("plain", amp="fp8")
    from lfr_ext.training.loop import _config_mismatch

    saved = json.loads(tiny_config("plain").to_json())
    del saved["amp"]  # a run folder written before the field existed
    assert _config_mismatch(saved, tiny_config("plain")) == []
    assert _config_mismatch(saved, tiny_config("plain", amp="bf16")) == ["amp: saved 'none', now 'bf16'"]


@requires_cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_gpu_mixed_precision_training(tmp_path, amp):
    """bf16 steps are captured; fp16 steps run eagerly (GradScaler.step reads found_inf on the
    host), and the scaler's state is in the checkpoint."""
    result = train(tiny_config("lfr", amp=amp), str(tmp_path), device="cuda", progress=False, log=lambda s: None)
    assert all(math.isfinite(row["train_loss"]) for row in result.history)
    summary = json.loads((tmp_path / "summary.json").read_text())
    if amp == "bf16":
        assert summary["steps_ran"] == "captured"
    else:
        assert summary["steps_ran"].startswith("eager (fp16")
    assert ("grad_scaler" in load_checkpoint(str(tmp_path / "last.pt"))) == (amp == "fp16")


@pytest.mark.parametrize("method", ["lfr", "pgd_at", "trades"])
def test_compile_flag_trains_and_falls_back_with_a_message(tmp_path, monkeypatch, method):
    monkeypatch.setenv("LFR_EXT_COMPILE_BACKEND", "aot_eager")  # seconds to compile, not minutes
    train(
        tiny_config(method, compile=True, epochs=1),
        str(tmp_path / "on"),
        device="cpu",
        progress=False,
        log=lambda s: None,
    )
    assert json.loads((tmp_path / "on" / "summary.json").read_text())["steps_ran"] == "eager, compiled"
    monkeypatch.delattr(torch._dynamo.config, "trace_autograd_ops")
    lines = []
    train(
        tiny_config(method, compile=True, epochs=1),
        str(tmp_path / "off"),
        device="cpu",
        progress=False,
        log=lines.append,
    )
    # Only LFR traces autograd calls: it alone runs eagerly, and says why; the baselines still compile.
    warnings = [line for line in lines if line.startswith("WARNING --compile")]
    steps_ran = json.loads((tmp_path / "off" / "summary.json").read_text())["steps_ran"]
    if method == "lfr":
        assert len(warnings) == 1 and warnings[0].startswith(
            "WARNING --compile: lfr runs eagerly: this torch cannot trace autograd.grad"
        ), warnings
        assert steps_ran == "eager"
    else:
        assert not warnings and steps_ran == "eager, compiled"
