"""What a person watching a command sees: log lines and progress bars on stderr."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

_MODE = {"quiet": False, "stdout": True}


@contextmanager
def output(quiet: bool = False, stdout: bool = True) -> Iterator[None]:
    """`quiet`: no log lines or progress on stderr (errors still print); `stdout=False`: no human
    summary on stdout (`--json` prints one JSON object there instead)."""
    before = dict(_MODE)
    _MODE.update(quiet=quiet, stdout=stdout)
    try:
        yield
    finally:
        _MODE.update(before)


def log(*args) -> None:
    if not _MODE["quiet"]:
        print(*args, file=sys.stderr, flush=True)


def say(text: str) -> None:
    """A command's human-readable result on stdout."""
    if _MODE["stdout"]:
        print(text, flush=True)


class Progress:
    """A one-line progress bar with ETA on stderr (plain lines when not a terminal)."""

    def __init__(self, label: str):
        self.label, self.t0, self.last = label, time.perf_counter(), 0.0
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int, what: str = "", extra: str = "") -> None:
        if _MODE["quiet"]:
            return
        now = time.perf_counter()
        if done not in (0, total) and now - self.last < (0.2 if self.tty else 5.0):
            return
        self.last = now
        el = now - self.t0
        left = f"~{el / done * (total - done):.1f}s left" if done else "time left unknown yet"
        bar = "#" * int(24 * done / max(total, 1))
        line = f"{self.label} {what} [{bar:<24}] {done}/{total} {el:.1f}s elapsed, {left} {extra}".rstrip()
        if self.tty:
            sys.stderr.write("\r" + line[:150])
            if done == total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
