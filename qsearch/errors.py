"""The one error type users see: a one-line message, exit code 2, no traceback."""

from __future__ import annotations


class QsearchError(Exception):
    """Bad input or an impossible request. `str(err)` is the whole user-facing message."""

    exit_code = 2
