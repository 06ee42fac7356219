"""User-facing errors.

Every problem caused by the user's input (an unknown architecture, a bad config key, missing data,
a broken checkpoint) raises a subclass of :class:`RobustAmoError` whose message names the problem
and the fix. The CLI turns these into one line on stderr and exit code 2, never a traceback.
"""


class RobustAmoError(Exception):
    """Base class of errors that the user can fix."""


class ConfigError(RobustAmoError, ValueError):
    """A config key or value is unknown or has the wrong type."""


class UnknownModelError(RobustAmoError, KeyError):
    """The requested architecture is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DataError(RobustAmoError, FileNotFoundError):
    """A dataset could not be found or read."""


class CheckpointError(RobustAmoError):
    """A checkpoint is missing, truncated or incompatible."""
