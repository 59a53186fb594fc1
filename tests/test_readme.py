"""README.md stays true: its Python runs as written, it stays short, and the documentation's links resolve.

The ```python blocks of README.md build on each other (the quick start's model, optimizer and batch are
used by the later blocks), so they run in order in one namespace, on the CPU with small random data.
A block that needs a dataset or a GPU is written as ```text in the README and is not run here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 340

# CI runs the second command literally (.ci/run), so both must stay in the README as they are.
SETUP_COMMANDS = (
    "bash scripts/install.sh && .venv/bin/lfr-compare",
    "bash scripts/install.sh && .venv/bin/python -m pytest tests -q",
)

# The pages whose relative links must point at files or folders of the repository.
LINKED_PAGES = (
    "README.md",
    "CONTRIBUTING.md",
    "bench/README.md",
    "lfr_ext/linearized/README.md",
    "lfr_ext/training/README.md",
    "kernels/README.md",
    "bench/results/README.md",
)

_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
_FENCED_BLOCK = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_INLINE_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_REFERENCE_LINK = re.compile(r"^\[[^\]]+\]:\s*(\S+)", re.MULTILINE)


def python_blocks(markdown: str) -> list[str]:
    """The bodies of the ```python fences of ``markdown``, in order."""
    return _PYTHON_BLOCK.findall(markdown)


def relative_links(markdown: str) -> list[str]:
    """Link targets of ``markdown`` outside code (fences and inline spans) that name a path: not a
    URL, not a bare ``#anchor``; an anchor after a path is dropped."""
    prose = _INLINE_CODE.sub("", _FENCED_BLOCK.sub("", markdown))
    targets = _INLINE_LINK.findall(prose) + _REFERENCE_LINK.findall(prose)
    paths = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        paths.append(target.split("#", 1)[0])
    return paths


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines, at most {MAX_README_LINES}"


@pytest.mark.parametrize("command", SETUP_COMMANDS)
def test_readme_keeps_the_setup_command(command):
    assert command in README.read_text()


def test_readme_python_blocks_run():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 4, "the quick start, the loop, the added penalty, the evaluation and bf16 are Python"
    namespace: dict = {"__name__": "readme"}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"README.md python block {number}", "exec"), namespace)
    # What the blocks say they compute: a finite LFR loss and an evaluation of the quick start's model.
    assert torch.isfinite(namespace["out"].loss)
    assert namespace["out"].penalty.item() > 0
    assert set(namespace["result"].accuracy) >= {"clean", "FGSM"}


@pytest.mark.parametrize("page", LINKED_PAGES)
def test_relative_links_resolve(page):
    path = ROOT / page
    links = relative_links(path.read_text())
    missing = sorted({link for link in links if not (path.parent / link).exists()})
    assert not missing, f"{page} links to paths that do not exist: {missing}"


def test_link_finder_sees_links_and_skips_urls_and_code():
    markdown = (
        "[a](x/y.md#part) [b](https://example.org) [c](#local) `f(x)[i](...)`\n[ref]: ../z.py\n"
        "```text\n[d](inside/code.md)\n```\n"
    )
    assert relative_links(markdown) == ["x/y.md", "../z.py"]
