"""Library errors name parameters; the CLI says them as its flags (issue 19).

A message from the Python API says ``resume`` where the command line says ``--resume``: the
library lists the parameters a message names (``RobustAmoError.params``) and each command maps
them to its flags (:func:`robust_amo.cli.common.flag_message`). The last test keeps flags out
of the library's exception messages.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from robust_amo.checkpoint.robustness_layout import from_robustness
from robust_amo.cli import main
from robust_amo.cli.common import flag_message
from robust_amo.config import load_config
from robust_amo.errors import CheckpointError, ConfigError, OutputError, RobustAmoError
from robust_amo.models import load_factory
from robust_amo.runs import METRICS
from robust_amo.train import train
from tests.test_layout import MODULES

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]+")
"""A command-line flag inside a text."""

TRAIN = ["--arch", "tiny-cnn", "--dataset", "digits", "--method", "standard", "--device", "cpu",
         "--no-progress"]


def _run_folder(tmp_path: Path) -> Path:
    """A folder holding (the metrics of) an earlier run."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / METRICS).write_text("")
    return folder


def _factory_file(tmp_path: Path) -> Path:
    """A model file with no function ``build``."""
    path = tmp_path / "my_models.py"
    path.write_text("def other():\n    return None\n")
    return path


def _robustness_file(tmp_path: Path) -> Path:
    """A robustness checkpoint that does not record its architecture."""
    path = tmp_path / "robustness.pt"
    torch.save({"model": {"module.model.w": torch.zeros(1)}, "epoch": 1}, path)
    return path


def _no_flag(e: RobustAmoError) -> str:
    msg = str(e)
    assert "\n" not in msg and not FLAG.search(msg), msg
    return msg


def test_train_into_a_run_names_resume_and_overwrite(tmp_path):
    folder = _run_folder(tmp_path)
    cfg = load_config(None, [{"arch": "tiny-cnn", "dataset": "digits", "method": "standard",
                              "out": str(folder), "device": "cpu"}])
    with pytest.raises(OutputError) as e:
        train(cfg)
    msg = _no_flag(e.value)
    assert "continue it (resume) or start over (overwrite, deletes it)" in msg
    assert e.value.params == ("resume", "overwrite")
    with pytest.raises(ConfigError, match="^resume and overwrite exclude each other") as e:
        train(cfg, resume=True, overwrite=True)
    _no_flag(e.value)


def test_an_external_model_with_a_bad_fn_names_model(tmp_path):
    path = _factory_file(tmp_path)
    with pytest.raises(ConfigError, match=r"^model '.*': .* has no function build") as e:
        load_factory(f"{path}:build")
    _no_flag(e.value)
    with pytest.raises(ConfigError, match="^model 'my_models.py': expected FILE.py:FN") as e:
        load_factory("my_models.py")
    assert e.value.params == ("model",)


def test_a_robustness_checkpoint_without_arch_names_arch(tmp_path):
    rckpt = torch.load(_robustness_file(tmp_path), weights_only=True)
    with pytest.raises(CheckpointError, match=r"pass arch \(.*\) and dataset$") as e:
        from_robustness(rckpt)
    _no_flag(e.value)
    assert e.value.params == ("arch", "dataset")


def test_the_commands_say_the_flags(tmp_path, capsys):
    folder = _run_folder(tmp_path)
    assert main(["train", *TRAIN, "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "continue it (--resume) or start over (--overwrite, deletes it)" in err
    assert err.count("\n") == 1

    spec = f"{_factory_file(tmp_path)}:build"
    assert main(["eval", "--model", spec, "--dataset", "digits", "--eps", "8/255", "--device",
                 "cpu", "--no-progress", "--out", str(tmp_path / "e" / "report.json")]) == 2
    err = capsys.readouterr().err
    assert f"error: --model {spec!r}: " in err and "has no function build" in err

    src = _robustness_file(tmp_path)
    assert main(["convert-checkpoint", str(src), str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert "pass --arch (a registered name" in err and "and --dataset" in err

    assert main(["train", *TRAIN, "--set", "epochs"]) == 2
    assert "--set 'epochs': expected KEY=VALUE" in capsys.readouterr().err


def test_a_parameter_inside_a_path_stays_as_it_is(tmp_path):
    e = OutputError("runs/out/x (out) is a file", params=("out",))
    assert flag_message(e, {"out": "--out"}) == "runs/out/x (--out) is a file"


# Flags that may appear in a library message: they are not ours to map.
ALLOWED = {
    # torchrun's own options, in the advice on how to launch it
    ("robust_amo.distributed", "--nproc-per-node"),
}


def _callee(call: ast.Call) -> str:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def _message_texts(tree: ast.AST) -> list[tuple[int, str]]:
    """The string pieces of exception messages: the arguments of every call of a ``...Error``
    class, the ``ways=``/``advice=`` texts that end up in one, and ``..._ADVICE`` constants."""
    roots: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if _callee(node).endswith(("Error", "Exception")):
                roots.extend([*node.args, *(k.value for k in node.keywords)])
            roots.extend(k.value for k in node.keywords if k.arg in ("ways", "advice"))
        elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id.endswith("_ADVICE") for t in node.targets):
            roots.append(node.value)
    return [(s.lineno, s.value) for r in roots for s in ast.walk(r)
            if isinstance(s, ast.Constant) and isinstance(s.value, str)]


def test_library_messages_name_no_flags():
    found = []
    for name, path in MODULES.items():
        if name.startswith("robust_amo.cli"):
            continue
        for line, text in _message_texts(ast.parse(path.read_text())):
            found += [f"{path.name}:{line}: {flag} in {text!r}" for flag in FLAG.findall(text)
                      if (name, flag) not in ALLOWED]
    assert not found, "library messages name parameters, not flags:\n" + "\n".join(found)
