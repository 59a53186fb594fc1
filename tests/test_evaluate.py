"""Evaluation: torchattacks without torchvision, attack numbers on a toy model checked by hand,
the gradient-masking checks, the end-to-end evaluation of a trained run, and the report."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lfr_ext.evaluation.attacks import INSTALL_COMMAND, AttackSuite, accuracy_vs_eps, require_torchattacks, run_attacks
from lfr_ext.evaluation.sanity import accuracy_reaches_zero, black_box_not_better, stronger_attacks_not_weaker
from tests.models_for_tests import LinearToy, toy_data
from tests.utils import HAVE_TORCHATTACKS, needs_fashion_mnist, needs_torchattacks


@needs_torchattacks
def test_torchattacks_imports_without_torchvision():
    """torchattacks 3.5.1 declares torchvision but must not need it: import every attack we use
    with torchvision made unimportable."""
    code = (
        "import sys; sys.modules['torchvision'] = None\n"
        "import torchattacks\n"
        "from torchattacks import APGD, APGDT, FAB, FGSM, PGD, MultiAttack, Square, AutoAttack\n"
        "print(torchattacks.__version__)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "3.5.1"


def test_missing_torchattacks_names_the_install_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # makes `import torchattacks` fail
    with pytest.raises(ImportError, match="--no-deps torchattacks==3.5.1"):
        require_torchattacks()
    from lfr_ext.cli.evaluate import main

    assert main(["runs/does-not-matter"]) == 2
    assert INSTALL_COMMAND in capsys.readouterr().err


@needs_torchattacks
def test_attack_accuracies_on_a_linear_toy_match_hand_computation():
    """eps 0.05 moves s by at most 4 * 0.05 = 0.2: clean 7/8 correct; robust only |s| in
    {0.3, 0.35, 0.8} -> 3/8 under every attack (FGSM is optimal for a linear model)."""
    x, y = toy_data()
    suite = AttackSuite(eps=0.05, pgd_steps=10, pgd_restarts=2, square_queries=300, num_classes=4)
    result = run_attacks(LinearToy(), x, y, suite)
    expected_robust = [False, False, True, False, False, False, True, True]
    assert result.correct["clean"].tolist() == [True, True, True, False, True, True, True, True]
    for name in ("FGSM", "PGD-10x2", "AutoAttack"):
        assert result.correct[name].tolist() == expected_robust, name
    # Square is a random search: it cannot break the provably robust samples, and it may or
    # may not find the corner that breaks the others within its queries.
    square = result.correct["Square-300"]
    assert square[torch.tensor(expected_robust)].all() and not square[3]
    assert result.worst_case().float().mean().item() == 3 / 8
    assert result.accuracy("clean") == 7 / 8


@needs_torchattacks
def test_accuracy_vs_eps_on_the_toy():
    """Robust iff correct and |s| > 4 eps: thresholds 0, 0.08, 0.2, 0.4, 1.0."""
    x, y = toy_data()
    curve = accuracy_vs_eps(LinearToy(), x, y, [0.0, 0.02, 0.05, 0.1, 0.25], steps=10)
    assert curve == [7 / 8, 6 / 8, 3 / 8, 1 / 8, 0.0]


def test_gradient_masking_checks_flag_what_they_should():
    order = ["clean", "FGSM", "PGD", "AutoAttack"]
    healthy = {"clean": 0.9, "FGSM": 0.6, "PGD": 0.5, "AutoAttack": 0.45, "Square": 0.55}
    assert stronger_attacks_not_weaker(healthy, order, 0.005).passed
    masked = dict(healthy, PGD=0.7)  # PGD weaker than FGSM: a masking symptom
    check = stronger_attacks_not_weaker(masked, order, 0.005)
    assert not check.passed and "FGSM 0.6000 < PGD 0.7000" in check.detail
    assert black_box_not_better(healthy, "Square", ["FGSM", "PGD", "AutoAttack"], 0.005).passed
    assert not black_box_not_better(dict(healthy, Square=0.3), "Square", ["FGSM", "PGD", "AutoAttack"], 0.005).passed
    assert accuracy_reaches_zero([0, 0.1, 0.3, 0.5], [0.9, 0.5, 0.1, 0.0], max_final=0.05, tolerance=0.01).passed
    assert not accuracy_reaches_zero([0, 0.1, 0.5], [0.9, 0.5, 0.3], max_final=0.05, tolerance=0.01).passed
    assert not accuracy_reaches_zero([0, 0.1, 0.5], [0.9, 0.5, 0.6], max_final=0.7, tolerance=0.01).passed


@pytest.fixture(scope="module")
def two_trained_runs(tmp_path_factory):
    """An LFR run and a plain run, trained for one tiny epoch."""
    from lfr_ext.training import resolve_config, train

    root = tmp_path_factory.mktemp("runs")
    dirs = []
    for method in ("lfr", "plain"):
        cfg = resolve_config(
            dict(
                method=method,
                train_subset=64,
                batch_size=32,
                epochs=1,
                val_size=32,
                val_robust_size=16,
                val_attack_steps=2,
                steps=2,
                milestones=[1],
                lr=0.05,
            )
        )
        train(cfg, str(root / method), device="cpu", progress=False, log=lambda s: None)
        dirs.append(str(root / method))
    return dirs


@needs_fashion_mnist
@needs_torchattacks
def test_evaluate_and_report_end_to_end(two_trained_runs, tmp_path, capsys):
    from lfr_ext.cli.evaluate import main
    from lfr_ext.cli.report import load_run

    report_dir = tmp_path / "report"
    budget = [
        "--checkpoint",
        "last",
        "--n",
        "16",
        "--pgd-steps",
        "3",
        "--pgd-restarts",
        "1",
        "--square-queries",
        "20",
        "--no-autoattack",
        "--curve-n",
        "16",
        "--lf-n",
        "8",
        "--clean-n",
        "64",
        "--landscape-points",
        "2",
        "--device",
        "cpu",
    ]
    code = main([*two_trained_runs, *budget, "--report", str(report_dir)])
    assert code == 0
    first = json.loads(open(os.path.join(two_trained_runs[0], "evaluation.json")).read())
    capsys.readouterr()
    assert (
        main([two_trained_runs[0], *budget, "--resume"]) == 0
    )  # same checkpoint file, eps and budget: kept, not redone
    assert "kept" in capsys.readouterr().out
    assert json.loads(open(os.path.join(two_trained_runs[0], "evaluation.json")).read()) == first
    assert main([two_trained_runs[0], *budget, "--resume", "--n", "12"]) == 0  # another budget: evaluated again
    assert json.loads(open(os.path.join(two_trained_runs[0], "evaluation.json")).read())["n"] == 12
    assert main([two_trained_runs[0], *budget]) == 0
    result = json.loads(open(os.path.join(two_trained_runs[0], "evaluation.json")).read())
    assert result["method"] == "lfr" and result["n"] == 16
    assert result["attack_order"] == ["clean", "FGSM", "PGD-3x1", "Square-20"]
    accuracies = result["accuracy"]
    assert result["worst_case"] <= min(accuracies.values())
    assert {name: sum(mask) / 16 for name, mask in result["correct"].items()} == accuracies
    assert result["local_flatness"]["mean"] > 0
    curve = result["accuracy_vs_eps"]
    assert curve["eps"][0] == 0.0 and curve["eps"][-1] == 0.5 and curve["accuracy"][0] == accuracies["clean"]
    assert len(result["sanity"]) == 3
    land = result["landscape"]
    assert len(land["loss_2d"]) == 2 and len(land["loss_2d"][0]) == len(land["grid"]) == 21
    assert load_run(two_trained_runs[1])["evaluation"]["method"] == "plain"
    markdown = (report_dir / "report.md").read_text()
    assert "| LFR |" in markdown and "| plain |" in markdown and "Gradient-masking checks" in markdown
    assert "[95% Wilson interval] on n=16 test points" in markdown and "McNemar mid-p" in markdown
    assert "Clean accuracy on 64 test images [95% Wilson interval]: LFR 0." in markdown
    for figure in ("training_curves.png", "accuracy_vs_eps.png", "landscape_1d.png", "landscape_2d.png"):
        assert (report_dir / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
        assert f"]({figure})" in markdown


def test_evaluate_reports_a_missing_run_clearly(tmp_path, capsys):
    if not HAVE_TORCHATTACKS:
        pytest.skip(f"torchattacks not installed ({INSTALL_COMMAND})")
    from lfr_ext.cli.evaluate import main

    assert main([str(tmp_path), "--device", "cpu"]) == 2
    assert "best.pt not found" in capsys.readouterr().err


@needs_fashion_mnist
@needs_torchattacks
def test_runs_evaluated_side_by_side_match_one_by_one(two_trained_runs, monkeypatch):
    """``--jobs 2``: one process per run with one thread each; the results are those of the runs
    evaluated one by one with one thread (every attack is seeded)."""
    from lfr_ext.cli.evaluate import main

    budget = [
        "--checkpoint",
        "last",
        "--n",
        "12",
        "--pgd-steps",
        "2",
        "--pgd-restarts",
        "2",
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

    def results():
        return [json.loads(open(os.path.join(run, "evaluation.json")).read()) for run in two_trained_runs]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*two_trained_runs, *budget]) == 0
    finally:
        torch.set_num_threads(threads)
    one_by_one = results()
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # two jobs of one thread each, on any machine
    assert main([*two_trained_runs, *budget, "--jobs", "2"]) == 0
    for a, b in zip(one_by_one, results()):
        assert a["accuracy"] == b["accuracy"] and a["robust"] == b["robust"]
        assert a["local_flatness"] == b["local_flatness"] and a["accuracy_vs_eps"] == b["accuracy_vs_eps"]
