"""Where the time goes: ONNX Runtime's per-node profile of FP32, qsearch's all-INT8 model and ORT's
own all-INT8 model (quantize_static, QDQ, MinMax), grouped by op type and by kind of work.

Explains, per node kind, why INT8 does or does not pay on a model. Profiles are taken in
interleaved rounds (FP32, qsearch, ORT, FP32, ...) and each op's best round is kept.
Writes attribution_<workload>.md.

    python experiments/bench_attribution.py --workload orientation
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_peers import context, ort_static, require  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=["digits", "minilm", "orientation", "ocr_det"], default="orientation")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    require(args.workload)
    from qsearch.analysis import profiling
    from qsearch.scoring import fusion_check

    ctx = context(args.workload, None)
    models = {
        "FP32": ctx.prepared.proto,
        "qsearch all-INT8 (minmax, per-channel)": ctx.rewriter(ctx.uniform_plan("minmax", "per_channel")),
        "ORT quantize_static all-INT8 (MinMax, per-channel)": ort_static(ctx, "MinMax", True).model,
    }
    best: dict[str, profiling.LatencyProfile] = {}
    for _ in range(args.rounds):
        for name, m in models.items():
            p = profiling.profile(ctx.prepared, m, ctx.latency_feed, ctx.engine, runs=5)
            if name not in best or p.total_ms < best[name].total_ms:
                best[name] = p
    ops = sorted({op for p in best.values() for op in p.by_op}, key=lambda o: -max(p.by_op.get(o, 0) for p in best.values()))
    names = list(models)
    lines = [f"# Latency attribution on `{ctx.workload.name}` ({date.today()}, {platform.machine()}, {os.cpu_count()} "
             f"cores, ONNX Runtime {__import__('onnxruntime').__version__}, 1 thread, batch {ctx.workload.latency_batch})",
             "", f"Per-node kernel time from ONNX Runtime's profiler, mean of 5 runs, best of {args.rounds} interleaved "
             "rounds. Fusion: int8 kernels and Q/DQ nodes left after ORT's optimizer.", "",
             "| op | " + " | ".join(f"{n} ms" for n in names) + " |", "|---|" + "---:|" * len(names)]
    for op in ops:
        lines.append(f"| {op} | " + " | ".join(f"{best[n].by_op.get(op, 0.0):.2f}" for n in names) + " |")
    lines.append("| **total** | " + " | ".join(f"**{best[n].total_ms:.2f}**" for n in names) + " |")
    lines += ["", "| kind | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for k in profiling.KINDS:
        lines.append(f"| {k} | " + " | ".join(f"{best[n].by_kind[k]:.2f}" for n in names) + " |")
    lines.append("| fusion | " + " | ".join(fusion_check(models[n]).line() for n in names) + " |")
    text = "\n".join(lines) + "\n"
    (HERE / f"attribution_{args.workload}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
