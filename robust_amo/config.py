"""Training configuration: YAML files loaded with ``yaml.safe_load`` into dataclasses.

Unknown keys and values of the wrong type are :class:`ConfigError`\\ s naming the key. Floats may
be written as fractions (``eps: 8/255``), parsed with :class:`fractions.Fraction`, never ``eval``,
and must be finite (``1e400``, ``.inf`` and ``.nan`` are errors); integers must fit in 64 bits and
seeds lie in ``0 <= seed < 2**63`` (what ``torch.Generator.manual_seed`` takes); every mapping key
is a string.
Options with a closed set of values are ``Literal`` types, checked here and only here
(:func:`check_choice`, also for the attacks' and methods' constructors). Command-line flags
override the file, and the resolved config is saved beside the run.

This module knows the schema, not the registries: whether ``arch``, ``dataset`` and the method's
options exist is checked by :func:`robust_amo.resolve.resolve`, which builds on
:func:`load_config`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import yaml

from . import configs
from .errors import ConfigError

log = logging.getLogger(__name__)

Norm = Literal["linf", "l2"]
"""Threat model of an input attack: L∞ or L2 ball."""
AttackLoss = Literal["ce", "cw"]
"""Loss an attack ascends: cross-entropy or the CW margin max_{j≠y} z_j − z_y."""
DeltaGrad = Literal["mean", "sum"]
"""(Robust) AMO δ step from ∇δ of the batch-mean loss or of the batch-sum loss."""
Schedule = Literal["multistep", "cosine", "constant"]
HeldOutSplit = Literal["val", "test"]
"""Examples a model did not train on: the run's held-out part (``data.val_size``) or the test
split. A study selects hyperparameters on one of them (``select.split``)."""
SplitName = Literal["train", HeldOutSplit]
"""A dataset's split names: the one Literal of splits (``eval``/``margins`` ``--split``)."""
CheckSplit = Literal["auto", HeldOutSplit]
"""``eval.split`` of the per-epoch check (and so of best.pt): ``val``, the examples held out
of the training set (``data.val_size``); ``test``, the test split, only when a config names it
(selecting on the test set, as some papers did, makes the test accuracy optimistic); or
``auto``, ``val`` whenever something is held out (always, with ``data.val_size: auto``)."""
AutoSize = Literal["auto"]
"""``data.val_size: auto``: 10% of the training examples, at most 1000
(:func:`robust_amo.data.held_out_size`)."""
LrExtension = Literal["final", "restart"]
"""How a resumed run schedules epochs past the ones its learning-rate schedule was planned
for: ``final`` keeps the schedule's last rate (0 at the end of a cosine), ``restart`` runs the
whole schedule (warmup, milestones, cosine) again over the added epochs."""
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


def choices(tp: Any) -> tuple[Any, ...]:
    """The values of a ``Literal`` type (``None`` included for ``Literal[...] | None``)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(v for a in typing.get_args(tp) for v in
                     (choices(a) if a is not type(None) else (None,)))
    if typing.get_origin(tp) is not Literal:
        raise TypeError(f"{tp!r} is not a Literal type")
    return typing.get_args(tp)


def check_choice(key: str, value: Any, tp: Any) -> Any:
    """``value`` if it is one of the ``Literal`` type ``tp``'s values, else a ConfigError.

    The one check of closed option sets: the config loader, the attacks' and the methods'
    constructors all call it, so the message is the same everywhere.
    """
    allowed = choices(tp)
    if not isinstance(value, (str, type(None))) or value not in allowed:
        shown = ", ".join(str(a) for a in allowed if a is not None)
        raise ConfigError(f"{key}: {value!r} is not one of {shown}", params=(key,))
    return value


def parse_float(value: Any, key: str = "value") -> float:
    """A finite float from a number or a string such as ``"8/255"`` or ``"2e-4"``.

    Raises:
        ConfigError: not a number, or not finite: ``1e400`` (which overflows to infinity),
            ``inf`` and ``nan``, as numbers or as strings.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number, got {value!r}", params=(key,))
    out: float | None = None
    try:
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            text = value.strip()
            try:
                # a decimal: float() rounds correctly, as Fraction would, and turns an
                # exponent such as 1e9999999 into inf at once (Fraction would expand 10**9999999)
                out = float(text)
            except ValueError:
                out = float(Fraction(text))  # "8/255": integers only, at most 4300 digits
    except OverflowError:
        out = math.inf
    except (ValueError, ZeroDivisionError):
        out = None
    if out is None:
        raise ConfigError(f"{key}: expected a number such as 0.1, 2e-4 or 8/255, got {value!r}",
                          params=(key,))
    if not math.isfinite(out):
        raise ConfigError(f"{key}: {value!r} is not a finite number (floats must be finite, "
                          "below about 1.8e308); use a value such as 0.1, 2e-4 or 8/255",
                          params=(key,))
    return out


