"""The README's Python examples run as written (with the substitutions below), from a folder
that is not the repository, so they use nothing but the installed package."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT

README = ROOT / "README.md"

# Blocks that need what a CPU test machine lacks are not run: MadryLab's robustness with a
# CIFAR-10 folder and CUDA.
NOT_RUN = ("from robustness import",)

# Substitutions that shrink an example to test size without changing what it calls.
SHRINK = {"\"epochs\": 5": "\"epochs\": 1", "n_examples=500": "n_examples=40",
          "n_examples=256": "n_examples=16"}


def python_blocks() -> list[str]:
    """Every ```python fenced block of the README, in order."""
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def runnable() -> list[str]:
    out = []
    for block in python_blocks():
        if any(marker in block for marker in NOT_RUN):
            continue
        for old, new in SHRINK.items():
            block = block.replace(old, new)
        out.append(block)
    return out


def test_readme_has_python_examples() -> None:
    assert len(runnable()) >= 1, "the README lost its Python examples"


@pytest.mark.parametrize("index", range(len(runnable())))
def test_readme_python_example_runs(index: int, tmp_path) -> None:
    code = runnable()[index]
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"README example {index} failed:\n{code}\n{done.stderr[-3000:]}"
