"""`qsearch show` and `qsearch diff` on a 10,000-layer plan, end to end as a user runs them (the
YAML read included): median of 5 runs each, and how the time splits between reading and rendering.
Writes review_10k.md.

    python experiments/bench_review.py [--layers 10000]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent


def synthetic(n: int, changed: int = -1):
    from qsearch.plan.format import LayerChoice, LayerNote, Plan

    layers = {f"conv_{i}": LayerChoice("int8", "minmax", "per_channel") for i in range(n)}
    if changed >= 0:
        layers[f"conv_{changed}"] = LayerChoice("fp32")
    ranges = {f"t{i}": (-1.0, 1.0 + (i == changed)) for i in range(n + 1)}
    notes = {f"conv_{i}": LayerNote("Conv", f"blocks.{i}.conv", "sensitivity rank 1/1", True, (f"t{i}", f"t{i + 1}"))
             for i in range(n)}
    return Plan("model", "sha256:0", layers=layers, ranges=ranges, notes=notes)


def timed(fn, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=10000)
    args = ap.parse_args()
    from qsearch import api
    from qsearch.plan.io import read_plan

    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp, "a.yaml"), Path(tmp, "b.yaml")
        synthetic(args.layers).write(a)
        synthetic(args.layers, changed=args.layers // 2).write(b)
        read = timed(lambda: read_plan(a))
        show = timed(lambda: api.show(a))
        diff = timed(lambda: api.diff(a, b))
    lines = [f"# show and diff on a {args.layers}-layer plan ({date.today()}, {platform.machine()})", "",
             "Median of 5 runs, the YAML read included (as `qsearch show` / `qsearch diff` run).", "",
             "| step | seconds |", "|---|---:|", f"| read one plan | {read:.2f} |", f"| show (read + table) | {show:.2f} |",
             f"| diff (read two + compare) | {diff:.2f} |"]
    (HERE / "review_10k.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