INT_MIN, INT_MAX = -(2**63), 2**63 - 1
"""Integer options must fit in a signed 64-bit integer (torch and numpy hold them as int64)."""
SEED_MAX = 2**63 - 1
"""Seeds lie in ``0 <= seed <= SEED_MAX``: what ``torch.Generator.manual_seed`` takes as given."""


def check_split_of(split: CheckSplit, val_size: int | str) -> HeldOutSplit:
    """The split of a run's per-epoch check (which chooses ``best.pt``): ``eval.split``, with
    ``auto`` read as ``val`` when examples are held out (``data.val_size`` a count > 0, or
    ``auto`` before it is resolved), else ``test`` (runs started
    before held-out checks were the default)."""
    if split != "auto":
        return split
    return "val" if val_size != 0 else "test"


def check_at_least(key: str, value: int | None, minimum: int = 1) -> None:
    """ConfigError naming option ``key`` unless ``value`` (when given) is >= ``minimum``; the
    one check of a count such as ``n_examples``, ``batch_size`` or ``workers``."""
    if value is not None and value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}", params=(key,))


def check_int(key: str, value: int) -> int:
    """``value`` if it fits the range of option ``key``, else a ConfigError saying the range.

    Keys ending in ``seed`` (``seed``, ``data.subset_seed``) take ``0 <= seed < 2**63``:
    negative seeds are rejected rather than mapped to some other seed, so one number names one
    run; every other integer must fit in 64 bits.
    """
    if key.rsplit(".", 1)[-1].endswith("seed"):
        if not 0 <= value <= SEED_MAX:
            raise ConfigError(f"{key}: {value} is out of range; a seed is an integer with "
                              "0 <= seed < 2**63 (9223372036854775808)", params=(key,))
    elif not INT_MIN <= value <= INT_MAX:
        raise ConfigError(f"{key}: {value} does not fit in 64 bits; use an integer with "
                          f"|{key}| < 2**63", params=(key,))
    return value


def _where(path: str) -> str:
    return f"under {path}" if path else "at the top level"


OVERRIDES = "overrides"
"""The source named in messages about :func:`load_config`'s ``overrides`` (its parameter)."""


def _source_params(source: str) -> tuple[str, ...]:
    """The parameter a message's ``source`` is: only ``overrides`` (a file's path or a key is
    not one, and a generic ``config`` would say a front end's config option wrongly)."""
    return (OVERRIDES,) if source == OVERRIDES else ()


def check_keys(data: Any, path: str = "", source: str = "config") -> None:
    """ConfigError unless every mapping key in ``data`` (nested in mappings and lists) is a string.

    YAML reads ``1: 2``, ``true: x`` or ``null: x`` as an int, bool or None key, which no
    option is named; the message names the key and where it is.
    """
    if isinstance(data, dict):
        for k, v in data.items():
            if not isinstance(k, str):
                raise ConfigError(
                    f"{source}: key {k!r} {_where(path)} is not a name; option keys are "
                    "strings such as epochs (quote it if you meant the text, e.g. '1':)",
                    params=_source_params(source)
                )
            check_keys(v, f"{path}.{k}" if path else k, source)
    elif isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            check_keys(v, f"{path}[{i}]", source)


