"""The command lines of lfr_ext, one module per command, each with a ``main(argv=None)``:

* :mod:`lfr_ext.cli.train` (``lfr-train``): adversarially train one model with one method;
* :mod:`lfr_ext.cli.evaluate` (``lfr-eval``): robustness of trained runs under real attacks;
* :mod:`lfr_ext.cli.compare` (``lfr-compare``): train LFR and the baselines, evaluate, report;
* :mod:`lfr_ext.cli.report` (``lfr-report``): the Markdown + PNG report of evaluated runs;
* :mod:`lfr_ext.cli.demo`: LFR on Fashion-MNIST, end to end, in about a minute on a CPU;
* :mod:`lfr_ext.cli.info`: versions, what was compiled, and what runs on this machine.

``python -m lfr_ext.<command>`` runs the same commands through the modules at lfr_ext/<command>.py.
Nothing here is imported by ``import lfr_ext``.
"""
