"""The boundary between the library and its harness.

``import lfr_ext`` loads the library (the penalty, its engines and ops, the captured steps,
``PixelClassifier``) and none of the harness: the trainer, the evaluation, the data readers, the
model zoo and the command lines import on first use, so that a user of ``lfr_ext.lfr_loss`` pays
for none of them. ``lfr_ext.evaluate_model`` (and ``EvalConfig``, ``Evaluation``) still resolve,
on first access. How long the import takes is measured in bench/bench_import.py, not asserted.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Packages and modules of the harness; each must stay out of sys.modules after `import lfr_ext`.
HARNESS = (
    "lfr_ext.training",
    "lfr_ext.evaluation",
    "lfr_ext.data",
    "lfr_ext.models",
    "lfr_ext.report",
    "lfr_ext.cli",
    "lfr_ext.train",
    "lfr_ext.evaluate",
    "lfr_ext.compare",
    "lfr_ext.demo",
    "lfr_ext.info",
)

# The commands that `python -m lfr_ext.<name>` runs, through lfr_ext/<name>.py.
COMMANDS = ("train", "evaluate", "compare", "report", "demo")


def _in_fresh_interpreter(code: str) -> dict:
    """Run ``code`` in a new interpreter and return the JSON object it prints last."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _lfr_ext_modules_expression() -> str:
    return "sorted(m for m in sys.modules if m == 'lfr_ext' or m.startswith('lfr_ext.'))"


def test_import_lfr_ext_loads_no_harness_module():
    loaded = _in_fresh_interpreter(
        f"import json, sys; import lfr_ext; print(json.dumps({_lfr_ext_modules_expression()}))"
    )
    harness = [m for m in loaded if any(m == h or m.startswith(h + ".") for h in HARNESS)]
    assert not harness, f"`import lfr_ext` loaded the harness modules {harness}; all lfr_ext modules loaded: {loaded}"
    assert "lfr_ext.penalty" in loaded and "lfr_ext.ops" in loaded  # the library itself did load


def test_harness_packages_and_command_mains_resolve_on_first_access():
    """``lfr_ext.models`` (and the other harness packages) load when first named, and the command
    modules at the old paths still export their ``main``."""
    found = _in_fresh_interpreter(
        "import json, sys\n"
        "import lfr_ext\n"
        "before = [m in sys.modules for m in ('lfr_ext.models', 'lfr_ext.training')]\n"
        "from lfr_ext.models import SmallCNN\n"
        "import lfr_ext.cli.train\n"
        "from lfr_ext.train import main\n"
        "print(json.dumps({'before': before, 'models': lfr_ext.models.SmallCNN is SmallCNN,\n"
        "                  'training': lfr_ext.training.__name__, 'main': main is lfr_ext.cli.train.main}))\n"
    )
    assert found == {"before": [False, False], "models": True, "training": "lfr_ext.training", "main": True}


def test_evaluation_names_resolve_lazily_to_lfr_ext_evaluation():
    found = _in_fresh_interpreter(
        "import json, sys\n"
        "import lfr_ext\n"
        "before = 'lfr_ext.evaluation' in sys.modules\n"
        "names = ('evaluate_model', 'EvalConfig', 'Evaluation')\n"
        "resolved = {name: getattr(lfr_ext, name) for name in names}\n"
        "import lfr_ext.evaluation as evaluation\n"
        "from lfr_ext import evaluate_model\n"
        "print(json.dumps({'loaded_before_access': before,\n"
        "                  'same': {name: resolved[name] is getattr(evaluation, name) for name in names},\n"
        "                  'from_import_same': evaluate_model is evaluation.evaluate_model,\n"
        "                  'in_dir': [name in dir(lfr_ext) for name in names],\n"
        "                  'in_all': [name in lfr_ext.__all__ for name in names]}))\n"
    )
    assert found["loaded_before_access"] is False
    assert found["same"] == {"evaluate_model": True, "EvalConfig": True, "Evaluation": True}
    assert found["from_import_same"] is True
    assert found["in_dir"] == [True, True, True] and found["in_all"] == [True, True, True]


def test_unknown_attribute_of_lfr_ext_raises_attribute_error():
    import lfr_ext

    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        lfr_ext.not_a_name  # noqa: B018
    assert not hasattr(lfr_ext, "evaluate_modell")


def test_package_root_exports_the_library():
    import lfr_ext
    from lfr_ext import _version, hvp, ops, reference
    from lfr_ext.penalty import lfr_loss

    assert lfr_ext.__version__ == _version.__version__
    assert (lfr_ext.hvp, lfr_ext.ops, lfr_ext.reference) == (hvp, ops, reference)
    assert lfr_ext.lfr_loss is lfr_loss
    for name in lfr_ext.__all__:
        assert hasattr(lfr_ext, name), name


def test_console_scripts_point_at_importable_main_functions():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert {"lfr-train", "lfr-eval", "lfr-report", "lfr-compare"} <= set(scripts)
    for script, target in scripts.items():
        module_name, _, attr = target.partition(":")
        assert module_name.startswith("lfr_ext.cli."), (script, target)
        assert callable(getattr(importlib.import_module(module_name), attr, None)), (script, target)


@pytest.mark.parametrize("command", COMMANDS)
def test_python_m_at_the_old_path_runs_the_command(command):
    done = subprocess.run(
        [sys.executable, "-m", f"lfr_ext.{command}", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.startswith("usage:"), done.stdout[:400]
