"""``python -m lfr_ext.report RUN... --out DIR``: the Markdown + PNG report of trained and
evaluated runs (training curves, results table, gradient-masking checks, accuracy vs eps,
1-D / 2-D loss-landscape slices of an LFR model next to a plain one).

Reads only files written by lfr-train (config.json, metrics.json, summary.json) and lfr-eval
(evaluation.json), so it can be re-rendered at any time without recomputing anything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..evaluation.intervals import wilson_interval
from ..evaluation.paired import WORST_CASE, accuracy_columns, unresolved_pairs

# Display names; a method without one is shown by its name (:func:`method_label`).
METHOD_LABELS = {
    "lfr": "LFR",
    "pgd_at": "PGD-AT",
    "trades": "TRADES",
    "plain": "plain",
    "gradnorm": "GradNorm",
    "igr": "IGR",
    "cure": "CURE",
    "gradalign": "GradAlign",
    "llr": "LLR",
}


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def load_run(run_dir: str) -> dict:
    """The files of one run folder that exist: config, metrics, summary, evaluation."""
    run = {"dir": run_dir}
    for key, name in (
        ("config", "config.json"),
        ("metrics", "metrics.json"),
        ("summary", "summary.json"),
        ("evaluation", "evaluation.json"),
    ):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            run[key] = _read_json(path)
    if "config" not in run:
        raise FileNotFoundError(f"{run_dir} has no config.json: not an lfr-train run folder")
    return run


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_accuracy(k: int, n: int, digits: int = 3) -> str:
    """``k / n`` with its 95% Wilson interval: ``0.390 [0.300, 0.488]`` for 39 of 100."""
    low, high = wilson_interval(k, n)
    return f"{k / n:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def results_table(results: list[dict], summaries: list[dict | None] | None = None) -> str:
    """Markdown table, one row per evaluated run: accuracy per attack and of the per-sample
    worst case, each with its 95% interval, mean local flatness, seconds per training epoch and
    gradient-masking flags; under it, which differences between the runs the number of test
    points cannot resolve (:func:`resolution_note`)."""
    summaries = summaries or [_summary_of(r["run_dir"]) if "run_dir" in r else None for r in results]
    attacks = []
    for result in results:
        attacks += [a for a in result["attack_order"] if a not in attacks]
    header = ["method", *attacks, WORST_CASE, "mean LF", "s/epoch", "masking flags"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result, summary in zip(results, summaries):
        seconds = summary.get("mean_epoch_seconds") if summary else None
        columns = accuracy_columns(result)
        cells = [
            _result_label(result),
            *(fmt_accuracy(c.k, c.n) if (c := columns.get(a)) else "-" for a in [*attacks, WORST_CASE]),
            _fmt(result["local_flatness"]["mean"], 2),
            _fmt(seconds, 1),
            str(len(result["flags"])) if result["flags"] else "none",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", resolution_note(results)])


def resolution_note(results: list[dict]) -> str:
    """What the table's intervals are, and the pairs of runs whose accuracies differ by less
    than the test points resolve at 95% (McNemar 1947 on the same points; overlapping Wilson
    intervals where per-sample results were not saved), with the columns where they do."""
    sizes = "/".join(str(n) for n in sorted({accuracy_columns(r)[WORST_CASE].n for r in results}))
    note = f"Accuracies: fraction correct [95% Wilson interval] on n={sizes} test points."
    if len(results) < 2:
        return note
    pairs, unpaired = unresolved_pairs(results, [_result_label(r) for r in results])
    how = "McNemar mid-p test on the same test points"
    if unpaired:
        how += f"; overlapping intervals for {', '.join(unpaired)}, where no paired per-sample results were saved"
    if not pairs:
        return f"{note}\nEvery difference between methods is resolved at n={sizes} (95%, {how})."
    listed = "; ".join(f"{a} vs {b} ({', '.join(columns)})" for a, b, columns in pairs)
    return f"{note}\nNot resolved at n={sizes} (95%, {how}): {listed}."


def _result_label(result: dict) -> str:
    """A run's method label, or the file name of foreign weights."""
    return method_label(result.get("method") or os.path.basename(result.get("weights", "?")))


def _summary_of(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, "summary.json")
    return _read_json(path) if os.path.exists(path) else None


def _label(run: dict) -> str:
    return method_label(run["config"]["method"])


