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
    """A command's human-readable result on stdout; on a terminal drawn by `rich` (the tables'
    header and rules, INT8 and float cells in colour), elsewhere plain text."""
    if not _MODE["stdout"]:
        return
    if not sys.stdout.isatty():
        print(text, flush=True)
        return
    from rich.console import Console
    from rich.text import Text

    out = Text(text, no_wrap=True)
    for pattern, style in ((r"(?m)^#  .*$|^layer  .*$|^\| plan .*$", "bold"), (r"(?m)^[-| ]*-{3,}[-| ]*$", "dim"),
                           (r"\bint8\b", "green"), (r"\b(fp32|fp16)\b", "bright_black"), (r"\(same\)", "dim")):
        out.highlight_regex(pattern, style)
    Console(highlight=False, soft_wrap=True).print(out)


class Progress:
    """Progress of one stage on stderr: on a terminal a live `rich` display (the stage's step,
    done/total, elapsed, ETA, the best plan so far), one bar per step; elsewhere plain lines
    (the first and last of a step, and one every 5 s), never a carriage return or a NaN."""

    def __init__(self, label: str):
        self.label, self.t0, self.last = label, time.perf_counter(), 0.0
        self.tty = sys.stderr.isatty()
        self._live = None  # rich.progress.Progress, started on the first update on a terminal
        self._tasks: dict[str, int] = {}

    def __call__(self, done: int, total: int, what: str = "", extra: str = "") -> None:
        if _MODE["quiet"]:
            return
        if self.tty:
            self._rich(done, total, what, extra)
            return
        now = time.perf_counter()
        if done not in (0, total) and now - self.last < 5.0:
            return
        self.last = now
        el = now - self.t0
        left = f", ~{el / done * (total - done):.0f} s left" if 0 < done < total else ""
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        sys.stderr.write(f"{self.label} {what}: {done}/{total}{pct}, {el:.1f} s elapsed{left}"
                         + (f"; {extra}" if extra else "") + "\n")
        sys.stderr.flush()

    def _rich(self, done: int, total: int, what: str, extra: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as Bars

        if self._live is None:
            self._live = Bars(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                              TextColumn("{task.fields[extra]}"), console=Console(stderr=True))
            self._live.start()
        key = what or self.label
        if key not in self._tasks:
            self._tasks[key] = self._live.add_task(f"{self.label} {what}".strip(), total=max(total, 1), extra=extra)
        self._live.update(self._tasks[key], completed=done, total=max(total, 1), extra=extra)
        if done >= total and all(t.finished for t in self._live.tasks):
            self._live.stop()
            self._live, self._tasks = None, {}
