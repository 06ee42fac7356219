"""Hostile config inputs (issue 11): each is a one-line ConfigError naming the problem, never a
traceback; plus a property-based test that arbitrary YAML and ``--set`` values resolve or raise
our errors."""

import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from robust_amo import ConfigError, RobustAmoError
from robust_amo.cli import main
from robust_amo.config import (
    TrainConfig,
    check_int,
    load_config,
    load_yaml,
    parse_float,
    parse_override,
)
from robust_amo.resolve import resolve


def _one_line_error(fn, *args, match: str) -> str:
    with pytest.raises(ConfigError, match=match) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _yaml(tmp_path, text: str | bytes, name: str = "c.yaml"):
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


# --- numbers: finite floats ----------------------------------------------------------------

@pytest.mark.parametrize("item,key", [
    ("attack.eps=1e400", "attack.eps"),  # YAML reads 1e400 (no dot) as the string "1e400"
    ("attack.eps='1e400'", "attack.eps"),
    ("attack.eps=1e9999999", "attack.eps"),  # Fraction would expand 10**9999999 (seconds)
    ("attack.eps=-1e9999999", "attack.eps"),
    ("attack.eps=" + "9" * 400, "attack.eps"),  # an int too large for a float
    ("optim.gamma=.inf", "optim.gamma"),  # not covered by the range checks
    ("optim.gamma=.nan", "optim.gamma"),
    ("optim.gamma=nan", "optim.gamma"),
    ("optim.gamma=[0.1, 1e400]", r"optim.gamma\[1\]"),
    ("eval.step_size=-.inf", "eval.step_size"),
])
def test_floats_must_be_finite(item, key):
    overrides = [{"optim": {"milestones": [1, 2]}}, parse_override(item)]
    msg = _one_line_error(resolve, None, overrides, match=key)
    assert "finite" in msg


def test_method_option_floats_must_be_finite():
    # the methods' options are checked by the same loader (their range checks let inf through)
    for method, item in (("amo", "eta_p=.inf"), ("robust-amo", "eta_delta=1e400"),
                         ("jacobian-lm", "lam_lm=.nan")):
        overrides = [{"method": method}, parse_override(f"method_args.{item}")]
        _one_line_error(resolve, None, overrides, match="finite")


def test_yaml_file_with_overflowing_float(tmp_path):
    for text in ("attack:\n  eps: 1e400\n", "attack:\n  eps: '1e400'\n",
                 "attack:\n  eps: 1.0e+400\n", "optim:\n  lr: .nan\n"):
        _one_line_error(resolve, _yaml(tmp_path, text), match="finite")


def test_parse_float_keeps_exact_values():
    # the decimal fast path rounds exactly as Fraction did: saved configs keep their values
    from fractions import Fraction
    for text in ("0.1", "2e-4", "6.4e-3", "0.0078431372549", "1e-400", "3"):
        assert parse_float(text) == float(Fraction(text))
    assert parse_float("8/255") == float(Fraction(8, 255))
    assert parse_float(" 2/3 ") == float(Fraction(2, 3))


# --- integers: 64 bits, seeds 0 <= seed < 2**63 --------------------------------------------

@pytest.mark.parametrize("override,key", [
    ({"seed": 99999999999999999999999}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"seed": -1}, "seed"),
    ({"data": {"subset_seed": -5}}, "data.subset_seed"),
    ({"data": {"subset_seed": 2**64}}, "data.subset_seed"),
    ({"epochs": 2**70}, "epochs"),
    ({"optim": {"milestones": [2**64]}}, r"optim.milestones\[0\]"),
    ({"method": "amo", "method_args": {"steps": 10**30}}, "method_args.steps"),
])
def test_integers_must_fit_64_bits(override, key):
    msg = _one_line_error(resolve, None, [override], match=key)
    assert "2**63" in msg


def test_seed_range_edges():
    assert resolve(None, [{"seed": 2**63 - 1}]).seed == 2**63 - 1
    assert resolve(None, [{"seed": 0}]).seed == 0
    assert check_int("eval.steps", -(2**63)) == -(2**63)  # range checks come later
    with pytest.raises(ConfigError):
        check_int("eval.steps", -(2**63) - 1)


def test_seed_beyond_64_bits_in_yaml(tmp_path):
    msg = _one_line_error(resolve, _yaml(tmp_path, "seed: 99999999999999999999999\n"),
                          match="seed")
    assert "0 <= seed < 2**63" in msg


# --- mapping keys --------------------------------------------------------------------------

@pytest.mark.parametrize("text,needle", [
    ("1: 2\nepochs: 3\n", "key 1 at the top level"),
    ("1: 2\nepochz: 3\n", "key 1 at the top level"),  # sorting the unknown keys failed
    ("epochs: 3\nattack:\n  2: 0.1\n", "key 2 under attack"),
    ("method_args:\n  1: 2\n", "key 1 under method_args"),
    ("model_kwargs:\n  a:\n    null: 1\n", "key None under model_kwargs.a"),
    ("optim:\n  true: 1\n", "key True under optim"),
    ("optim:\n  milestones: [{1: 2}]\n", r"key 1 under optim.milestones\[0\]"),
])
def test_non_string_keys_are_named(tmp_path, text, needle):
    msg = _one_line_error(resolve, _yaml(tmp_path, text), match=needle)
    assert "c.yaml" in msg and "not a name" in msg


def test_non_string_keys_in_overrides():
    _one_line_error(resolve, None, [parse_override("method_args={1: 2}")],
                    match="key 1 under method_args")
    _one_line_error(resolve, None, [{1: 2, "epochz": 3}], match="key 1 at the top level")


