"""The Markdown summary of one part of a ``scripts/gpu_check.sh`` run: its stages, the headline
figures against the goals, and the supporting tables, read from the suites' pytest-benchmark JSON.

    python bench/summarize.py OUT_DIR --prefix PREFIX --part N [--suites step,ascent_step]
                              [--stages STAGES.tsv] [--training PREFIX-train.json]

reads ``OUT_DIR/PREFIX-<suite>.json`` for each suite of the part (a missing one is reported as
missing) and the training summaries ``lfr-train`` wrote, gathered in one JSON ``{method: summary}``;
prints the summary and writes it to ``OUT_DIR/PREFIX-partN-summary.md``. Every figure is a ratio
or a time measured in this run, on the machine named at the top; nothing is filled in by hand.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
from dataclasses import dataclass

SUITES = (
    "ascent_step",
    "step",
    "tangent",
    "penalty",
    "precision",
    "scale_out",
    "step_beyond_relu",
    "gradient_penalties",
)
# lfr_ext's step of each gradient penalty over its official double-backprop step
# (bench/bench_gradient_penalties.py): the goal on a GPU; on a CPU, not slower (1.0).
GRADIENT_PENALTY_GOAL = {"cuda": 0.5, "cpu": 1.0}
METHODS = ("lfr", "pgd_at", "trades", "plain")
# Median ms of one training step at batch 128, measured on an H200 with torch 2.11 before
# 2026-11-26 (lfr_ext_captured: an earlier implementation of the linearized pass, outside this
# repository; no raw data in bench/results/): reference points to read this run against.
ANCHORS_H200 = {
    ("smallcnn_mnist_k40", "pgd_at"): 64.3,
    ("smallcnn_mnist_k40", "pgd_at_captured"): 16.5,
    ("smallcnn_mnist_k40", "authors_lfr"): 141.6,
    ("smallcnn_mnist_k40", "lfr_ext_captured"): 33.3,
    ("resnet18_cifar_k10", "pgd_at"): 52.1,
    ("resnet18_cifar_k10", "pgd_at_captured"): 44.9,
    ("resnet18_cifar_k10", "authors_lfr"): 261.8,
    ("resnet18_cifar_k10", "lfr_ext_captured"): 108.9,
}


@dataclass
class Goal:
    figure: str
    goal: str
    value: float | None
    shown: str
    met: bool | None


def _load(out_dir: str, prefix: str, names: tuple[str, ...] = SUITES) -> dict[str, dict | None]:
    """Every suite of SUITES, None for those not in ``names`` or missing."""
    suites = dict.fromkeys(SUITES)
    for suite in names:
        path = os.path.join(out_dir, f"{prefix}-{suite}.json")
        try:
            with open(path) as f:
                suites[suite] = json.load(f)
        except (OSError, ValueError):
            suites[suite] = None
    return suites


def _rows(data: dict | None) -> list[dict]:
    return [] if data is None else data.get("benchmarks", [])


def _median(row: dict) -> float:
    return row["stats"]["median"]


def _find(rows, **match) -> dict | None:
    for row in rows:
        info = {**row.get("params", {}), **row.get("extra_info", {})}
        if all(info.get(k) == v for k, v in match.items()):
            return row
    return None


def _machine(suites: dict) -> str:
    for data in suites.values():
        if data:
            env = data["machine_info"].get("lfr_ext_environment", {})
            cpu = data["machine_info"].get("cpu", {}).get("brand_raw", "CPU")
            device = env.get("gpu") or f"{cpu} (no GPU)"
            return (
                f"{device}; torch {env.get('torch')}, CUDA {env.get('cuda')}, triton {env.get('triton')}, "
                f"lfr_ext {env.get('lfr_ext')} at {env.get('git_sha')}"
            )
    return "unknown (no benchmark results)"


def _ratio(a: dict | None, b: dict | None) -> float | None:
    return None if a is None or b is None else _median(a) / _median(b)


def _fmt(value: float | None, unit: str = "x", digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}{unit}"


def _goal(
    figure: str,
    goal: str,
    value: float | None,
    *,
    at_most: float | None = None,
    at_least: float | None = None,
    unit: str = "x",
    digits: int = 2,
) -> Goal:
    met = None
    if value is not None:
        met = value <= at_most if at_most is not None else value >= at_least
    return Goal(figure, goal, value, _fmt(value, unit, digits), met)


def headline(suites: dict) -> list[Goal]:
    """The goals of the GPU check, each computed from this run's results."""
    step, ops = _rows(suites["step"]), _rows(suites["ascent_step"])
    goals = []
    for setup, label in (("smallcnn_mnist_k40", "SmallCNN K=40"), ("resnet18_cifar_k10", "ResNet-18 K=10")):
        lfr = _find(step, setup=setup, provider="lfr_ext_captured")
        pgd = _find(step, setup=setup, provider="pgd_at_captured")
        goals.append(
            _goal(f"captured LFR step / captured PGD-AT step, {label}", "<= 2.2x", _ratio(lfr, pgd), at_most=2.2)
        )
    for setup, label, target in (("smallcnn_mnist_k40", "SmallCNN", 4.0), ("resnet18_cifar_k10", "ResNet-18", 2.5)):
        authors = _find(step, setup=setup, provider="authors_lfr")
        lfr = _find(step, setup=setup, provider="lfr_ext_captured")
        goals.append(
            _goal(
                f"authors' eager LFR step / lfr_ext captured, {label}",
                f">= {target:g}x faster",
                _ratio(authors, lfr),
                at_least=target,
            )
        )
    for setup, label in (("smallcnn_mnist_k40", "SmallCNN"), ("resnet18_cifar_k10", "ResNet-18")):
        lfr = _find(step, setup=setup, provider="lfr_ext_captured")
        pgd = _find(step, setup=setup, provider="pgd_at_captured")
        value = None
        if lfr and pgd and lfr["extra_info"].get("peak_memory_mb") and pgd["extra_info"].get("peak_memory_mb"):
            value = lfr["extra_info"]["peak_memory_mb"] / pgd["extra_info"]["peak_memory_mb"]
        goals.append(_goal(f"peak memory, captured LFR step / PGD-AT's, {label}", "<= 1.5x", value, at_most=1.5))
    fractions = [
        r["extra_info"]["fraction_of_copy_bandwidth"]
        for r in ops
        if r["params"].get("shape_name") == "imagenet"
        and r["params"].get("dtype_name") == "fp32"
        and r["params"].get("provider") in ("cuda", "triton")
    ]
    goals.append(
        _goal(
            "fused ascent_step (256,3,224,224) fp32, best of cuda/triton, of copy bandwidth",
            ">= 90%",
            100 * max(fractions) if fractions else None,
            at_least=90,
            unit="%",
            digits=1,
        )
    )
    host = [
        r["extra_info"]["host_inclusive_us"]
        for r in ops
        if r["params"].get("shape_name") == "mnist"
        and r["params"].get("dtype_name") == "fp32"
        and r["params"].get("provider") in ("cuda", "triton")
    ]
    goals.append(
        _goal(
            "fused ascent_step (128,1,28,28) fp32, best of cuda/triton, host-inclusive per call",
            "<= 10 us",
            min(host) if host else None,
            at_most=10,
            unit=" us",
            digits=1,
        )
    )
    return goals


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def step_table(suites: dict, suite: str = "step") -> list[str]:
    rows, step = [], _rows(suites[suite])
    for row in step:
        info = row["extra_info"]
        pgd = _find(
            step,
            setup=info["setup"],
            batch=info["batch"],
            steps=info["steps"],
            provider="pgd_at_captured" if info["provider"].endswith("_captured") else "pgd_at",
        )
        rows.append(
            [
                info["setup"],
                f"b{info['batch']} K={info['steps']}",
                info["provider"],
                _fmt(_median(row) * 1e3, " ms"),
                _fmt(_ratio(row, pgd)),
                _fmt(info.get("peak_memory_mb"), " MB", 0),
                _fmt(info.get("graph_pool_mb"), " MB", 0),
            ]
        )
    return _table(
        ["setup", "batch", "provider", "median", "vs PGD-AT (same capture mode)", "peak memory", "graph pool"], rows
    )


