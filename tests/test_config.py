import pytest

from robust_amo import ConfigError, UnknownModelError
from robust_amo.config import load_yaml, parse_float, parse_override
from robust_amo.resolve import resolve
from tests.helpers import ROOT


def test_fraction_and_defaults():
    cfg = resolve(None, [{"attack": {"eps": "8/255", "step_size": "2/255"}}])
    assert cfg.attack.eps == pytest.approx(8 / 255)
    assert cfg.attack.step_size == pytest.approx(2 / 255)
    assert parse_float("2e-4") == 2e-4 and parse_float(3) == 3.0
    for bad in ("__import__('os')", "8/0", "eight", True):
        with pytest.raises(ConfigError):
            parse_float(bad, "attack.eps")


@pytest.mark.parametrize("override,needle", [
    ({"epochz": 3}, "epochz"),
    ({"attack": {"epz": 0.1}}, "attack.epz"),
    ({"epochs": "ten"}, "epochs"),
    ({"data": {"augment": "yes"}}, "data.augment"),
    ({"optim": {"milestones": [10, "x"]}}, "optim.milestones[1]"),
    ({"optim": {"schedule": "linear"}}, "optim.schedule"),
    ({"attack": {"norm": "l1"}}, "attack.norm"),
    ({"batch_size": 0}, "batch_size"),
    ({"attack": "strong"}, "attack"),
    ({"eval": {"split": "val"}, "data": {"val_size": 0}}, "val_size"),
    ({"eval": {"step_size": -0.1}}, "eval.step_size"),
    ({"eval": {"n_examples": -1}}, "eval.n_examples"),
    ({"optim": {"momentum": -1}}, "optim.momentum"),
    ({"data": {"val_size": -3}}, "data.val_size"),
    ({"optim": {"warmup_epochs": -1}}, "optim.warmup_epochs"),
    ({"attack": {"eps": float("inf")}}, "attack.eps"),
])
def test_bad_keys_and_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        resolve(None, [override])


def test_unknown_arch_is_reported_early():
    with pytest.raises(UnknownModelError, match="wrn28-10"):
        resolve(None, [{"arch": "resnet9000"}])


def test_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("arch: tiny-mlp\nepochs: 3\nattack:\n  eps: 0.3\n  steps: 40\n")
    cfg = resolve(f, [{"epochs": 5}, parse_override("attack.eps=8/255")])
    assert cfg.arch == "tiny-mlp" and cfg.epochs == 5 and cfg.attack.steps == 40
    assert cfg.attack.eps == pytest.approx(8 / 255)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("attack.eps")


def test_shipped_configs_resolve():

    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert any(f.name == "quickstart.yaml" for f in files)
    for f in files:
        resolve(f)
