"""One worker against two on one study: wall time of analysis + search (`qsearch optimize` in
separate processes on the same --out, SQLite storage), in the same run, alternating.

Calibration (by tensor), the proxy passes (by method and half of the layers), the latency profile
and the screen are split through the study's job queues, the trials through Optuna's shared study;
each worker still prepares the model and scores FP32 itself, and each writes the result (the final
stage is not split: it times the finalists side by side in one process). Writes workers_<workload>.md.

    python experiments/bench_workers.py --workload orientation --budget 20 50
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_peers import require  # noqa: E402


def run(config: str, budget: int, workers: int) -> tuple[float, list[float]]:
    """Wall time until every worker finished its search (report excluded), and per-worker analysis+search."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "qsearch", "optimize", "--budget", str(budget), "--out", out, "--config", config]
        t0 = time.perf_counter()
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(workers)]
        spans = []
        for p in procs:
            o, e = p.communicate()
            if p.returncode != 0:
                raise SystemExit(e[-2000:])
            m = re.search(r"analysis ([\d.]+)s, search ([\d.]+)s", o)
            spans.append(float(m.group(1)) + float(m.group(2)))
        return time.perf_counter() - t0, spans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=["digits", "orientation", "ocr_det"], default="orientation")
    ap.add_argument("--budget", type=int, nargs="+", default=[20, 50], help="trial budgets (one table row pair each)")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    require(args.workload)
    if args.workload == "digits":
        config = str(Path(__import__("qsearch").__file__).parent / "examples" / "digits" / "workload.yaml")
    else:
        import importlib

        config = str(importlib.import_module(f"qsearch.examples.{args.workload}").build())
    rows = []
    for budget in args.budget:
        for _ in range(args.rounds):
            for w in (1, 2):
                wall, spans = run(config, budget, w)
                rows.append((budget, w, wall, max(spans)))
    lines = [f"# One worker vs two on one study: `{args.workload}` ({date.today()}, {platform.machine()}, "
             f"{os.cpu_count()} cores, SQLite, {args.rounds} round(s) alternating 1 and 2 workers)", "",
             "| budget (trials) | workers | analysis + search s (slowest worker) | whole command s (incl. each worker's final stage) |",
             "|---:|---:|---:|---:|"]
    lines += [f"| {b} | {w} | {span:.1f} | {wall:.1f} |" for b, w, wall, span in rows]
    lines.append("")
    for budget in args.budget:
        one = min(r[3] for r in rows if r[:2] == (budget, 1))
        two = min(r[3] for r in rows if r[:2] == (budget, 2))
        whole = min(r[2] for r in rows if r[:2] == (budget, 2)) / min(r[2] for r in rows if r[:2] == (budget, 1))
        lines.append(f"Budget {budget}: two workers / one worker, analysis + search: **{two / one:.2f}x** the wall "
                     f"time (whole command incl. the final stage each worker repeats: {whole:.2f}x).")
    text = "\n".join(lines) + "\n"
    (HERE / f"workers_{args.workload}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
