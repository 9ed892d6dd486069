"""Time limits: one per model evaluation (a slow or hung metric) and one for the whole command
(`--timeout`).

A SIGALRM timer raises in the main thread wherever Python code runs, a hung user metric
included; inside one ONNX Runtime call it lands when that call returns (one batch). Limits nest:
the timer is armed for the earliest deadline on the stack. Off the main thread, or where the
platform has no SIGALRM, limits are not enforced (the command's own checks between trials stay).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


class EvaluationTimeout(Exception):
    """One evaluation ran past its limit: that trial fails and the search goes on."""


class CommandTimeout(BaseException):
    """The whole command ran past `--timeout`. A BaseException so that no library's
    `except Exception` (Optuna's trial catch included) swallows it; the CLI turns it into one line."""


@dataclass(frozen=True)
class _Limit:
    deadline: float
    message: str
    exc: type[BaseException]


_stack: list[_Limit] = []
_previous_handler = None


def enforced() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def _arm() -> None:
    if not _stack:
        signal.setitimer(signal.ITIMER_REAL, 0)
        return
    wait = min(x.deadline for x in _stack) - time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, max(wait, 1e-3))


def _fire(signum, frame) -> None:
    now = time.monotonic()
    expired = [x for x in _stack if x.deadline <= now + 1e-3]
    if not expired:  # an early tick: wait for the real deadline
        _arm()
        return
    # the command's deadline outranks an evaluation's that expired at the same moment
    hit = next((x for x in expired if x.exc is CommandTimeout), expired[0])
    # fire again shortly: a raise inside a GC callback or a __del__ is swallowed by Python, and the
    # limit would be lost. When the raise does unwind, `limit`'s exit re-arms for what is left.
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    raise hit.exc(hit.message)


MAX_SECONDS = 1e7  # about 115 days: longer limits mean no limit (the interval timer overflows near 1e9)


@contextmanager
def limit(seconds: float | None, message: str, exc: type[BaseException] = EvaluationTimeout) -> Iterator[None]:
    """Raise `exc(message)` if the body runs longer than `seconds` (None, <= 0, or more than the
    timer can hold, e.g. inf or 1e10: no limit)."""
    global _previous_handler
    if seconds is None or not 0 < seconds <= MAX_SECONDS or not enforced():
        yield
        return
    if not _stack:
        _previous_handler = signal.signal(signal.SIGALRM, _fire)
    entry = _Limit(time.monotonic() + seconds, message, exc)
    _stack.append(entry)
    _arm()
    try:
        yield
    finally:
        _stack.remove(entry)
        _arm()
        if not _stack:
            signal.signal(signal.SIGALRM, _previous_handler or signal.SIG_DFL)


def remaining(deadline: float | None) -> float | None:
    """Seconds left until a `time.monotonic()` deadline (None: unbounded; a passed one: a moment)."""
    return None if deadline is None else max(deadline - time.monotonic(), 1e-3)


class Stage:
    """Which stage a command is in, so a `--timeout` or interrupt message can say what was kept."""

    def __init__(self) -> None:
        self.name, self.kept = "setup", "nothing was written"
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, kept: str) -> None:
        now = time.perf_counter()
        self.seconds[self.name] = now - self.started
        self.name, self.kept, self.started = name, kept, now
