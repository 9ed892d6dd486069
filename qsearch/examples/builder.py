"""What every example workload builder shares: a keyed cache folder and a small command line
that prints the workload path (so `--config "$(python -m qsearch.examples.NAME)"` works)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from qsearch.errors import QsearchError
from qsearch.files import atomic_write_text


def is_fresh(out: Path, key: str) -> bool:
    """The folder already holds a build made from exactly these inputs."""
    wl, k = out / "workload.yaml", out / "KEY"
    return wl.exists() and k.exists() and k.read_text() == key


def finish(out: Path, workload_yaml: str, key: str) -> Path:
    """Write the config, then the key last: an interrupted build is never taken as fresh."""
    atomic_write_text(out / "workload.yaml", workload_yaml)
    atomic_write_text(out / "KEY", key)
    return out / "workload.yaml"


def main(build: Callable[[Path, bool], Path], doc: str, default_out: Path, what: str = "build") -> None:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", type=Path, default=default_out)
    ap.add_argument("--force", action="store_true", help=f"{what} again even if cached")
    args = ap.parse_args()
    try:
        print(build(args.out, args.force))
    except QsearchError as exc:
        raise SystemExit(f"error: {exc}") from None
