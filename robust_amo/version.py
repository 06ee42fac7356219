"""The version of robust-amo (one place: the package, checkpoints and reports read it)."""

__version__ = "0.2.0"
