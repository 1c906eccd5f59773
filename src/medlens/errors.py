"""User-facing errors.

Every mistake a user can make (a bad file, an unknown model, a wrong option) is raised as a
``MedlensError``: the CLI prints its message on one line and exits non-zero, with no traceback.
The message names the file or key and says what to do.
"""

from __future__ import annotations


class MedlensError(Exception):
    """An error caused by input or configuration, reported to the user without a traceback."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")


class DataError(MedlensError):
    """A file or data set that cannot be read or used (names the file)."""


class ConfigError(MedlensError):
    """An unknown recipe, model, option or value."""