def anchors_table(suites: dict) -> list[str]:
    rows = []
    for (setup, provider), anchor in ANCHORS_H200.items():
        row = _find(_rows(suites["step"]), setup=setup, provider=provider)
        rows.append([setup, provider, f"{anchor:.1f} ms", _fmt(None if row is None else _median(row) * 1e3, " ms", 1)])
    return _table(
        ["setup", "provider", "anchor (H200, torch 2.11; lfr_ext_captured: an earlier implementation)", "this run"],
        rows,
    )


def ascent_step_table(suites: dict) -> list[str]:
    rows = []
    for row in _rows(suites["ascent_step"]):
        info = row["extra_info"]
        rows.append(
            [
                f"{tuple(info['shape'])} {info['dtype']}",
                info["provider"],
                _fmt(info["device_us"], " us", 1),
                _fmt(info["host_inclusive_us"], " us", 1),
                _fmt(100 * info["fraction_of_copy_bandwidth"], "%", 1),
            ]
        )
    return _table(["shape", "provider", "device time", "host-inclusive per call", "of copy bandwidth"], rows)


def tangent_table(suites: dict) -> list[str]:
    rows, tangent = [], _rows(suites["tangent"])
    for row in tangent:
        info = row["extra_info"]
        ops = "" if info.get("ops_recorded") is None else f" ({info['ops_recorded']} ops recorded)"
        gradient = _find(tangent, setup=info["setup"], batch=info["batch"], provider="gradient")
        rows.append(
            [
                f"{info['setup']} b{info['batch']}",
                info["provider"] + ops,
                _fmt(_median(row) * 1e3, " ms"),
                _fmt(_ratio(row, gradient), ""),
            ]
        )
    return _table(["setup", "provider", "median", "in gradients"], rows)


