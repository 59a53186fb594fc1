"""lfr_ext's pytest-benchmark suites (``bench_<what>.py``), a package so that their shared
helpers import as ``bench.utils``; ``summarize.py`` turns a run's JSON into a Markdown summary."""
