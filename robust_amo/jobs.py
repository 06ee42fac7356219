"""Typed requests for a worker process (``python -m robust_amo.worker REQUEST.json``).

A study runner starts each job as its own process (in parallel, each with its own thread
limit, stopped with SIGTERM); what the process should do travels as one of these dataclasses
written as JSON, not as a command line whose flag spellings the runner would have to copy. The
file holds ``kind`` (which request) and the dataclass's fields; reading it back checks every key
and type, so a hand-edited or stale file is a one-line error, and JSON runs no code.

A new kind of job is one dataclass here (with its ``KIND``, listed in :data:`REQUESTS`) and one
function in :mod:`robust_amo.worker`.

An evaluation is described by :class:`robust_amo.evaluation.EvalRequest`, which lives in a higher
tier than this module; :class:`EvalJobRequest` therefore carries it as the plain dict of
``EvalRequest.to_dict()``, and the worker hands that dict to ``evaluate_checkpoint``, which checks
its keys and values (one definition of the evaluation's fields, not a copy here).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .errors import ConfigError


@dataclass(frozen=True)
class TrainRequest:
    """Train the run a resolved config file describes (what ``robust-amo train --config``
    does), with the machine-specific settings a study chooses at run time."""

    KIND: ClassVar[str] = "train"

    config: str
    """The run's config file (its ``out`` names the run folder)."""
    resume: bool = False
    """Continue the run in the folder (it holds a checkpoint or metrics)."""
    device: str = "auto"
    """``auto``, ``cpu`` or ``cuda``."""
    data_dir: str | None = None
    """Where the dataset lies, when not the config's."""
    progress: bool = False
    """Progress bars (off in a log file)."""


@dataclass(frozen=True)
class EvalJobRequest:
    """Evaluate a checkpoint (what ``robust-amo eval`` does): the evaluation's fields as
    :meth:`robust_amo.evaluation.EvalRequest.to_dict` writes them."""

    KIND: ClassVar[str] = "eval"

    evaluation: dict[str, Any]
    """``EvalRequest.to_dict()``: checked by ``evaluate_checkpoint`` when the worker runs it."""


Request = TrainRequest | EvalJobRequest
"""Any request a worker runs."""

REQUESTS: dict[str, type[TrainRequest] | type[EvalJobRequest]] = {
    TrainRequest.KIND: TrainRequest, EvalJobRequest.KIND: EvalJobRequest}
"""Each request class by its ``kind``."""


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value has the field's type (``X | None``, ``dict[str, Any]``, ``str``)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    return isinstance(value, typing.get_origin(hint) or hint)


def write_request(request: Request, path: str | Path) -> Path:
    """Write ``request`` as JSON to ``path`` (``{"kind": ..., FIELD: VALUE, ...}``)."""
    p = Path(path)
    p.write_text(json.dumps({"kind": request.KIND, **dataclasses.asdict(request)}, indent=1)
                 + "\n")
    return p


def read_request(path: str | Path) -> Request:
    """The request a file holds, every key and type checked.

    Raises:
        ConfigError: the file is missing or not JSON, its ``kind`` is unknown, or a key is
            unknown, missing or of the wrong type.
    """
    p = Path(path)
    try:
        data: Any = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"request {p}: cannot read it as JSON ({e}); write it with "
                          "robust_amo.jobs.write_request") from None
    if not isinstance(data, dict):
        raise ConfigError(f"request {p}: expected a JSON object, got {type(data).__name__}")
    kind = data.pop("kind", None)
    if kind not in REQUESTS:
        raise ConfigError(f"request {p}: unknown kind {kind!r}; known kinds: "
                          f"{', '.join(sorted(REQUESTS))}")
    cls = REQUESTS[kind]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"request {p}: unknown key(s) {', '.join(unknown)} for kind {kind!r}; "
                          f"known keys: {', '.join(fields)}")
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING:
                raise ConfigError(f"request {p}: key {name!r} is missing")
            continue
        if not _matches(data[name], hints[name]):
            raise ConfigError(f"request {p}: {name} must be {hints[name]}, got "
                              f"{data[name]!r}")
    return cls(**data)
