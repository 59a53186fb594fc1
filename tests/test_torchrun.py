"""``lfr-train`` under ``torchrun`` on 2 gloo ranks (the CPU stand-in for NCCL): the same weights
as one process stepping through the same global batches, and a killed rank that torchrun
restarts loses nothing."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lfr_ext.data import DATASETS
from lfr_ext.models import build_model
from lfr_ext.training import parallel, resolve_config
from lfr_ext.training.checkpoint import load_checkpoint
from lfr_ext.training.data_order import epoch_batches
from lfr_ext.training.loop import load_run_data, make_optimizer, seed_everything
from lfr_ext.training.methods import METHOD_STEPS
from tests.utils import FASHION_MNIST_MARKS

pytestmark = [
    *FASHION_MNIST_MARKS,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
]

WORLD = 2
OVERRIDES = dict(method="lfr", train_subset=256, epochs=2)
FLAGS = ["--method", "lfr", "--train-subset", "256", "--epochs", "2"]


def _torchrun(args, out_dir, *, max_restarts=0, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD}",
        f"--max-restarts={max_restarts}",
        *args,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("torchrun") / "straight")
    _torchrun(["-m", "lfr_ext.train", *FLAGS, "--device", "cpu", "--no-progress", "--out", out_dir], out_dir)
    return out_dir


def _comparable(history):
    return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in history]


def _one_process_reference():
    """The 2-rank run stepped through in one process: each global batch's two halves with each
    rank's own RNG stream, the gradients averaged, one optimizer step."""
    cfg = resolve_config(OVERRIDES)
    x_train, y_train, _, _ = load_run_data(cfg, None)
    info = DATASETS[cfg.data]
    seed_everything(cfg.seed)
    model = build_model(
        cfg.model, in_channels=info.in_channels, num_classes=info.num_classes, image_size=info.image_size
    )
    assert not list(model.buffers())  # no per-rank BatchNorm statistics to follow
    states = []
    for rank in range(WORLD):
        torch.manual_seed(parallel.rank_seed(cfg.seed, rank))
        states.append(torch.get_rng_state())
    optimizer, scheduler = make_optimizer(model, cfg)
    step_fn = METHOD_STEPS[cfg.method]
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        for batch in epoch_batches(len(x_train), cfg.batch_size, seed=cfg.seed, epoch=epoch):
            optimizer.zero_grad(set_to_none=True)
            for rank, share in enumerate(batch.tensor_split(WORLD)):
                torch.set_rng_state(states[rank])
                out = step_fn(model, x_train[share], y_train[share], cfg)
                (out.loss / WORLD).backward()
                states[rank] = torch.get_rng_state()
            optimizer.step()
        scheduler.step()
    return model


def test_two_ranks_train_what_one_process_trains_on_the_same_global_batches(straight_run):
    summary = json.loads(open(os.path.join(straight_run, "summary.json")).read())
    assert (
        summary["world_size"] == WORLD and summary["per_rank_batch_size"] == resolve_config(OVERRIDES).batch_size // 2
    )
    checkpoint = load_checkpoint(os.path.join(straight_run, "last.pt"))
    assert len(checkpoint["rng_per_rank"]) == WORLD and checkpoint["world_size"] == WORLD
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the CPU kernels' reduction order depends on the thread count
    try:
        reference = _one_process_reference()
    finally:
        torch.set_num_threads(threads)
    # Bitwise: DDP's mean (g0 / 2 + g1 / 2, exact halvings) is the reference's sum of halved
    # gradients. (The sign ascent amplifies any rounding difference, so "close" would not hold
    # either: 2 threads against 1 give relative differences up to 7e-3 after 8 steps.)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(checkpoint["model"][name], tensor), name


def test_a_killed_rank_resumes_with_nothing_lost(straight_run, tmp_path):
    """Rank 1 is SIGKILLed in the middle of epoch 2; torchrun restarts the group, which resumes
    from epoch 1's checkpoint and ends where the uninterrupted run ends, bit for bit."""
    out_dir = str(tmp_path / "killed")
    driver = tmp_path / "driver.py"
    driver.write_text(
        textwrap.dedent(f"""
        import os, signal
        from lfr_ext.training import resolve_config, train

        def kill_rank_1_in_epoch_2(epoch, batch):
            first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
            if first_attempt and os.environ["RANK"] == "1" and epoch == 2 and batch == 0:
                os.kill(os.getpid(), signal.SIGKILL)

        train(resolve_config({OVERRIDES!r}), {out_dir!r}, device="cpu", progress=False,
              batch_hook=kill_rank_1_in_epoch_2)
    """)
    )
    proc = _torchrun([str(driver)], out_dir, max_restarts=1)
    assert "resuming after epoch 1" in proc.stdout + proc.stderr
    killed, straight = (load_checkpoint(os.path.join(d, "last.pt")) for d in (out_dir, straight_run))
    assert _comparable(killed["history"]) == _comparable(straight["history"])
    for name, tensor in straight["model"].items():
        assert torch.equal(killed["model"][name], tensor), name
