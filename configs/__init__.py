"""The shipped configs and study files, found by name from any folder.

``configs/`` is package data of ``robust_amo.configs`` (pyproject's package-dir), so a wheel
install carries the quickstart, the paper configs and the study files. A config's name is its
path under this folder without ``.yaml``: ``quickstart``,
``sokolic_table1/mnist_cnn2_256_ce_lm``; a study's name is its file name in ``studies/``:
``sokolic-table1``.

This module only finds files; :func:`robust_amo.config.config_path` turns an unknown name into a
ConfigError that lists the names.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path, PurePosixPath

SUFFIXES = (".yaml", ".yml")
STUDIES = "studies"
"""The subfolder of study files; its files are no training configs."""


def root() -> Path:
    """The folder holding the shipped configs (inside the installed package)."""
    here = resources.files(__name__)
    return here if isinstance(here, Path) else Path(str(here))


def _names(folder: Path) -> list[str]:
    found = [f for f in folder.rglob("*") if f.suffix in SUFFIXES and f.is_file()]
    return sorted(f.relative_to(folder).with_suffix("").as_posix() for f in found)


def config_names() -> list[str]:
    """Every shipped training config by name, subfolders included, studies excluded."""
    return [n for n in _names(root()) if not n.startswith(f"{STUDIES}/")]


def study_names() -> list[str]:
    """Every shipped study by name (the file names in ``studies/``)."""
    return [n for n in _names(root() / STUDIES) if "/" not in n]


def _lookup(folder: Path, name: str) -> Path | None:
    """``folder/name`` with or without a YAML suffix, if it is a file inside ``folder``."""
    rel = PurePosixPath(name.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        return None  # a name never leaves the shipped folder
    stem = rel.with_suffix("") if rel.suffix in SUFFIXES else rel
    for suffix in SUFFIXES:
        cand = folder.joinpath(*stem.parts).with_suffix(suffix)
        if cand.is_file():
            return cand
    return None


def find_config(name: str) -> Path | None:
    """The shipped config called ``name`` (``quickstart``, ``sokolic_table1/...``), else None.

    A leading ``configs/`` is dropped, so the repository paths the docs show
    (``configs/quickstart.yaml``) name the shipped file from any folder.
    """
    rel = name.replace("\\", "/")
    rel = rel[len("configs/"):] if rel.startswith("configs/") else rel
    if rel.startswith(f"{STUDIES}/"):
        return None
    return _lookup(root(), rel)


def find_study(name: str) -> Path | None:
    """The shipped study file called ``name`` (``sokolic-table1``), else None."""
    return _lookup(root() / STUDIES, name)
