"""User-facing errors.

Every problem caused by the user's input (an unknown architecture, a bad config key, missing data,
a broken checkpoint) raises a subclass of :class:`RobustAmoError` whose message names the problem
and the fix. The CLI turns these into one line on stderr and exit code 2, never a traceback.
"""


def one_line(text: str) -> str:
    """``text`` with every line break and other non-printable character escaped.

    Messages quote keys, values and file names from the user's input, which may hold a newline;
    the CLI's promise is one line per error, so the quoting happens here, once, for all of them.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class RobustAmoError(Exception):
    """Base class of errors that the user can fix; its message is always one line.

    Args:
        message: one line naming the problem and the fix, in the library's parameter names.
        params: the parameters the message names (the first occurrence of each as a word), so
            that a front end can say them its own way: the CLI writes ``--step-size`` for
            ``step_size`` (:func:`robust_amo.cli.common.flag_message`).
    """

    def __init__(self, *args: object, params: tuple[str, ...] = ()) -> None:
        super().__init__(*args)
        self.params = tuple(params)

    def __str__(self) -> str:
        return one_line(str(self.args[0]) if len(self.args) == 1 else super().__str__())


class ConfigError(RobustAmoError, ValueError):
    """A config key or value is unknown or has the wrong type."""


class UnknownModelError(RobustAmoError, KeyError):
    """The requested architecture is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return one_line(str(self.args[0]))


class DataError(RobustAmoError, FileNotFoundError):
    """A dataset could not be found or read."""


class CheckpointError(RobustAmoError):
    """A checkpoint is missing, truncated or incompatible."""


class OutputError(RobustAmoError):
    """An output folder cannot be written, or holds results that a command would overwrite."""
