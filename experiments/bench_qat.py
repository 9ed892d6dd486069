"""Quantization-aware training (`qsearch finetune`) on the embedded default CNN: the naive
per-tensor MinMax plan without recovery (`qsearch baseline naive --calibration minmax
--granularity per_tensor`), fine-tuned with learned and with fixed activation ranges and at the
command's defaults; PTQ and QAT test accuracy, minutes, and the QDQ models' latency against the
naive one in interleaved rounds in this run. Writes qat_digits.md.

    python experiments/bench_qat.py
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RUNS = [("defaults: learned ranges (LSQ-style), lr 1e-3, 30 epochs, patience 6", {}),
        ("fixed ranges (STE), otherwise the defaults", {"learn_ranges": False}),
        ("learned ranges, lr 1e-4 (10x lower)", {"lr": 1e-4})]


def cpu_flags() -> str:
    from qsearch.engine import isa

    return f"{platform.processor() or platform.machine()}, int8 path {isa.detect().name}"


def interleaved(engine, sessions: dict, feed, rounds: int = 6) -> dict[str, tuple[float, float]]:
    """Median ms per model over `rounds` interleaved rounds, and (max - min) / median across rounds."""
    per = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            per[k].append(engine.time(s, feed, repeat=30).wall_ms)
    return {k: (float(np.median(v)), (max(v) - min(v)) / float(np.median(v))) for k, v in per.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/qsearch-bench-qat"))
    args = ap.parse_args()
    import onnx

    import qsearch
    from qsearch.commands import open_bench
    from qsearch.progress import output

    args.out.mkdir(parents=True, exist_ok=True)
    naive = args.out / "naive.yaml"
    with output(quiet=True):
        qsearch.baseline("naive", out=args.out, output=naive, method="minmax", granularity="per_tensor")
    rows, models = [], {}
    for label, kw in RUNS:
        t0 = time.perf_counter()
        with output(quiet=True):
            r = qsearch.finetune(plan=naive, out=args.out / f"run{len(rows)}", **kw)
        rows.append((label, r, time.perf_counter() - t0))
        models[label] = onnx.load(args.out / f"run{len(rows) - 1}" / "model.qsearch.onnx")
    with output(quiet=True):
        bench = open_bench(None, args.out)
    naive_model = qsearch.apply(naive, bench.workload.model)
    sessions = {"FP32": bench.engine.session(bench.prepared.proto), "naive PTQ": bench.engine.session(naive_model),
                **{label: bench.engine.session(m) for label, m in models.items()}}
    timing = interleaved(bench.engine, sessions, bench.latency_feed)
    write(args, rows, timing, bench)


def write(args, rows, timing, bench) -> None:
    r0 = rows[0][1]
    budget = bench.workload.max_drop
    lines = [f"# QAT on the embedded default CNN ({date.today()})", "",
             f"Machine: {cpu_flags()}, 1 ONNX Runtime thread. Plan: the naive per-tensor MinMax plan without "
             f"recovery, every candidate layer INT8 ({sum(c.is_int8 for c in r0.plan.layers.values())} of "
             f"{len(r0.plan.layers)} layers). Budget: {budget} top-1 on test. Training data: the calibration and "
             "search inputs (no labels; distillation from FP32); early stopping on the search split's top-1 of "
             "the exported QDQ model.", "",
             f"FP32 test top-1 {r0.fp32_test:.4f}; naive PTQ test {r0.ptq_test:.4f} "
             f"(drop {r0.fp32_test - r0.ptq_test:.4f}).", "",
             "| fine-tuning | best epoch (stopped) | QAT search | QAT test | test drop | within budget | minutes | "
             "evaluations |", "|---|---:|---:|---:|---:|:-:|---:|---:|"]
    for label, r, seconds in rows:
        drop = r.fp32_test - r.qat_test
        lines.append(f"| {label} | {r.history.best.epoch} ({r.history.stopped}) | {r.qat_search:.4f} | "
                     f"{r.qat_test:.4f} | {drop:.4f} | {'yes' if drop <= budget else 'no'} | {seconds / 60:.2f} | "
                     f"{r.evaluations} |")
    fp32 = timing["FP32"][0]
    lines += ["", "Latency (latency batch, median of 6 interleaved rounds of 30 runs; spread = (max - min) / median "
              "across rounds):", "", "| model | ms | spread | speed-up over FP32 |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {ms:.3f} | ±{spread:.0%} | {fp32 / ms:.2f}x |" for k, (ms, spread) in timing.items()]
    (HERE / "qat_digits.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