@dataclass
class DataConfig:
    """Where the data comes from and how it is split and augmented.

    ``val_size``: training examples held out for the per-epoch check (and best.pt): a count,
    0 for none, or ``auto`` (default): 10% of the training examples, at most 1000, and none
    when ``eval.split`` is ``test``. A run records the count it used in its config.yaml.
    ``image_size``: the side ``imagefolder`` images are resized to; datasets of a fixed size
    refuse any other.
    """

    data_dir: str | None = None
    download: bool = False
    train_subset: int | None = None
    subset_seed: int = 0
    augment: bool = True
    val_size: int | AutoSize = "auto"
    image_size: int | None = None


@dataclass
class OptimConfig:
    """SGD and its learning-rate schedule (``schedule``: multistep | cosine | constant).

    ``gamma`` is the multistep factor applied at every milestone, or a list with one factor per
    milestone (Sokolić et al.'s 0.01 → 0.001 → 0.0005 is ``milestones: [34, 67]``,
    ``gamma: [0.1, 0.5]``).
    """

    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: Schedule = "multistep"
    milestones: list[int] = field(default_factory=list)
    gamma: float | list[float] = 0.1
    warmup_epochs: int = 0
    fused: bool = True


def finite_non_negative(key: str, value: Any) -> float:
    """``value`` as a float if it is a finite number >= 0, else a ConfigError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0 <= value < math.inf):  # also rejects nan
        raise ConfigError(f"{key} must be a finite number >= 0, got {value!r}", params=(key,))
    return float(value)


@dataclass(frozen=True)
class ThreatModel:
    """The threat model of an input attack, validated once here: every attack, the training
    config's ``attack:`` section, the evaluation options and the margins hold one.

    Defaults: CIFAR-10's L∞ ball of Madry et al. 2018 and Wei & Ma 2020, Appendix F.2.

    Attributes:
        norm: ``"linf"`` (default) or ``"l2"``.
        eps: radius in [0, 1] pixel units (default 8/255).
        step_size: α, the step of each iteration (default 2/255).
        steps: iterations K (default 10; 0 is allowed and leaves the start point).
        random_start: start from a uniform point of the eps-ball (default True).
        loss: ``"ce"`` (cross-entropy, default) or ``"cw"`` (margin max_{j≠y} z_j − z_y).

    Raises:
        ConfigError: a value outside its set or range, naming the field (the config loader
            prefixes ``attack.``).
    """

    norm: Norm = "linf"
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    random_start: bool = True
    loss: AttackLoss = "ce"

    def __post_init__(self) -> None:
        check_choice("norm", self.norm, Norm)
        check_choice("loss", self.loss, AttackLoss)
        # frozen: the one way to store the coerced floats
        object.__setattr__(self, "eps", finite_non_negative("eps", self.eps))
        object.__setattr__(self, "step_size", finite_non_negative("step_size", self.step_size))
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"steps must be an integer >= 0, got {self.steps!r}",
                              params=("steps",))
        if not isinstance(self.random_start, bool):
            raise ConfigError(f"random_start must be true or false, got {self.random_start!r}",
                              params=("random_start",))

    def replace(self, **changes: Any) -> ThreatModel:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class AllLayerOptions:
    """Robust AMO's δ ascent (Wei & Ma 2020, Sections 4–5, F.2): δ ← ρ·δ + η_δ·∇_δ ℓ.

    Validated once here for the method's ``method_args``, the joint attack and the robustness
    integration.

    Attributes:
        rho: ρ, δ's shrink factor per step (default 0.92).
        eta_delta: η_δ, δ's step size (default 6.4e-3; 0 gives Madry PGD training).
        delta_grad: ∇_δ of the batch-mean loss (``"mean"``, default, the authors' code) or of
            the batch-sum loss (``"sum"``: each example's step does not depend on the batch).

    Raises:
        ConfigError: a negative or non-finite ρ or η_δ, or an unknown ``delta_grad``.
    """

    rho: float = 0.92
    eta_delta: float = 6.4e-3
    delta_grad: DeltaGrad = "mean"

    def __post_init__(self) -> None:
        object.__setattr__(self, "rho", finite_non_negative("rho", self.rho))
        object.__setattr__(self, "eta_delta", finite_non_negative("eta_delta", self.eta_delta))
        check_choice("delta_grad", self.delta_grad, DeltaGrad)


@dataclass
class EvalConfig:
    """Per-epoch check on held-out examples: clean and PGD accuracy.

    ``n_examples``: how many examples of the split are checked, the first ones (called
    ``eval.examples`` up to robust-amo 0.2.0, a name still read with a warning: :data:`RENAMED`).
    ``split``: ``auto`` (default: the held-out training examples), ``val`` (the same, needs
    ``data.val_size`` > 0 or ``auto``) or ``test`` (the test split: only when you mean it,
    :data:`CheckSplit`);
    ``steps``/``restarts`` of the PGD used (its eps/norm/step are the training attack's;
    ``step_size`` may override).
    ``co_drop``: the catastrophic-overfitting guard (docs/methods.md, "Catastrophic overfitting
    guard"): a check whose robust accuracy fell by more than this fraction of the previous
    check's while the clean accuracy rose is flagged in the metrics and the log, once per run
    (default 0.5; 0 turns the guard off; a number in [0, 1)).
    """

    every: int = 1
    n_examples: int = 1000
    split: CheckSplit = "auto"
    steps: int = 10
    restarts: int = 1
    step_size: float | None = None
    batch_size: int = 256
    co_drop: float = 0.5


@dataclass
class LoggingConfig:
    """What a run logs besides metrics.jsonl: ``tensorboard`` writes RUN/tb (docs/config.md)."""

    tensorboard: bool = False


@dataclass
class TrainConfig:
    """Everything a training run needs; see ``configs/*.yaml`` and ``docs/config.md``.

    ``model``: your own architecture, ``FILE.py:FN`` or ``package.module:FN`` (loading it runs
    that code), instead of the registered ``arch``; ``model_points``: the module names of its
    perturbation points (default: its ``perturbation_points()``, else every Conv2d and Linear
    but the last Linear), as ``margins`` takes them.
    """

    arch: str = "tiny-cnn"
    dataset: str = "digits"
    method: str = "pgd"
    epochs: int = 10
    batch_size: int = 128
    seed: int = 0
    device: str = "auto"
    bf16: bool = True
    channels_last: bool = True
    cudnn_benchmark: bool = True
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: CompileMode | None = None
    out: str = "runs/default"
    log_every: int = 50
    init_weights: str | None = None
    model: str | None = None
    model_points: list[str] | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    attack: ThreatModel = field(default_factory=ThreatModel)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    method_args: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON friendly)."""
        return dataclasses.asdict(self)


def _check(value: Any, tp: Any, key: str) -> Any:
    """Validate (and lightly coerce) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return check_choice(key, value, tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(value, a, key)
            except ConfigError as e:
                # a list's own error (which item is bad) says more than "expected a number"
                if isinstance(value, (list, tuple)) == (typing.get_origin(a) is list):
                    errors.insert(0, str(e))
                else:
                    errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of options, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is float:
        return parse_float(value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return check_int(key, value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_check(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        check_keys(value, key)
        return dict(value)
    if tp is Any:
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types.

    A whole :class:`TrainConfig` mapping may hold the old names of :data:`RENAMED` (a config
    dict saved by an earlier version): they are read under the new names with a warning.
    """
    if cls is TrainConfig:
        data = rename_deprecated(data, "config")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    check_keys({k: None for k in data}, prefix.rstrip("."))
    unknown = sorted(set(data) - names)
    if unknown:
        key = prefix + unknown[0]
        shown = key if key.isprintable() else repr(key)  # a newline must not split the line
        raise ConfigError(
            f"unknown config key {shown}; valid keys here: "
            f"{', '.join(sorted(prefix + n for n in names))}"
        )
    kwargs = {k: _check(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # a dataclass validating itself names its own fields: say where they sit in the file
        if not prefix or not e.params or not str(e).startswith(e.params[0]):
            raise
        raise ConfigError(prefix + str(e), params=tuple(prefix + p for p in e.params)) from None


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: ``override`` wins, nested mappings merge key by key."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line from PyYAML's multi-line message: the problem and where it is."""
    said = [getattr(e, "context", None), getattr(e, "problem", None)]
    problem = "; ".join(t for t in said if t) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load``; one-line ConfigErrors for bad files.

    Raises:
        ConfigError: the path is missing or a directory, the file cannot be read, is not
            UTF-8 or not valid YAML, is empty (nothing, only comments, or ``null``: an empty
            file would silently train every default), is not a mapping, or has a key that is
            not a string. An explicit ``{}`` asks for the defaults and is accepted.
    """
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory; pass a YAML file, or a shipped "
                          "config by name such as quickstart")
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; shipped configs: {known_configs()}")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read ({e.strerror or e}); check its "
                          "permissions") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start}); save it as "
                          "UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {_yaml_problem(e)}") from None
    except RecursionError:
        raise ConfigError(f"config file {p} is nested too deeply to be a config") from None
    if data is None:
        raise ConfigError(f"config file {p} is empty; write options such as `epochs: 10` "
                          "(as the shipped configs do), or use no config file for the defaults")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys, got {type(data).__name__}")
    check_keys(data, source=f"config file {p}")
    return data


def known_configs() -> str:
    """The shipped configs' names as one line: each top-level name, then each subfolder with
    its number of configs (``sokolic_table1/NAME (36 configs)``)."""
    names = configs.config_names()
    folders: dict[str, int] = {}
    for n in names:
        if "/" in n:
            folder = n.split("/", 1)[0]
            folders[folder] = folders.get(folder, 0) + 1
    shown = [n for n in names if "/" not in n]
    shown += [f"{folder}/NAME ({count} configs)" for folder, count in folders.items()]
    return ", ".join(shown) or "none"


def config_path(name_or_path: str | Path) -> Path:
    """The YAML file that ``--config`` names: an existing path, else a shipped config by name.

    A path that exists wins (a directory too, which :func:`load_yaml` then refuses). Otherwise
    the name is looked up among the configs shipped with the package, from any folder:
    ``quickstart``, ``sokolic_table1/mnist_cnn2_256_ce_lm`` (``.yaml`` optional), or the
    repository path ``configs/quickstart.yaml``.

    Raises:
        ConfigError: neither a file nor a shipped name; the message lists the shipped names.
    """
    p = Path(name_or_path)
    if p.exists():
        return p
    found = configs.find_config(str(name_or_path))
    if found is not None:
        return found
    raise ConfigError(f"config {str(name_or_path)!r} does not exist: no such file and no shipped "
                      f"config of that name; give a YAML path or one of: {known_configs()}")


RENAMED: dict[str, str] = {"eval.examples": "eval.n_examples"}
"""Old config keys and their new names (same section): read with a warning for one version,
then unknown keys."""


def rename_deprecated(data: dict[str, Any], source: str = "config", *,
                      warn: bool = True) -> dict[str, Any]:
    """``data`` with every :data:`RENAMED` key under its new name; ``data`` itself is unchanged.

    Args:
        data: a config mapping (a file, an override, or a saved run's config).
        source: where it came from, for the messages.
        warn: log a warning naming the new key; a saved run's config is read quietly (runs
            written before the rename keep their old key and still resume).

    Raises:
        ConfigError: both the old and the new name are given.
    """
    out = data
    for old, new in RENAMED.items():
        *path, old_key = old.split(".")
        new_key = new.rsplit(".", 1)[-1]
        node: Any = out
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or old_key not in node:
            continue
        if new_key in node:
            raise ConfigError(f"{source}: {old} is the old name of {new}; give only {new}",
                              params=_source_params(source))
        if warn:
            log.warning("%s: config key %s is deprecated and will be refused in the next "
                        "version; call it %s", source, old, new)
        # copies along the path: the caller's mapping (a file's, a study's) stays as it was
        out = dict(out)
        node = out
        for part in path:
            node[part] = dict(node[part])
            node = node[part]
        node[new_key] = node.pop(old_key)
    return out


def parse_override(item: str) -> dict[str, Any]:
    """``"attack.eps=8/255"`` -> ``{"attack": {"eps": "8/255"}}`` (value read as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. attack.eps=8/255",
                          params=("override",))
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError):
        value = raw  # not YAML: the text itself (a string option, or a clear type error later)
    out: dict[str, Any] = {}
    cur = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def load_config(
    config_file: str | Path | None = None, overrides: list[dict[str, Any]] | None = None
) -> TrainConfig:
    """Defaults, then the YAML file, then each override mapping in order; schema-checked.

    ``config_file`` is a path or the name of a shipped config (:func:`config_path`); keys of
    :data:`RENAMED` are read under their new names with a warning.

    Use :func:`robust_amo.resolve.resolve` to also check the architecture, dataset and method
    options against their registries (what the CLI does).
    """
    data: dict[str, Any] = {}
    if config_file:
        path = config_path(config_file)
        data = rename_deprecated(load_yaml(path), f"config file {path}")
    for o in overrides or []:
        check_keys(o, source=OVERRIDES)
        data = merge(data, rename_deprecated(o, OVERRIDES))
    cfg = from_dict(TrainConfig, data)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Cross-field and range checks with messages naming the key and the allowed values.

    Closed sets of values are checked while the dataclasses are built (``Literal`` fields);
    the names that registries hold (``arch``, ``dataset``, ``method``) are checked by
    :func:`robust_amo.resolve.resolve`.
    """
    if cfg.device.split(":")[0] not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device: {cfg.device!r} is not one of auto, cpu, cuda")
    positive = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "log_every": cfg.log_every,
                "eval.batch_size": cfg.eval.batch_size, "eval.every": cfg.eval.every}
    for key, v in positive.items():
        if v < 1:
            raise ConfigError(f"{key} must be >= 1, got {v}")
    non_negative = {"optim.lr": cfg.optim.lr, "optim.weight_decay": cfg.optim.weight_decay,
                    "optim.momentum": cfg.optim.momentum,
                    "optim.warmup_epochs": cfg.optim.warmup_epochs,
                    "eval.n_examples": cfg.eval.n_examples}
    if cfg.data.val_size != "auto":
        non_negative["data.val_size"] = cfg.data.val_size
    if cfg.eval.step_size is not None:
        non_negative["eval.step_size"] = cfg.eval.step_size
    for key, v in non_negative.items():
        if not 0 <= v < math.inf:  # also rejects nan (and .inf written in YAML)
            raise ConfigError(f"{key} must be a finite number >= 0, got {v}")
    if cfg.eval.steps < 0 or cfg.eval.restarts < 1:
        raise ConfigError("eval.steps must be >= 0 and eval.restarts >= 1")
    if not 0 <= cfg.eval.co_drop < 1:  # also rejects nan
        raise ConfigError(f"eval.co_drop must be a fraction in [0, 1) (0 turns the "
                          f"catastrophic-overfitting guard off), got {cfg.eval.co_drop}")
    if isinstance(cfg.optim.gamma, list) and len(cfg.optim.gamma) != len(cfg.optim.milestones):
        raise ConfigError(
            f"optim.gamma: a list needs one factor per milestone, got {len(cfg.optim.gamma)} "
            f"factors for {len(cfg.optim.milestones)} milestones"
        )
    if cfg.data.image_size is not None and cfg.data.image_size < 1:
        raise ConfigError(f"data.image_size must be >= 1, got {cfg.data.image_size}")
    if cfg.eval.split == "val" and cfg.data.val_size == 0:
        raise ConfigError("eval.split: val needs data.val_size > 0 (or auto)")
    if cfg.model is None and cfg.model_points is not None:
        raise ConfigError("model_points: only a model of your own (model: FILE.py:FN) takes "
                          "perturbation points by name; drop it", params=("model_points",))
    if cfg.model is not None and cfg.model_kwargs:
        raise ConfigError(f"model_kwargs {cfg.model_kwargs} are options of a registered arch; "
                          f"your model {cfg.model} takes none (set them inside FN)",
                          params=("model_kwargs",))


def save_yaml(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config (fractions already turned into floats)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
