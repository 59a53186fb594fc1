"""The results table of lfr-eval / lfr-report: every accuracy with its 95% interval, and the line
naming the differences between methods that n test points cannot resolve. Built from evaluations
made by hand (dicts shaped as evaluation.json)."""

from lfr_ext.cli.report import METHOD_LABELS, fmt_accuracy, method_label, results_table
from lfr_ext.evaluation.paired import accuracy_columns, unresolved_pairs

N = 100
ATTACKS = ["clean", "FGSM", "PGD-20x2", "AutoAttack"]


def evaluation(method: str, correct_counts: dict[str, int], *, per_sample: bool = True) -> dict:
    """An evaluation of ``method`` on N points where each attack leaves the first k correct (so
    one model's correct points contain another's with a smaller k: a paired, nested design)."""
    masks = {name: [i < correct_counts[name] for i in range(N)] for name in ATTACKS}
    robust = [all(masks[name][i] for name in ATTACKS) for i in range(N)]
    result = {
        "method": method,
        "data": "fashion-mnist",
        "eps": 0.1,
        "n": N,
        "attack_order": ATTACKS,
        "accuracy": {name: sum(mask) / N for name, mask in masks.items()},
        "worst_case": sum(robust) / N,
        "robust": robust,
        "local_flatness": {"mean": 0.5, "n": N},
        "flags": [],
    }
    if per_sample:
        result["correct"] = masks
    return result


def test_fmt_accuracy_gives_the_wilson_interval():
    assert fmt_accuracy(39, 100) == "0.390 [0.300, 0.488]"
    assert fmt_accuracy(0, 100) == "0.000 [0.000, 0.037]"
    assert fmt_accuracy(9012, 10000, digits=4) == "0.9012 [0.8952, 0.9069]"


def test_every_accuracy_in_the_table_carries_its_interval():
    lfr = evaluation("lfr", {"clean": 90, "FGSM": 60, "PGD-20x2": 45, "AutoAttack": 39})
    table = results_table([lfr], [None])
    row = next(line for line in table.splitlines() if line.startswith("| LFR |"))
    assert row.split(" | ")[1:6] == [
        "0.900 [0.826, 0.945]",
        "0.600 [0.502, 0.691]",
        "0.450 [0.356, 0.548]",
        "0.390 [0.300, 0.488]",
        "0.390 [0.300, 0.488]",  # the worst case: the first 39 points survive every attack
    ]
    assert "| worst case |" in table.splitlines()[0]
    assert "[95% Wilson interval] on n=100 test points" in table
    assert "Not resolved" not in table  # one method: nothing to compare


def test_not_resolved_lists_close_pairs_and_leaves_out_distant_ones():
    """At n=100, 39 vs 41 correct (2 discordant points, McNemar mid-p 0.25) is not resolved; 39
    vs 80 is; 50 vs 60 with B right on every point A is (mid-p 2^-10) although the two
    intervals overlap: the test is paired."""
    lfr = evaluation("lfr", {"clean": 90, "FGSM": 60, "PGD-20x2": 50, "AutoAttack": 39})
    trades = evaluation("trades", {"clean": 91, "FGSM": 70, "PGD-20x2": 60, "AutoAttack": 41})
    plain = evaluation("plain", {"clean": 99, "FGSM": 95, "PGD-20x2": 90, "AutoAttack": 80})
    table = results_table([lfr, trades, plain], [None] * 3)
    line = next(line for line in table.splitlines() if line.startswith("Not resolved"))
    assert line == (
        "Not resolved at n=100 (95%, McNemar mid-p test on the same test points): "
        "LFR vs TRADES (clean, AutoAttack, worst case)."
    )
    assert "plain" not in line  # 39 or 41 vs 80: resolved
    pairs, unpaired = unresolved_pairs([lfr, trades, plain], ["LFR", "TRADES", "plain"])
    assert pairs == [("LFR", "TRADES", ["clean", "AutoAttack", "worst case"])] and unpaired == []


def test_without_per_sample_results_overlapping_intervals_count_and_the_line_says_so():
    """Evaluations saved before per-attack correctness was (only ``robust``, the worst case's):
    the attacks' columns fall back to interval overlap, so 50 vs 60 and 60 vs 70 are listed."""
    lfr = evaluation("lfr", {"clean": 90, "FGSM": 60, "PGD-20x2": 50, "AutoAttack": 39}, per_sample=False)
    trades = evaluation("trades", {"clean": 91, "FGSM": 70, "PGD-20x2": 60, "AutoAttack": 41}, per_sample=False)
    assert accuracy_columns(lfr)["AutoAttack"].k == 39 and accuracy_columns(lfr)["AutoAttack"].per_sample is None
    line = results_table([lfr, trades], [None, None]).splitlines()[-1]
    assert "overlapping intervals for clean, FGSM, PGD-20x2, AutoAttack" in line
    assert line.endswith("LFR vs TRADES (clean, FGSM, PGD-20x2, AutoAttack, worst case).")


def test_a_line_when_every_difference_is_resolved():
    lfr = evaluation("lfr", {"clean": 50, "FGSM": 40, "PGD-20x2": 30, "AutoAttack": 20})
    plain = evaluation("plain", {"clean": 99, "FGSM": 95, "PGD-20x2": 90, "AutoAttack": 80})
    assert "Every difference between methods is resolved at n=100" in results_table([lfr, plain], [None, None])


def test_method_labels_cover_the_new_methods_and_fall_back_to_the_name():
    for method, label in {"gradnorm": "GradNorm", "igr": "IGR", "cure": "CURE", "gradalign": "GradAlign"}.items():
        assert METHOD_LABELS[method] == label
    assert method_label("llr") == "LLR" and method_label("no_such_method") == "no_such_method"
    unknown = evaluation("no_such_method", {"clean": 90, "FGSM": 60, "PGD-20x2": 50, "AutoAttack": 39})
    assert "| no_such_method |" in results_table([unknown], [None])
