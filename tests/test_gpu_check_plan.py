"""scripts/gpu_check.sh's plan: each part's stage limits fit its deadline with the summary's
reserve, as one command on a lent GPU must; the stages run the headline first; the suites a part
benchmarks are ones bench/summarize.py knows."""

import subprocess
from collections import defaultdict
from pathlib import Path

from bench import summarize

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.sh"


def _plan():
    out = subprocess.run(["bash", str(SCRIPT), "--plan"], check=True, capture_output=True, text=True).stdout
    parts, settings = defaultdict(list), {}
    for line in out.splitlines():
        words = line.split()
        if len(words) == 3:
            parts[int(words[0])].append((words[1], int(words[2])))
        else:
            settings[words[0]] = int(words[1])
    return dict(parts), settings


def test_each_part_fits_its_deadline():
    parts, settings = _plan()
    assert sorted(parts) == [1, 2]
    assert settings["deadline"] <= 270  # 4.5 minutes: two parts and a machine start fit 15 minutes of device time
    for part, stages in parts.items():
        assert sum(limit for _, limit in stages) + settings["summary_reserve"] <= settings["deadline"], part


def test_part_one_builds_tests_and_measures_the_headline_in_that_order():
    parts, _ = _plan()
    assert [name for name, _ in parts[1]] == ["build", "tests-core", "bench-step", "bench-ascent_step"]
    assert parts[2][0][0] == "build"  # a fresh machine must build before anything else runs


def test_every_benchmarked_suite_is_one_the_summary_knows():
    parts, _ = _plan()
    suites = [
        name.removeprefix("bench-") for stages in parts.values() for name, _ in stages if name.startswith("bench-")
    ]
    assert suites and set(suites) <= set(summarize.SUITES)
    assert len(suites) == len(set(suites))  # no suite written twice


def test_usage_errors_exit_2(tmp_path):
    for args in ([], ["--part", "3", str(tmp_path)], ["--part", "1"], ["--cpu-dry-run", str(tmp_path)]):
        assert subprocess.run(["bash", str(SCRIPT), *args], capture_output=True).returncode == 2, args
