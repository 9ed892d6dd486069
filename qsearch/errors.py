"""The one error type users see: a one-line message, exit code 2, no traceback."""

from __future__ import annotations

import threading


class QsearchError(Exception):
    """Bad input or an impossible request. `str(err)` is the whole user-facing message."""

    exit_code = 2


class ConfigError(QsearchError):
    """A workload config or search space: unknown keys, bad values, missing files it names."""


class PlanError(QsearchError):
    """A plan file, its sidecar, or a plan that does not fit the model it is applied to."""


class ModelError(QsearchError):
    """An ONNX model (or a PyTorch factory) that cannot be loaded, prepared or run."""


class DataError(QsearchError):
    """Calibration, search or test data: wrong names, shapes, dtypes, NaN/Inf, empty."""


def as_kind(kind: type[QsearchError]):
    """A decorator: plain `QsearchError`s from shared helpers (YAML reading, key checks) raised
    inside the function come out as `kind`, so a caller can tell a config error from a plan error."""
    import functools

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except QsearchError as exc:
                if type(exc) is QsearchError:
                    raise kind(str(exc)) from None
                raise

        return inner

    return wrap


# Set by the command line's SIGINT/SIGTERM handler. The handler also raises KeyboardInterrupt, but
# a signal that lands inside a garbage-collector callback has its exception swallowed; long loops
# check this event at safe points so the interruption is never lost.
INTERRUPTED = threading.Event()


class Interrupted(KeyboardInterrupt):
    """Ctrl-C/SIGTERM, with what the interrupted stage kept (for the one-line message)."""

    def __init__(self, kept: str):
        super().__init__(kept)
        self.kept = kept