# --- files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "null\n", "---\n", "~"])
def test_empty_config_file_is_an_error(tmp_path, text):
    _one_line_error(load_yaml, _yaml(tmp_path, text), match="is empty")


def test_explicit_empty_mapping_means_defaults(tmp_path):
    assert load_config(_yaml(tmp_path, "{}\n")) == TrainConfig()


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "3\n", "just words\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    _one_line_error(load_yaml, _yaml(tmp_path, text), match="must hold a mapping")


def test_directory_is_named_a_directory(tmp_path):
    msg = _one_line_error(load_yaml, tmp_path, match="is a directory")
    assert "does not exist" not in msg


@pytest.mark.parametrize("text,needle", [
    ("a: [1, 2\n", "line"),
    ("a: 1\n---\nb: 2\n", "single document"),
    ("a: b: c\n", "line 1"),
    ("a: !!python/object:os.system x\n", "not valid YAML"),
    ("a: \x07\n", "not valid YAML"),  # a control character
    ("[" * 5000 + "]" * 5000, "nested too deeply|not valid YAML"),
])
def test_yaml_errors_are_one_line(tmp_path, text, needle):
    msg = _one_line_error(load_yaml, _yaml(tmp_path, text), match=needle)
    assert "c.yaml" in msg


def test_non_utf8_and_unreadable_files(tmp_path, monkeypatch):
    _one_line_error(load_yaml, _yaml(tmp_path, b"epochs: 3\nname: caf\xe9\n"),
                    match="not UTF-8")
    assert load_yaml(_yaml(tmp_path, "\ufeffepochs: 3\n".encode())) == {"epochs": 3}  # a BOM
    p = _yaml(tmp_path, "epochs: 3\n", "locked.yaml")

    def denied(self):  # chmod 0 does not stop root, who runs CI containers
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(p), "read_bytes", denied)
    msg = _one_line_error(load_yaml, p, match="cannot be read")
    assert "Permission denied" in msg and "locked.yaml" in msg


# --- the command line: exit 2 and the message ----------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["--eps", "1e400"], "attack.eps: '1e400' is not a finite number"),
    (["--seed", "99999999999999999999999"], "0 <= seed < 2**63"),
    (["--set", "1=2", "--set", "method_args={7: 1}"], "key 7 under method_args"),
])
def test_cli_exits_2(tmp_path, capsys, args, needle):
    rc = main(["train", *args, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_cli_empty_and_directory_config(tmp_path, capsys):
    empty = _yaml(tmp_path, "# nothing yet\n", "empty.yaml")
    for config, needle in ((empty, "is empty"), (tmp_path, "is a directory")):
        rc = main(["train", "--config", str(config), "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


# --- property-based: anything resolves or raises our error ---------------------------------

# names the schema knows, so that generated documents reach the type and range checks too
NAMES = ["arch", "dataset", "method", "method_args", "epochs", "batch_size", "seed", "device",
         "model_kwargs", "data", "optim", "attack", "eval", "eps", "step_size", "steps", "norm",
         "loss", "lr", "gamma", "milestones", "schedule", "val_size", "split", "examples",
         "train_subset", "subset_seed", "restarts", "every", "eta_p", "rho", "lam_lm",
         "delta_grad", "compile_mode", "tiny-cnn", "amo", "robust-amo", "jacobian-lm", "pgd"]
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(-(2**70), 2**70)
           | st.floats() | TEXT | st.sampled_from(NAMES + ["8/255", "1e400", "nan", "-1", "0"]))
KEYS = st.sampled_from(NAMES) | TEXT | st.integers(-3, 3) | st.booleans() | st.none()
DOCS = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(KEYS, inner, max_size=5), max_leaves=20)
SET_KEYS = st.lists(st.sampled_from(NAMES) | TEXT, min_size=1, max_size=3).map(".".join)
SET_VALUES = TEXT | DOCS.map(lambda d: yaml.safe_dump(d, default_flow_style=True).strip())
SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _resolves_or_our_error(config_file, overrides) -> None:
    for fn in (load_config, resolve):
        try:
            fn(config_file, overrides)
        except RobustAmoError as e:
            assert "\n" not in str(e), str(e)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("hypothesis") / "c.yaml"


@SETTINGS
@given(doc=st.dictionaries(KEYS, DOCS, max_size=6) | DOCS)
def test_any_yaml_document_resolves_or_raises_config_error(scratch, doc):
    scratch.write_text(yaml.safe_dump(doc))
    _resolves_or_our_error(scratch, None)


@SETTINGS
@given(raw=TEXT | st.text(string.printable, max_size=80) | st.binary(max_size=60))
def test_any_file_content_resolves_or_raises_config_error(scratch, raw):
    if isinstance(raw, bytes):
        scratch.write_bytes(raw)
    else:
        scratch.write_text(raw, encoding="utf-8")
    _resolves_or_our_error(scratch, None)


@SETTINGS
@given(items=st.lists(st.builds("{}={}".format, SET_KEYS, SET_VALUES) | TEXT, max_size=4))
def test_any_set_values_resolve_or_raise_config_error(items):
    try:
        overrides = [parse_override(i) for i in items]
    except ConfigError:
        return
    _resolves_or_our_error(None, overrides)


def test_an_unknown_key_with_a_newline_stays_on_one_line():
    from robust_amo.config import load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, [{"\n": 1}])
    assert "\n" not in str(e.value) and "'\\n'" in str(e.value)


def test_a_nested_key_with_a_newline_stays_on_one_line():
    """Found by the property test in CI: the path of a non-string key quoted a newline raw."""
    from robust_amo.config import load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, [{"arch": {"\n\n  ": {0: None}}}])
    assert "\n" not in str(e.value) and "\\n" in str(e.value)
