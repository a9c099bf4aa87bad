"""Exceptions that reach users as one-line messages.

Every user-facing failure (bad argument, bad config, missing file) raises a subclass of
:class:`NtkLensError`. Its message is a single line that names the problem and the fix;
the CLI prints it without a traceback and exits with code 2.
"""

from __future__ import annotations


class NtkLensError(ValueError):
    """A user error: bad input, bad config or a missing resource."""


class ConfigError(NtkLensError):
    """A study config or run spec that cannot be run."""


class DataError(NtkLensError):
    """A dataset that is unknown, missing, corrupt or too small."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A dataset whose files are not on disk; the message says where to get them."""


def describe(error: BaseException) -> str:
    """``"TypeName: first line of its message"``, to quote a foreign error in one line."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
