"""The reference AutoAttack (pyautoattack) against torchattacks' rebuild of its standard version,
on the same model, points and seed: which one lfr_ext's evaluation uses is decided by this.

    python bench/autoattack_agreement.py RUN_DIR [--n 100] [--out bench/results/<machine>-<date>-autoattack.json]

RUN_DIR is an lfr-train run folder (its best checkpoint is attacked at its training eps). The
JSON records each implementation's robust accuracy, seconds and per-sample result, and how many
points each breaks that the other does not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from lfr_ext.data import load_dataset
from lfr_ext.evaluation import AttackSuite, load_trained_model, run_attacks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model, cfg, _ = load_trained_model(args.run_dir, "best")
    x, y = load_dataset(cfg.data, "test")
    x, y = x[: args.n], y[: args.n]
    results = {}
    for impl in ("reference", "torchattacks"):
        suite = AttackSuite(
            eps=cfg.eps, pgd_steps=1, pgd_restarts=1, square_queries=0, autoattack=True, autoattack_impl=impl, seed=0
        )
        started = time.perf_counter()
        attacked = run_attacks(model, x, y, suite, batch_size=500)
        robust = attacked.correct["AutoAttack"]
        results[impl] = {
            "robust_accuracy": robust.float().mean().item(),
            "seconds": time.perf_counter() - started,
            "autoattack_seconds": attacked.seconds["AutoAttack"],
            "robust": robust.tolist(),
            "warnings": attacked.autoattack.get("warnings", []),
        }
        print(impl, results[impl]["robust_accuracy"], f"{results[impl]['autoattack_seconds']:.0f} s", flush=True)
    ref, ta = (torch.tensor(results[k]["robust"]) for k in ("reference", "torchattacks"))
    record = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
        "torch": torch.__version__,
        "run": os.path.basename(os.path.normpath(args.run_dir)),
        "method": cfg.method,
        "eps": cfg.eps,
        "n": len(x),
        "clean_accuracy": attacked.accuracy("clean"),
        "results": results,
        "broken_only_by_reference": int((ta & ~ref).sum()),
        "broken_only_by_torchattacks": int((ref & ~ta).sum()),
    }
    out = args.out or "autoattack_agreement.json"
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    print(
        f"-> {out}: only reference breaks {record['broken_only_by_reference']}, "
        f"only torchattacks breaks {record['broken_only_by_torchattacks']}"
    )


if __name__ == "__main__":
    main()
