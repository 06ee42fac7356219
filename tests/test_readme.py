"""The README runs as written, top to bottom (issue 20, item 6): its Python examples, and every
command of its ```bash blocks in order in one folder that is not the repository, so they use
nothing but the installed package and each finds what the commands before it wrote.

The commands run on tiny settings. What is changed, and why, is all in the tables below:
:data:`SKIP` (commands not run), :data:`SUBSTITUTE` (GPU-, network- and data-only parts replaced)
and :func:`shrink` (epochs, examples and attack steps cut to test size). A README command that
fails here fails the same way for a user.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from robust_amo.cli import main
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


# --- the bash blocks -------------------------------------------------------------------------

SHARED_DATA = ROOT.parent / "shared" / "data"
"""The offline datasets beside the repository (``../shared/data`` in the README)."""

SKIP = {
    r"^pip install -e \.$": "installs the package, which the tests run installed already",
    r"^pip install -e '\.\[dev\]'": "installs the test tools of the suite this test is in",
    r"^python -m pytest\b": "runs the test suite this test is part of",
    r"^torchrun\b": "needs several GPUs or machines (tests/test_distributed.py runs torchrun on "
                    "CPU processes)",
    r"^tensorboard\b": "starts a server that runs until stopped (tests/test_curves_and_logs.py "
                       "reads the event files)",
    r"^robust-amo eval --model my_models\.py": "needs your model file, weights and CIFAR-10 "
                                              "(tests/evaluation/test_own_model.py runs it on "
                                              "digits)",
}
"""Commands not run: regular expression of the command -> why."""

SUBSTITUTE = (
    (r"--config (cifar10_wrn[\w-]+)", r"--config quickstart --out runs/\1",
     "a CIFAR-10 WRN trains for hours on a GPU: the quickstart config instead, into the run "
     "folder the CIFAR config names, so the commands after it find the run"),
    (r" --data-dir (data/cifar10|/path/to/cifar)(?!\S)", "",
     "the quickstart's digits are bundled: no data folder"),
    (r" --download(?!\S)", "", "no network in tests"),
    (r"--arch preact-resnet18", "--arch tiny-cnn",
     "a ResNet-18 step takes seconds on 2 CPU cores; the image-folder workflow is the point"),
    (r"\.\./shared/data", str(SHARED_DATA),
     "the offline datasets beside the repository; skipped when they are absent"),
)
"""GPU-, network- and data-only parts: (pattern, replacement, why), applied in order."""

TINY_TRAIN = ("--set", "data.train_subset=96", "--set", "data.val_size=32", "--n-examples", "16",
              "--set", "attack.steps=1", "--set", "eval.steps=1", "--no-progress")
"""Appended to every ``train``: 64 training and 32 held-out examples, one attack step. The same
for every run, so a ``--resume`` finds the config of the run it continues."""


def shrink(argv: list[str]) -> list[str]:
    """Test size for one ``robust-amo`` command (its arguments after ``robust-amo``).

    - ``train``: :data:`TINY_TRAIN`, 1 epoch (2 when ``--resume`` asks for more epochs);
    - ``eval``: 8 examples; ``margins``: 8 examples, PGD-2, 2 bisection steps, 1 round;
    - ``--no-progress`` for both; ``plot``, ``reproduce`` and ``archs`` run as written.
    """
    out = list(argv)
    command = out[0]
    if command not in ("train", "eval", "margins"):
        return out
    n = {"train": None, "eval": "8", "margins": "8"}[command]
    if "--epochs" in out:
        i = out.index("--epochs") + 1
        out[i] = "2" if "--resume" in out else "1"
    elif command == "train":
        out += ["--epochs", "1"]
    if n is not None:
        if "--n-examples" in out:
            out[out.index("--n-examples") + 1] = n
        else:
            out += ["--n-examples", n]
        out.append("--no-progress")
    if command == "train":
        out += TINY_TRAIN
    if command == "margins":
        if "--pgd-steps" in out:
            out[out.index("--pgd-steps") + 1] = "2"
        out += ["--attack-steps", "2", "--rounds", "1"]
    return out


def bash_commands(text: str | None = None) -> list[str]:
    """Every command of the README's ```bash blocks, in order: continuation lines joined,
    comments dropped, ``a && b`` split in two."""
    text = README.read_text() if text is None else text
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if not words:
                continue
            joined = shlex.join(words)
            commands += [c.strip() for c in joined.split(" '&&' ")]
    return commands


def plan(commands: list[str]) -> list[tuple[str, list[str] | None, str]]:
    """``(README command, robust-amo arguments to run or None, why)`` per command."""
    out = []
    for command in commands:
        reason = next((why for pat, why in SKIP.items() if re.search(pat, command)), None)
        if reason is not None:
            out.append((command, None, reason))
            continue
        assert command.startswith("robust-amo "), f"no rule for {command!r}: add one to SKIP"
        text = command
        for pattern, new, _ in SUBSTITUTE:
            text = re.sub(pattern, new, text)
        if str(SHARED_DATA) in text and not SHARED_DATA.is_dir():
            out.append((command, None, f"{SHARED_DATA} is absent"))
            continue
        out.append((command, shrink(shlex.split(text)[1:]), ""))
    return out


def _image_folder(root: Path) -> None:
    """``my_images``: the README's own images, two classes of 32x32 PNGs (48 train, 8 test
    each): stripes one way or the other, so there is something to learn."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("test", 8)):
        for label, name in enumerate(("horizontal", "vertical")):
            folder = root / "my_images" / split / name
            folder.mkdir(parents=True)
            stripes = np.tile((np.arange(32) // 4 % 2 * 200)[:, None], (1, 32))
            for i in range(n):
                img = (stripes.T if label else stripes) + rng.integers(0, 55, (32, 32))
                rgb = np.repeat(img[..., None], 3, axis=2).astype(np.uint8)
                Image.fromarray(rgb).save(folder / f"{i}.png")


def test_every_bash_command_has_a_rule():
    steps = plan(bash_commands())
    assert len(steps) >= 20, "the README lost its commands"
    used = {pat for pat, why in SKIP.items() if any(r == why for _, a, r in steps if a is None)}
    assert used == set(SKIP), f"SKIP entries that match no README command: {set(SKIP) - used}"


def test_the_parser_joins_lines_drops_comments_and_splits_and():
    text = "```bash\n# a comment\npip install -e . && robust-amo train \\\n    --epochs 5  # x\n```"
    assert bash_commands(text) == ["pip install -e .", "robust-amo train --epochs 5"]
    assert shrink(["train", "--config", "quickstart", "--resume", "--epochs", "20"])[:5] == \
        ["train", "--config", "quickstart", "--resume", "--epochs"]
    assert shrink(["eval", "--n-examples", "200"])[:3] == ["eval", "--n-examples", "8"]


def test_the_readme_commands_run_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _image_folder(tmp_path)
    for command, argv, _ in plan(bash_commands()):
        if argv is None:
            continue
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse refused the flags
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 0, f"README command failed: {command}\nran: robust-amo " \
                        f"{shlex.join(argv)}\n{err[-2000:]}"
    assert (tmp_path / "compare.png").is_file()
    assert (tmp_path / "runs" / "quickstart" / "robustbench" / "report.robustbench.json").is_file()