def plot_training_curves(runs: list[dict], path: str) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for run in runs:
        rows = run.get("metrics", [])
        epochs = [r["epoch"] for r in rows]
        axes[0].plot(epochs, [r["train_loss"] for r in rows], marker="o", label=_label(run))
        axes[1].plot(epochs, [r["val_clean_acc"] for r in rows], marker="o", label=_label(run))
        robust = [r["val_robust_acc"] for r in rows]
        if any(v is not None for v in robust):
            axes[2].plot(epochs, [float("nan") if v is None else v for v in robust], marker="o", label=_label(run))
    cfg = runs[0]["config"]
    titles = [
        "training loss",
        "validation clean accuracy",
        f"validation accuracy, PGD-{cfg['val_attack_steps']} eps {cfg['eps']:g}",
    ]
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_vs_eps(runs: list[dict], path: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for run in runs:
        curve = run["evaluation"]["accuracy_vs_eps"]
        # Error bars: each point's 95% Wilson interval over the curve's n test images.
        intervals = [wilson_interval(round(a * curve["n"]), curve["n"]) for a in curve["accuracy"]]
        # (max: matplotlib refuses a negative error, which rounding could make at 0 or 1)
        errors = [[max(0.0, a - low) for a, (low, _) in zip(curve["accuracy"], intervals)]]
        errors += [[max(0.0, high - a) for a, (_, high) in zip(curve["accuracy"], intervals)]]
        ax.errorbar(curve["eps"], curve["accuracy"], yerr=errors, marker="o", capsize=3, label=_label(run))
    train_eps = runs[0]["evaluation"]["eps"]
    ax.axvline(train_eps, color="gray", linestyle=":", label=f"training eps {train_eps:g}")
    curve = runs[0]["evaluation"]["accuracy_vs_eps"]
    ax.set(
        xlabel="L-inf eps",
        ylabel="accuracy",
        ylim=(0, 1),
        title=f"accuracy vs eps ({curve['attack']}, {curve['n']} test images, 95% intervals)",
    )
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _landscape_pair(runs: list[dict]) -> list[dict]:
    """The LFR run and the plain run when both exist (the paper's comparison), else all runs."""
    by_method = {run["config"]["method"]: run for run in runs}
    if "lfr" in by_method and "plain" in by_method:
        return [by_method["lfr"], by_method["plain"]]
    return runs


def plot_landscape_1d(runs: list[dict], path: str) -> None:
    """Mean per-sample loss along each model's own gradient-sign direction and a random sign
    direction, averaged over the evaluated test points."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for run in runs:
        land = run["evaluation"]["landscape"]
        axes[0].plot(land["t"], np.mean(land["loss_adv"], axis=0), label=_label(run))
        axes[1].plot(land["t"], np.mean(land["loss_rand"], axis=0), label=_label(run))
    n_points = len(runs[0]["evaluation"]["landscape"]["loss_adv"])
    for ax, name in zip(axes, ["gradient-sign direction", "random sign direction"]):
        ax.set(xlabel="step t (L-inf distance)", title=f"loss along the {name} (mean of {n_points} test points)")
        ax.title.set_fontsize(10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cross-entropy")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_landscape_2d(runs: list[dict], path: str, point: int = 0) -> None:
    """Loss surface over (gradient-sign, random-sign) around one test point, one panel per
    model on a shared vertical scale."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig = plt.figure(figsize=(5 * len(runs), 4.2))
    surfaces = [np.asarray(run["evaluation"]["landscape"]["loss_2d"][point]) for run in runs]
    top = max(float(s.max()) for s in surfaces)
    for i, (run, surface) in enumerate(zip(runs, surfaces)):
        grid = np.asarray(run["evaluation"]["landscape"]["grid"])
        a, b = np.meshgrid(grid, grid, indexing="ij")
        ax = fig.add_subplot(1, len(runs), i + 1, projection="3d")
        ax.plot_surface(a, b, surface, cmap="viridis", vmin=0, vmax=top, linewidth=0, antialiased=True)
        ax.set(xlabel="gradient sign", ylabel="random sign", zlabel="loss", zlim=(0, top))
        ax.set_title(f"{_label(run)}: loss around test point {point}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run_dirs: list[str], out_dir: str) -> str:
    """Render report.md and its PNG figures into ``out_dir``; returns the Markdown path."""
    import matplotlib

    matplotlib.use("Agg")
    runs = [load_run(d) for d in run_dirs]
    evaluated = [r for r in runs if "evaluation" in r]
    os.makedirs(out_dir, exist_ok=True)
    figures = []
    plot_training_curves(runs, os.path.join(out_dir, "training_curves.png"))
    figures.append(("Training curves", "training_curves.png"))
    if evaluated:
        plot_accuracy_vs_eps(evaluated, os.path.join(out_dir, "accuracy_vs_eps.png"))
        pair = _landscape_pair(evaluated)
        plot_landscape_1d(pair, os.path.join(out_dir, "landscape_1d.png"))
        plot_landscape_2d(pair, os.path.join(out_dir, "landscape_2d.png"))
        figures += [
            ("Accuracy vs eps", "accuracy_vs_eps.png"),
            ("Loss landscape, 1-D slices", "landscape_1d.png"),
            ("Loss landscape, 2-D slices", "landscape_2d.png"),
        ]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write(render_markdown(runs, evaluated, figures))
    return path


def _clean_full(evaluation: dict) -> str:
    """The whole-test-set clean accuracy with its interval (4 digits: n is up to the test set)."""
    n = evaluation["clean_n"]
    return fmt_accuracy(round(evaluation["clean_full_test"] * n), n, digits=4)


def render_markdown(runs: list[dict], evaluated: list[dict], figures: list[tuple[str, str]]) -> str:
    cfg = runs[0]["config"]
    lines = [
        f"# LFR robustness report: {cfg['data']}, {cfg['model']}",
        "",
        "## Training",
        "",
        "| method | budget | epochs | train images | eps | inner steps | lam / beta | lr | best epoch | s/epoch "
        "| collapse |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        c, s = run["config"], run.get("summary") or {}
        weight = {"lfr": f"lam {c['lam']:g}", "trades": f"beta {c['trades_beta']:g}"}.get(c["method"], "-")
        collapsed = ", ".join(f"epoch {e}" for e in s.get("collapsed_epochs", [])) or "none"
        lines.append(
            f"| {_label(run)} | {c['budget']} | {len(run.get('metrics', []))}/{c['epochs']} | "
            f"{c['train_subset'] or 'all'} | {c['eps']:g} | {c['steps']} x {c['step_size']:g} | {weight} | "
            f"{c['lr']:g} | {s.get('best_epoch') or '-'} | {_fmt(s.get('mean_epoch_seconds'), 1)} | {collapsed} |"
        )
    if evaluated:
        e0 = evaluated[0]["evaluation"]
        ecfg = e0["eval_config"]
        lines += [
            "",
            "## Robust accuracy",
            "",
            f"First {e0['n']} test images, L-inf eps {e0['eps']:g}, checkpoints: "
            + ", ".join(
                f"{_label(r)} {r['evaluation']['checkpoint']['checkpoint']} (epoch "
                f"{r['evaluation']['checkpoint']['epoch']})"
                for r in evaluated
            )
            + ". Attacks from torchattacks (PGD step 2.5 eps / steps, random start, "
            f"{ecfg['pgd_restarts']} restarts; AutoAttack standard). *Worst case*: correct under every attack. "
            f"*Mean LF*: the paper's local flatness, mean over {evaluated[0]['evaluation']['local_flatness']['n']} "
            f"test images ({ecfg['lf_steps']} ascent steps). Device: {e0['device']}, torch {e0['torch']}.",
            "",
            results_table([r["evaluation"] for r in evaluated], [r.get("summary") for r in evaluated]),
            "",
            f"Clean accuracy on {e0['clean_n']} test images [95% Wilson interval]: "
            + ", ".join(f"{_label(r)} {_clean_full(r['evaluation'])}" for r in evaluated)
            + ".",
            "",
            "## Gradient-masking checks",
            "",
            "| method | check | result | detail |",
            "|---|---|---|---|",
        ]
        for run in evaluated:
            for check in run["evaluation"]["sanity"]:
                lines.append(
                    f"| {_label(run)} | {check['name']} | {'pass' if check['passed'] else '**FLAG**'} | "
                    f"{check['detail']} |"
                )
    lines += ["", "## Figures", ""]
    for title, name in figures:
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lfr-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (trained by lfr-train, evaluated by lfr-eval)")
    parser.add_argument("--out", required=True, help="folder for report.md and the figures")
    args = parser.parse_args(argv)
    try:
        print(write_report(args.runs, args.out))
    except FileNotFoundError as exc:
        print(f"lfr-report: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
