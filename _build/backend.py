"""In-tree PEP 517 backend: setuptools, plus one rule about which torch to compile against.

PyTorch's C++ ABI is not promised across versions, so lfr_ext's C++ library must be compiled
against the torch that will import it. Under `pip install --no-build-isolation .` (the
documented command) that torch is importable and nothing is added. Under plain
`pip install .`, pip builds in a throwaway environment; there we ask for exactly the torch
version installed in the target environment (or, when it has none, the same unpinned `torch`
that the runtime dependency will resolve to), instead of whatever newest torch the index has.

Frontends served:

* pip (`pip install .`, `pip install -e .`), with or without build isolation.
  pip runs these hooks with the target environment's interpreter and only hides its
  site-packages, so the installed torch can be read from there (`scripts/check_isolated_install.sh`
  checks it in CI).
* `python -m build` and uv (`uv pip install .`, `uv build`) run the hooks in a fresh virtual
  environment of their own, where the target's torch is not visible: the rule then asks for the
  unpinned `torch`, the newest the index has. Build against the torch you run with their
  no-isolation flags instead (`python -m build --no-isolation`,
  `uv pip install --no-build-isolation .`), after installing setuptools, wheel and ninja.
"""

from __future__ import annotations

import sysconfig
from importlib import metadata

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (re-export the standard hooks)


def _torch_requirement() -> list[str]:
    try:
        import torch  # noqa: F401  (no isolation: the target environment's torch is visible)

        return []
    except ImportError:
        pass
    # The interpreter running this hook is the target environment's; pip only hides its
    # site-packages from sys.path. Read torch's version from there without importing it.
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    for dist in metadata.distributions(path=paths):
        if (dist.metadata["Name"] or "").lower() == "torch":
            return [f"torch=={dist.version}"]
    return ["torch"]


def get_requires_for_build_wheel(config_settings=None):
    # setuptools' own hook runs setup.py, which imports torch: ask for torch first, alone.
    return _torch_requirement() or _setuptools.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_editable(config_settings=None):
    return _torch_requirement() or _setuptools.get_requires_for_build_editable(config_settings)
