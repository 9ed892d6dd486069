"""OpenVINO against ONNX Runtime on one workload, in one run: `qsearch optimize` once per engine
(`runtime.engine`), then FP32, all-INT8 (MinMax, per-channel weights, this CPU's weight codes) and
both searched plans timed on both engines in interleaved rounds (median wall ms per round; the
spread across rounds). Says where the plans differ. Writes engines_<workload>.md.

    python experiments/bench_engines.py --workload orientation --budget 30
    python experiments/bench_engines.py --workload ocr_det_lines --budget 30
    python experiments/bench_engines.py --workload minilm --budget 30
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ENGINES = ("onnxruntime", "openvino")


def configs(workload: str) -> dict[str, Path]:
    """The workload's config as built, and a copy next to it naming the engine."""
    src = Path(importlib.import_module(f"qsearch.examples.{workload}").build())
    text = src.read_text()
    out = {}
    for engine in ENGINES:
        if re.search(r"^runtime:\s*\n", text, flags=re.M):  # a block mapping
            t = re.sub(r"^runtime:\s*\n", f"runtime:\n  engine: {engine}\n", text, count=1, flags=re.M)
        elif re.search(r"^runtime: \{", text, flags=re.M):
            t = re.sub(r"^runtime: \{", f"runtime: {{engine: {engine}, ", text, count=1, flags=re.M)
        else:
            t = text + f"runtime: {{engine: {engine}}}\n"
        out[engine] = src.parent / f"workload-engine-{engine}.yaml"
        out[engine].write_text(t)
    return out


def optimize(cfg: Path, out: Path, budget: int) -> float:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "qsearch", "optimize", "--config", str(cfg), "--budget", str(budget),
                        "--out", str(out)], capture_output=True, text=True)
    (out / "stderr.log").write_text(r.stderr)
    (out / "stdout.log").write_text(r.stdout)
    if r.returncode not in (0, 1):
        raise SystemExit(f"optimize on {cfg} failed ({r.returncode}): {r.stderr.strip().splitlines()[-1]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", required=True)
    ap.add_argument("--budget", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path("/tmp/qsearch-bench-engines"))
    ap.add_argument("--reuse", action="store_true", help="time the plans an earlier run wrote in --out again")
    args = ap.parse_args()
    import onnx

    from qsearch import engine as engines
    from qsearch.config import load_workload
    from qsearch.engine import isa
    from qsearch.plan.io import read_plan
    from qsearch.workbench import open_workbench

    cfgs = configs(args.workload)
    runs = {}
    for engine, cfg in cfgs.items():
        out = args.out / args.workload / engine
        out.mkdir(parents=True, exist_ok=True)
        reused = args.reuse and (out / "plan.yaml").exists()
        runs[engine] = (out, float("nan") if reused else optimize(cfg, out, args.budget))
    bench = open_workbench(load_workload(cfgs["onnxruntime"]), cache_dir=runs["onnxruntime"][0] / "cache",
                           log=lambda *a: None)
    plans = {e: read_plan(runs[e][0] / "plan.yaml") for e in ENGINES}
    models = {"FP32": bench.prepared.proto,
              "all-INT8": bench.rewriter(bench.uniform_plan("minmax", "per_channel")),
              **{f"plan searched on {e}": onnx.load(runs[e][0] / "model.qsearch.onnx") for e in ENGINES}}
    timing = {e: {k: [] for k in models} for e in ENGINES}
    runners = {e: engines.create(e, bench.workload.threads) for e in ENGINES}
    sessions = {e: {k: runners[e].session(m) for k, m in models.items()} for e in ENGINES}
    for _ in range(args.rounds):
        for e in ENGINES:
            for k in models:
                timing[e][k].append(runners[e].time(sessions[e][k], bench.latency_feed, repeat=20).wall_ms)
    write(args, bench, plans, runs, timing, isa.detect().name)


def write(args, bench, plans, runs, timing, path) -> None:
    lines = [f"# OpenVINO against ONNX Runtime: {bench.prepared.name} ({date.today()})", "",
             f"Machine: int8 path {path}, {bench.workload.threads} thread(s) per engine, latency batch "
             f"{bench.workload.latency_batch}. `qsearch optimize --budget {args.budget}` once per engine; every model "
             f"timed on both engines in {args.rounds} interleaved rounds (median wall ms of the round medians; "
             "spread = (max - min) / median across rounds).", "",
             "| model | ONNX Runtime ms (spread) | speed-up | OpenVINO ms (spread) | speed-up |", "|---|---:|---:|---:|---:|"]
    med = {e: {k: float(np.median(v)) for k, v in timing[e].items()} for e in ENGINES}
    for k in timing["onnxruntime"]:
        cells = []
        for e in ENGINES:
            v = timing[e][k]
            cells += [f"{med[e][k]:.3f} (±{(max(v) - min(v)) / med[e][k]:.0%})", f"{med[e]['FP32'] / med[e][k]:.2f}x"]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "| plan searched on | INT8 layers | test drop | search drop | optimize minutes |", "|---|---:|---:|---:|---:|"]
    for e in ENGINES:
        p, m = plans[e], plans[e].metrics
        n8 = sum(c.quantized for c in p.layers.values())
        drop = m.get("test_drop")
        sdrop = m["fp32"]["search"] - m["plan"]["search"] if "fp32" in m and "plan" in m else None
        lines.append(f"| {e} | {n8} of {len(p.layers)} | {drop if drop is None else f'{drop:.4f}'} | "
                     f"{sdrop if sdrop is None else f'{sdrop:.4f}'} | {runs[e][1] / 60:.1f} |")
    a, b = plans["onnxruntime"], plans["openvino"]
    differ = [n for n in a.layers if a.choice(n).precision != b.choice(n).precision]
    lines += ["", f"Layers whose precision differs between the two plans: {len(differ)}"
              + (f" ({', '.join(differ[:12])}{' ...' if len(differ) > 12 else ''})" if differ else "") + "."]
    (HERE / f"engines_{args.workload}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
