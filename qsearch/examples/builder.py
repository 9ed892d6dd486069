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


def labelled_splits(out: Path, splits: dict[str, int], draw: Callable[[], tuple]) -> None:
    """One `name.npz` per split (`x`, int64 `label`) of `draw()`'s (input, label) pairs, in order."""
    import numpy as np

    for name, n in splits.items():
        xs, ys = zip(*(draw() for _ in range(n)))
        np.savez(out / f"{name}.npz", x=np.stack(xs), label=np.array(ys, np.int64))


def workload_yaml(comment: str, name: str, metric: str, max_drop: str, batch_size: int, latency_batch: int,
                  labels: bool = False, search_space: str = "cnn_cpu") -> str:
    """The config every example writes next to its model and npz splits."""
    lab = ", labels: label" if labels else ""
    return (f"# {comment}\nname: {name}\nmodel: model.onnx\ntarget: cpu\ndata:\n  batch_size: {batch_size}\n"
            f"  calibration: {{npz: calib.npz{lab}}}\n  search: {{npz: search.npz{lab}}}\n"
            f"  test: {{npz: test.npz{lab}}}\nmetric: {metric}\nmax_drop: {max_drop}\n"
            f"search_space: {search_space}\nruntime:\n  threads: 1\n  latency_batch: {latency_batch}\n")


def wheel_file(module: str, package: str, relative: str, what: str) -> Path:
    """A model file inside an installed wheel, or a one-line error saying which pip install is missing."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise QsearchError(f"the {what} workload needs the model's wheel: pip install {package}") from None
    return Path(mod.__file__).parent / relative
