"""The version of robust-amo (one place: the package, checkpoints and reports read it)."""

from __future__ import annotations

__version__ = "0.2.0"

SPLITS_SINCE = (0, 2, 0)
"""The first version whose ``train_subset`` and held-out draws this one reproduces (0.2.0 seeds
them through ``derive_seed``): a run written before cannot be resumed or re-split exactly.
``robust_amo.data.check_split_version`` is the one place that compares against it."""


def version_tuple(text: object) -> tuple[int, ...]:
    """``"0.2.0"`` -> (0, 2, 0); a missing or unreadable version -> (0,)."""
    try:
        return tuple(int(p) for p in str(text).split(".")[:3])
    except ValueError:
        return (0,)
