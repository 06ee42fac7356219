"""Packaging (issue 20, item 12): users are not capped to CI's torch, CI stays on its cached
wheels through a constraints file, .ci/run runs the README's test command, and the examples
name no one machine's paths."""

from __future__ import annotations

import importlib.util
import re

import pytest

from tests.helpers import ROOT


def _dependencies() -> list[str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)\]", text, flags=re.S | re.M).group(1)
    return re.findall(r'"([^"]+)"', block)


def test_torch_and_torchvision_are_not_capped():
    deps = {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0]: d for d in _dependencies()}
    for name in ("torch", "torchvision"):
        assert "<" not in deps[name] and "==" not in deps[name], deps[name]


def test_ci_pins_its_wheels_in_a_constraints_file():
    pins = [ln.strip() for ln in (ROOT / ".ci" / "constraints.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    assert any(re.fullmatch(r"torch==[\d.]+", p) for p in pins), pins
    assert any(re.fullmatch(r"torchvision==[\d.]+", p) for p in pins), pins


def readme_test_command() -> str:
    """The README's command that runs the tests (the bash block holding ``pytest``)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    (command,) = [b.strip() for b in blocks if "pytest" in b]
    return command


def test_ci_runs_exactly_the_readmes_test_command():
    command = readme_test_command()
    assert "-c .ci/constraints.txt" in command
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    for part in command.split(" && "):
        assert any(ln == part or ln.startswith(part + " ") for ln in lines), part


def test_the_examples_name_no_machines_paths():
    for path in (ROOT / "examples").glob("*.py"):
        found = re.findall(r"(?<![\w.])/(?:work|home|Users|mnt|data|scratch)/\S*",
                           path.read_text())
        assert not found, f"{path.name}: {found}"


def test_the_robustness_example_asks_for_the_data_folder(monkeypatch, capsys):
    pytest.importorskip("robustness")
    monkeypatch.delenv("ROBUST_AMO_DATA", raising=False)
    spec = importlib.util.spec_from_file_location("robustness_train",
                                                  ROOT / "examples" / "robustness_train.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with pytest.raises(SystemExit) as e:
        example.parse_args(["--dataset", "cifar10"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("--dataset cifar10 needs its files: pass --data-dir DIR or set "
                        "ROBUST_AMO_DATA=DIR (only digits is bundled)")
    monkeypatch.setenv("ROBUST_AMO_DATA", "some/folder")
    assert example.parse_args(["--dataset", "cifar10"]).data_dir == "some/folder"
    assert example.parse_args([]).data_dir == "some/folder"
