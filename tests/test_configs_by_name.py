"""The shipped configs and studies by name from any folder, the one name of the number of
evaluated examples (``eval.n_examples``, ``--n-examples``), the split Literals and ``--help``."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import pytest
import torch
import yaml

from robust_amo import configs
from robust_amo.cli import COMMANDS, build_parser, main
from robust_amo.config import (
    CheckSplit,
    HeldOutSplit,
    SplitName,
    TrainConfig,
    check_choice,
    choices,
    config_path,
    from_dict,
    load_config,
    parse_override,
)
from robust_amo.errors import ConfigError
from robust_amo.methods import METHODS
from robust_amo.studies import find_study, list_study_files, load_study
from robust_amo.studies import spec as study_spec
from robust_amo.studies.spec import base_path
from tests.helpers import ROOT

STUDIES = ["baselines-small", "cifar10-baselines", "robust-amo-vs-pgd-small", "sokolic-fig2",
           "sokolic-table1", "wei-ma-table1", "wei-ma-table2", "wei-ma-table2-small"]

# seconds of training on the bundled digits, from the quickstart config
FAST = ["--epochs", "1", "--set", "data.train_subset=300", "--set", "eval.steps=0",
        "--device", "cpu", "--no-progress"]


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A working folder with no configs/ in it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- configs by name --------------------------------------------------------------------------

def test_the_package_finds_every_shipped_file():
    on_disk = {f.relative_to(ROOT / "configs").with_suffix("").as_posix()
               for f in (ROOT / "configs").rglob("*.yaml")}
    assert set(configs.config_names()) | {f"studies/{s}" for s in configs.study_names()} \
        == on_disk
    assert configs.study_names() == STUDIES
    assert "quickstart" in configs.config_names()
    assert not any(n.startswith("studies/") for n in configs.config_names())


@pytest.mark.parametrize("name", ["quickstart", "quickstart.yaml", "configs/quickstart.yaml"])
def test_a_config_by_name_from_another_folder(elsewhere, name):
    assert config_path(name) == ROOT / "configs" / "quickstart.yaml"
    cfg = load_config(name)
    assert (cfg.arch, cfg.dataset, cfg.epochs, cfg.eval.n_examples) == ("tiny-cnn", "digits",
                                                                         15, 200)


@pytest.mark.parametrize("name", ["sokolic_table1/mnist_cnn2_256_ce_lm",
                                  "sokolic_table1/mnist_cnn2_256_ce_lm.yaml"])
def test_a_paper_config_in_a_subfolder_by_relative_name(elsewhere, name):
    cfg = load_config(name)
    assert cfg.arch == "mnist-cnn2" and cfg.data.train_subset == 256 and cfg.method == "jacobian-lm"


def test_an_existing_path_wins_over_a_shipped_name(elsewhere):
    (elsewhere / "quickstart.yaml").write_text("epochs: 3\n")
    assert load_config("quickstart.yaml").epochs == 3  # the file here, not the shipped one
    assert load_config("quickstart").epochs == 15  # no file called quickstart here
    assert load_config(str(ROOT / "configs" / "quickstart.yaml")).epochs == 15


@pytest.mark.parametrize("name", ["quickstrat", "../pyproject", "/nonexistent.yaml",
                                  "studies/sokolic-table1"])
def test_an_unknown_name_is_one_line_listing_the_names(elsewhere, name):
    with pytest.raises(ConfigError) as e:
        load_config(name)
    msg = str(e.value)
    assert "\n" not in msg and "does not exist" in msg and repr(name) in msg
    assert "quickstart" in msg and "mnist_cnn2_standard" in msg
    assert "sokolic_table1/NAME (36 configs)" in msg and "sokolic_fig2/NAME (12 configs)" in msg


def test_train_config_by_name_from_another_folder(elsewhere, capsys):
    out = elsewhere / "run"
    assert main(["train", "--config", "quickstart", "--out", str(out), "--n-examples", "20",
                 *FAST]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["arch"] == "tiny-cnn" and saved["attack"]["step_size"] == 0.025
    assert saved["eval"]["n_examples"] == 20 and "examples" not in saved["eval"]
    assert main(["train", "--config", "nope", "--out", str(elsewhere / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'nope' does not exist" in err and "quickstart" in err


def test_reproduce_list_and_dry_run_from_another_folder(elsewhere, capsys):
    assert main(["reproduce", "--list"]) == 0
    listed = capsys.readouterr().out
    for name in STUDIES:
        assert name in listed
    # a dry run checks the data folder first: any existing folder passes that check
    assert main(["reproduce", "wei-ma-table2", "--dry-run", "--out", str(elsewhere / "s"),
                 "--data-dir", str(elsewhere)]) == 0
    assert "4 runs, 4 to train" in capsys.readouterr().out
    assert main(["reproduce", "sokolic-table1.yaml", "--dry-run", "--only", "arch=cnn2",
                 "--only", "samples=256", "--only", "loss=ce", "--only", "reg=none",
                 "--seeds", "0", "--out", str(elsewhere / "t"), "--data-dir", str(elsewhere)]) == 0
    assert "1 runs, 1 to train" in capsys.readouterr().out
    assert main(["reproduce", "no-such-study"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no study 'no-such-study'" in err
    assert all(name in err for name in STUDIES)


def test_the_console_script_lists_the_studies_from_another_folder(tmp_path):
    res = subprocess.run([sys.executable, "-m", "robust_amo.cli", "reproduce", "--list"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "sokolic-table1" in res.stdout and "no study files" not in res.stderr


def test_studies_dir_still_names_a_folder_of_ones_own(tmp_path, capsys):
    assert list_study_files(tmp_path) == []
    assert main(["reproduce", "--list", "--studies-dir", str(tmp_path)]) == 2
    assert "no study files in" in capsys.readouterr().err
    assert find_study("sokolic-table1") == ROOT / "configs" / "studies" / "sokolic-table1.yaml"
    assert find_study("sokolic-table1", ROOT / "configs" / "studies") \
        == ROOT / "configs" / "studies" / "sokolic-table1.yaml"


def test_a_study_base_resolves_beside_the_study_or_by_name(elsewhere):
    shipped = load_study(find_study("sokolic-table1"))
    assert base_path(shipped).resolve() == (ROOT / "configs" / "sokolic_table1" /
                                            "mnist_cnn2_1024_hinge_none.yaml")
    mine = yaml.safe_load((ROOT / "configs" / "studies" / "wei-ma-table2-small.yaml")
                          .read_text())
    for base in ("cifar10_wrn16-10_pgd", "configs/cifar10_wrn16-10_pgd.yaml"):
        (elsewhere / "mine.yaml").write_text(yaml.safe_dump({**mine, "base": base}))
        spec = load_study(elsewhere / "mine.yaml")
        assert base_path(spec) == ROOT / "configs" / "cifar10_wrn16-10_pgd.yaml"
    (elsewhere / "mine.yaml").write_text(yaml.safe_dump({**mine, "base": "nope"}))
    with pytest.raises(ConfigError, match="'nope' does not exist"):
        base_path(load_study(elsewhere / "mine.yaml"))


# --- eval.n_examples, its old spelling and the flags -------------------------------------------

def test_eval_examples_is_a_deprecated_alias(tmp_path, caplog):
    old = tmp_path / "old.yaml"
    old.write_text("eval:\n  examples: 7\n  steps: 3\n")
    with caplog.at_level(logging.WARNING, logger="robust_amo"):
        cfg = load_config(old)
    assert cfg.eval.n_examples == 7 and cfg.eval.steps == 3
    assert "eval.examples is deprecated" in caplog.text and "eval.n_examples" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="robust_amo"):
        assert load_config(None, [parse_override("eval.examples=5")]).eval.n_examples == 5
    assert "call it eval.n_examples" in caplog.text
    # the file's old name and a flag's new one: the flag wins, as for any key
    assert load_config(old, [parse_override("eval.n_examples=9")]).eval.n_examples == 9
    override = {"eval": {"examples": 5}}
    load_config(None, [override])
    assert override == {"eval": {"examples": 5}}  # the caller's mapping is left alone


def test_a_saved_config_dict_with_the_old_name_builds(caplog):
    with caplog.at_level(logging.WARNING, logger="robust_amo"):
        cfg = from_dict(TrainConfig, {"epochs": 2, "eval": {"examples": 5, "steps": 1}})
    assert cfg.eval.n_examples == 5 and cfg.eval.steps == 1 and "eval.n_examples" in caplog.text


def test_both_names_at_once_is_one_line(tmp_path):
    both = tmp_path / "both.yaml"
    both.write_text("eval: {examples: 7, n_examples: 8}\n")
    with pytest.raises(ConfigError, match="eval.examples is the old name of eval.n_examples"
                       ) as e:
        load_config(both)
    assert "\n" not in str(e.value)


def test_train_n_examples_and_norm_flags(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--out",
                 str(out), "--n-examples", "12", "--norm", "l2", "--eps", "0.5", *FAST]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["eval"]["n_examples"] == 12 and saved["attack"]["norm"] == "l2"


@pytest.mark.parametrize("command", [["train"], ["reproduce", "sokolic-table1", "--dry-run"]])
def test_eval_examples_flag_is_refused_naming_n_examples(command, tmp_path, capsys):
    assert main([*command, "--eval-examples", "5", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err == "robust-amo: error: --eval-examples was renamed --n-examples; pass " \
                  "--n-examples N\n"
    assert not (tmp_path / "x").exists()


def test_a_run_written_with_eval_examples_still_resumes(tmp_path, capsys):
    """Runs of earlier versions hold eval.examples in config.yaml and in the checkpoint."""
    out = tmp_path / "run"
    base = ["train", "--config", "quickstart", "--out", str(out), "--n-examples", "20", *FAST]
    assert main(base) == 0
    ck_path = out / "checkpoint.pt"
    ck = torch.load(ck_path, weights_only=False)
    ck["config"]["eval"]["examples"] = ck["config"]["eval"].pop("n_examples")
    torch.save(ck, ck_path)
    saved = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(saved.replace("n_examples:", "examples:"))
    assert main([*base, "--epochs", "2", "--resume"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    # the old key is compared under its new name: another count is another run
    ck = torch.load(ck_path, weights_only=False)
    ck["config"]["eval"]["examples"] = ck["config"]["eval"].pop("n_examples")
    torch.save(ck, ck_path)
    assert main([*base[:-len(FAST)], *FAST, "--n-examples", "30", "--epochs", "3",
                 "--resume"]) == 2
    assert "eval.n_examples (20 -> 30)" in capsys.readouterr().err


# --- split names -------------------------------------------------------------------------------

def test_one_literal_of_split_names():
    assert choices(SplitName) == ("train", "val", "test")
    assert choices(HeldOutSplit) == ("val", "test")
    assert not hasattr(study_spec, "SelectSplit")  # studies select on a HeldOutSplit
    assert choices(CheckSplit) == ("auto", "val", "test")
    assert set(choices(HeldOutSplit)) < set(choices(SplitName))
    with pytest.raises(ConfigError, match="eval.split: 'train' is not one of auto, val, test"):
        check_choice("eval.split", "train", CheckSplit)
    with pytest.raises(ConfigError, match="eval.split"):
        load_config(None, [{"eval": {"split": "train"}}])


# --- --help ------------------------------------------------------------------------------------

def _help(*argv: str, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_is_clean_and_lists_the_commands(capsys):
    text = _help(capsys=capsys)
    assert not re.search(r"``|:data:|:func:|:mod:|\\\\", text)
    for command in COMMANDS:
        assert re.search(rf"^\s+{re.escape(command.NAME)}\b", text, re.M), command.NAME
    assert "robust-amo train --config quickstart" in text and "example" in text


def test_train_help_lists_every_method_and_the_defaults(capsys):
    text = " ".join(_help("train", capsys=capsys).split())
    assert METHODS and all(name in text for name in METHODS)
    assert "--norm {linf,l2}" in text and "--n-examples N" in text
    assert "auto|cpu|cuda[:N]" in text and "--eval-examples" not in text
    for default in ("(default tiny-cnn)", "default pgd)", "(default 1000)", "(default 8/255)"):
        assert default in text


@pytest.mark.parametrize("command", ["eval", "margins", "reproduce"])
def test_device_help_and_values(command, capsys):
    text = " ".join(_help(command, capsys=capsys).split())
    assert "auto|cpu|cuda[:N]" in text and "auto is cuda when a CUDA device is available" in text
    parser = build_parser()
    extra = ["--checkpoint", "x"] if command != "reproduce" else []
    assert parser.parse_args([command, *extra, "--device", "cuda:1"]).device == "cuda:1"
    with pytest.raises(SystemExit):
        parser.parse_args([command, *extra, "--device", "gpu"])
    assert "expected auto, cpu, cuda or cuda:N" in capsys.readouterr().err


def test_every_option_says_what_it_does(capsys):
    for command in COMMANDS:
        parser = build_parser()
        sub = parser._subparsers._group_actions[0].choices[command.NAME]
        for action in sub._actions:
            if action.option_strings and action.help != "==SUPPRESS==":
                assert action.help, f"{command.NAME} {action.option_strings}"
