"""lfr-compare's choice of methods: any of lfr_ext.training.METHODS by name, and by default the
same four as always, in the same order (what a plain `lfr-compare` trains must not grow when a
method is added to the harness)."""

import pytest

from lfr_ext.cli.compare import DEFAULT_METHODS, build_parser, parse_methods
from lfr_ext.cli.compare import main as compare_main
from lfr_ext.training import METHODS


def test_compare_default_methods_stay_the_four():
    assert DEFAULT_METHODS == ("lfr", "pgd_at", "trades", "plain")
    assert build_parser().parse_args([]).methods == "lfr,pgd_at,trades,plain"
    assert "default lfr,pgd_at,trades,plain" in build_parser().format_help()


def test_compare_methods_choose_among_all_training_methods(capsys):
    assert set(DEFAULT_METHODS) <= set(METHODS)
    assert parse_methods(",".join(METHODS)) == list(METHODS)
    with pytest.raises(ValueError, match="unknown methods"):
        parse_methods("lfr,no_such_method")
    assert compare_main(["--methods", "no_such_method"]) == 2
    assert "choose from " + ", ".join(METHODS) in capsys.readouterr().err