def penalty_table(suites: dict) -> list[str]:
    rows = []
    pgd = _find(_rows(suites["penalty"]), provider="pgd")
    for row in _rows(suites["penalty"]):
        rows.append([row["extra_info"]["provider"], _fmt(_median(row) * 1e3, " ms"), _fmt(_ratio(row, pgd))])
    return _table(["provider", "median per call", "vs PGD (same K)"], rows)


def precision_table(suites: dict) -> list[str]:
    rows = []
    for row in _rows(suites["precision"]):
        info = row["extra_info"]
        rows.append(
            [
                f"{info['setup']} b{info['batch']}",
                info["setting"],
                _fmt(_median(row) * 1e3, " ms"),
                _fmt(100 * info["sign_agreement_linearized"], "%", 2),
                _fmt(100 * info["sign_agreement_double_backprop"], "%", 2),
            ]
        )
    return _table(
        [
            "setup",
            "setting",
            "linearized inner step",
            "sign(h) agreement, linearized",
            "sign(h) agreement, double backprop",
        ],
        rows,
    )


def scale_out_table(suites: dict) -> list[str]:
    rows, scale_out = [], _rows(suites["scale_out"])
    for row in scale_out:
        info = row["extra_info"]
        if "world_size" in info:
            label = f"DDP, {info['world_size']} rank(s), global batch {info['global_batch']}"
            median = info["step_median_s"]
            one = _find(scale_out, world_size=1, global_batch=info["global_batch"], steps=info["steps"])
            note = ""
            if one is not None and info["world_size"] > 1:  # strong scaling: T1 / (n Tn)
                note = f"efficiency {100 * one['extra_info']['step_median_s'] / (info['world_size'] * median):.0f}%"
        else:
            label, median, note = f"LFR step, {info['variant']}", _median(row), ""
        rows.append([label, _fmt(median * 1e3, " ms"), _fmt(info.get("images_per_s"), " img/s", 0), note])
    return _table(["what", "median step", "throughput", ""], rows)


def gradient_penalties_table(suites: dict) -> list[str]:
    """Per setup and method: each provider's median step, lfr_ext's (``hvp="auto"``) and the
    tangent pass's in gradients (over the plain step's) and over the official code's, against
    :data:`GRADIENT_PENALTY_GOAL`."""
    rows, found = [], _rows(suites["gradient_penalties"])
    gpu = bool(found) and bool(found[0]["extra_info"].get("gpu"))
    goal = GRADIENT_PENALTY_GOAL["cuda" if gpu else "cpu"]
    providers = ("lfr_ext", "linearized", "double_backprop", "official")
    seen = []
    for row in found:
        info = row["extra_info"]
        key = (info["setup"], info["batch"], info["method"])
        if info["method"] == "plain" or key in seen:
            continue
        seen.append(key)
        plain = _find(found, setup=info["setup"], batch=info["batch"], method="plain")
        steps = {p: _find(found, setup=info["setup"], batch=info["batch"], method=info["method"], provider=p)
                 for p in providers}  # fmt: skip
        ratio = _ratio(steps["lfr_ext"], steps["official"])
        rows.append(
            [
                f"{info['setup']} b{info['batch']}",
                info["method"],
                *(_fmt(None if steps[p] is None else _median(steps[p]) * 1e3, " ms", 1) for p in providers),
                *(_fmt(_ratio(steps[p], plain), "", 2) for p in ("linearized", "official")),
                _fmt(_ratio(steps["linearized"], steps["official"])),
                _fmt(ratio),
                {True: "yes", False: "**no**", None: "n/a"}[None if ratio is None else ratio <= goal],
            ]
        )
    header = ["setup", "method", *providers, "linearized in gradients", "official in gradients"]
    header += ["linearized / official", "lfr_ext / official", f"<= {goal:g}x"]
    return _table(header, rows)


