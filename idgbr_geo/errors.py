"""User-facing errors.

Anything a user can cause (bad path, wrong band count, existing output, ...) is raised as
:class:`UserError`; the CLI turns it into one line on stderr and a non-zero exit instead of a
traceback. Library callers can catch it like any other exception.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input or options, reported as one clear line."""


class InputError(UserError):
    """The input raster (or vector) cannot be used."""


class OutputError(UserError):
    """The output cannot be written (exists, folder missing, not writable)."""
