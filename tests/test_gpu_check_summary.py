"""bench/summarize.py, the summary of scripts/gpu_check.sh, on results shaped like a GPU run's.

CI runs the check only as a CPU dry run, where the captured and GPU providers are absent, so
the headline arithmetic is checked here on synthetic suites: each goal is computed from the
right providers, and met or missed on the right side of its threshold."""

import json

import pytest

from bench import summarize


def _row(median_s, params=None, **extra):
    return {"name": "x", "group": "g", "params": params or {}, "stats": {"median": median_s}, "extra_info": extra}


def _suite(rows):
    env = {"gpu": "Test GPU", "torch": "2.x", "cuda": "13.0", "triton": "3.6", "lfr_ext": "0.1.0", "git_sha": "abc"}
    return {"machine_info": {"lfr_ext_environment": env, "cpu": {"brand_raw": "cpu"}}, "benchmarks": rows}


def _ops_row(shape_name, dtype, provider, device_us, host_us, fraction):
    return _row(
        device_us / 1e6,
        dict(shape_name=shape_name, dtype_name=dtype, provider=provider),
        provider=provider,
        shape=[1],
        dtype=dtype,
        device_us=device_us,
        host_inclusive_us=host_us,
        fraction_of_copy_bandwidth=fraction,
    )


@pytest.fixture
def results(tmp_path):
    step = []
    for setup, pgd, lfr, authors in (
        ("smallcnn_mnist_k40", 0.016, 0.030, 0.140),
        ("resnet18_cifar_k10", 0.045, 0.110, 0.262),
    ):
        for provider, median, peak in (
            ("pgd_at_captured", pgd, 100.0),
            ("lfr_ext_captured", lfr, 160.0),
            ("authors_lfr", authors, 300.0),
        ):
            step.append(
                _row(
                    median, setup=setup, provider=provider, batch=128, steps=10, peak_memory_mb=peak, graph_pool_mb=None
                )
            )
    ops = [
        _ops_row("imagenet", "fp32", "cuda", 400.0, 420.0, 0.93),
        _ops_row("imagenet", "fp32", "triton", 450.0, 470.0, 0.85),
        _ops_row("imagenet", "fp32", "reference", 3000.0, 3100.0, 0.12),
        _ops_row("mnist", "fp32", "cuda", 4.0, 12.5, 0.2),
        _ops_row("mnist", "fp32", "triton", 5.0, 31.0, 0.1),
    ]
    for suite, rows in (("step", step), ("ascent_step", ops)):
        (tmp_path / f"gpu-day-{suite}.json").write_text(json.dumps(_suite(rows)))
    return tmp_path


def test_headline_goals_from_the_right_providers(results):
    goals = {g.figure: g for g in summarize.headline(summarize._load(str(results), "gpu-day"))}
    small = goals["captured LFR step / captured PGD-AT step, SmallCNN K=40"]
    assert small.value == pytest.approx(0.030 / 0.016) and small.met is True
    resnet = goals["captured LFR step / captured PGD-AT step, ResNet-18 K=10"]
    assert resnet.value == pytest.approx(0.110 / 0.045) and resnet.met is False  # 2.44x > 2.2x
    assert goals["authors' eager LFR step / lfr_ext captured, SmallCNN"].value == pytest.approx(0.140 / 0.030)
    assert goals["authors' eager LFR step / lfr_ext captured, ResNet-18"].met is False  # 2.38x < 2.5x
    assert goals["peak memory, captured LFR step / PGD-AT's, SmallCNN"].value == pytest.approx(1.6)
    assert goals["peak memory, captured LFR step / PGD-AT's, SmallCNN"].met is False
    bandwidth = [g for f, g in goals.items() if f.startswith("fused ascent_step (256")][0]
    assert bandwidth.value == pytest.approx(93.0) and bandwidth.met is True  # best of cuda/triton, not reference
    host = [g for f, g in goals.items() if f.startswith("fused ascent_step (128")][0]
    assert host.value == pytest.approx(12.5) and host.met is False  # judged on host-inclusive time


def test_ratios_are_computed_from_the_results_whatever_their_order():
    """The baseline of a ratio (PGD-AT at the same capture mode, one gradient, one rank) is
    looked up in the results: it may come after the rows divided by it (-k, random order)."""
    step = [
        _row(0.030, setup="s", provider="lfr_ext_captured", batch=8, steps=2),
        _row(0.060, setup="s", provider="lfr_ext", batch=8, steps=2),
        _row(0.020, setup="s", provider="pgd_at", batch=8, steps=2),
        _row(0.010, setup="s", provider="pgd_at_captured", batch=8, steps=2),
    ]
    tangent = [_row(0.5, setup="t", provider="linearized", batch=4), _row(0.2, setup="t", provider="gradient", batch=4)]
    scale_out = [
        _row(1.0, world_size=2, global_batch=8, steps=2, step_median_s=1.0, images_per_s=8.0),
        _row(1.6, world_size=1, global_batch=8, steps=2, step_median_s=1.6, images_per_s=5.0),
    ]
    suites = {"step": _suite(step), "tangent": _suite(tangent), "scale_out": _suite(scale_out)}
    step_rows = summarize.step_table(suites)[2:]
    assert "| 3.00x |" in step_rows[0] and "| 3.00x |" in step_rows[1]  # each against its own capture mode
    assert "| 2.50 |" in summarize.tangent_table(suites)[2]
    assert "efficiency 80%" in summarize.scale_out_table(suites)[2]
    empty = {"step": _suite(step[:2]), "tangent": _suite(tangent[:1]), "scale_out": _suite(scale_out[:1])}
    assert "n/a" in summarize.step_table(empty)[2] and "n/a" in summarize.tangent_table(empty)[2]
    assert "efficiency" not in summarize.scale_out_table(empty)[2]


def test_missing_suites_are_reported_not_invented(tmp_path):
    text = summarize.render(str(tmp_path), "nothing", None, part=1, names=("step", "ascent_step"))
    assert "Missing suites (failed, timed out or skipped): step, ascent_step." in text
    assert "yes" not in text.split("## Headline figures")[1].split("##")[0]


def test_a_part_shows_its_own_suites_only(results):
    """Part 2 holds no headline suite: no headline table, and the suites of part 1 are neither
    missing nor shown; the training comparison comes from the gathered summaries."""
    summaries = {
        "lfr": {
            "steps_ran": "captured",
            "epochs": 2,
            "mean_epoch_seconds": 3.5,
            "final": {"val_clean_acc": 0.81, "val_robust_acc": 0.52},
        }
    }
    (results / "train.json").write_text(json.dumps(summaries))
    text = summarize.render(
        str(results), "gpu-day", None, part=2, names=("tangent",), training=str(results / "train.json")
    )
    assert "## Headline figures" not in text and "## Training steps (" not in text
    assert "Missing suites (failed, timed out or skipped): tangent." in text
    assert "| lfr | captured | 2 | 3.50 s | 0.810 | 0.520 |" in text
    assert "| plain | not run (or not finished) |" in text


def test_summary_file_written(results):
    summarize.main([str(results), "--prefix", "gpu-day", "--part", "1", "--suites", "step,ascent_step"])
    assert [p.name for p in results.iterdir() if p.suffix == ".md"] == ["gpu-day-part1-summary.md"]
    assert "Machine: Test GPU" in (results / "gpu-day-part1-summary.md").read_text()
    with pytest.raises(SystemExit):
        summarize.main([str(results), "--prefix", "gpu-day", "--part", "1", "--suites", "steps"])
