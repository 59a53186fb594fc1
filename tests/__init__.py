"""lfr_ext's tests, a package so that their shared helpers import as ``tests.<module>``
(``tests.utils``, ``tests.op_cases``, ``tests.models_for_tests``, ``tests.authors_lfr``,
``tests.dist_helpers``), from the tests and from the benchmarks in ``bench/``."""
