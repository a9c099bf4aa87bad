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