def training_table(path: str) -> list[str]:
    """The training comparison from ``{method: lfr-train's summary.json}`` at ``path``."""
    try:
        with open(path) as f:
            summaries = json.load(f)
    except (OSError, ValueError):
        summaries = {}
    rows = []
    for method in METHODS:
        summary = summaries.get(method)
        if summary is None:
            rows.append([method, "not run (or not finished)", "", "", "", ""])
            continue
        final = summary["final"]
        robust = final.get("val_robust_acc")
        rows.append(
            [
                method,
                summary.get("steps_ran", "?"),
                str(summary["epochs"]),
                _fmt(summary["mean_epoch_seconds"], " s"),
                _fmt(final["val_clean_acc"], "", 3),
                _fmt(robust, "", 3),
            ]
        )
    return _table(["method", "steps", "epochs", "s/epoch", "val clean", "val PGD"], rows)


def stages_table(path: str | None) -> list[str]:
    if not path or not os.path.exists(path):
        return ["(no stage log)"]
    rows = []
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 3:
                rows.append(parts[:3] + [parts[3] if len(parts) > 3 else ""])
    return _table(["stage", "result", "seconds", "note"], rows)


# The tables of each suite, in the order they are shown: (suite, title, table).
TABLES = (
    ("step", "Training steps (`bench/bench_step.py`)", step_table),
    ("step", "Against the anchors", anchors_table),
    ("ascent_step", "Fused ascent step (`bench/bench_ascent_step.py`)", ascent_step_table),
    ("tangent", "Inner step in gradients (`bench/bench_tangent.py`)", tangent_table),
    ("penalty", "Penalty call (`bench/bench_penalty.py`)", penalty_table),
    ("precision", "Low precision (`bench/bench_precision.py`)", precision_table),
    ("scale_out", "Scale out (`bench/bench_scale_out.py`)", scale_out_table),
    (
        "step_beyond_relu",
        "Training steps beyond ReLU: SiLU, ConvNeXt, ViT, and ResNet-20 for scale (`bench/bench_step.py`)",
        functools.partial(step_table, suite="step_beyond_relu"),
    ),
    (
        "gradient_penalties",
        "Gradient penalties' training steps, lfr_ext vs double backprop (`bench/bench_gradient_penalties.py`)",
        gradient_penalties_table,
    ),
)
HEADLINE_SUITES = ("step", "ascent_step")  # what headline() reads


def render(
    out_dir: str,
    prefix: str,
    stages: str | None,
    *,
    part: int | None = None,
    names: tuple[str, ...] = SUITES,
    training: str | None = None,
) -> str:
    """The summary of the suites ``names`` (and the training comparison at ``training``)."""
    suites = _load(out_dir, prefix, names)
    title = prefix if part is None else f"part {part}, {prefix}"
    lines = [f"# lfr_ext GPU check: {title}", "", f"Machine: {_machine(suites)}", ""]
    if any(data and data["machine_info"].get("lfr_ext_environment", {}).get("tiny") for data in suites.values()):
        lines += ["**Tiny sizes (LFR_BENCH_TINY=1): a check that every stage runs; the figures measure nothing.**", ""]
    lines += ["## Stages", ""]
    lines += stages_table(stages)
    if any(suite in names for suite in HEADLINE_SUITES):
        goals = headline(suites)
        lines += ["", "## Headline figures", ""]
        lines += _table(
            ["figure", "goal", "measured", "met"],
            [[g.figure, g.goal, g.shown, {True: "yes", False: "**no**", None: "n/a"}[g.met]] for g in goals],
        )
    missing = [suite for suite in names if suites[suite] is None]
    if missing:
        lines += ["", f"Missing suites (failed, timed out or skipped): {', '.join(missing)}."]
    for suite, heading, table in TABLES:
        if suite in names:
            lines += ["", f"## {heading}", ""] + table(suites)
    if training is not None:
        lines += ["", "## Training comparison (`lfr-train`)", ""] + training_table(training)
    return "\n".join(lines) + "\n"


def summary_name(prefix: str, part: int) -> str:
    return f"{prefix}-part{part}-summary.md"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--prefix", required=True, help="file prefix of this run's results (<gpu>-<date>)")
    parser.add_argument("--part", type=int, required=True, help="the part of the check (1 or 2)")
    parser.add_argument("--suites", default=",".join(SUITES), help="comma-separated suites of this part")
    parser.add_argument("--stages", default=None, help="the stage table written by scripts/gpu_check.sh")
    parser.add_argument("--training", default=None, help="the training summaries, {method: summary} (JSON)")
    args = parser.parse_args(argv)
    names = tuple(name for name in args.suites.split(",") if name)
    unknown = [name for name in names if name not in SUITES]
    if unknown:
        parser.error(f"unknown suites {unknown}; known: {', '.join(SUITES)}")
    text = render(args.out_dir, args.prefix, args.stages, part=args.part, names=names, training=args.training)
    with open(os.path.join(args.out_dir, summary_name(args.prefix, args.part)), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
