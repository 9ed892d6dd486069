"""Quantization-aware training (`qsearch finetune`): the naive all-INT8 MinMax plan without
recovery (`qsearch baseline naive --calibration minmax --granularity per_tensor`), fine-tuned;
on the default CNN with learned and with fixed activation ranges and another learning rate; on
other workloads at the given settings, beside the same plan with PTQ recovery (smoothing or
equalization, plus learned rounding). PTQ and QAT scores on search and test, minutes, and the
QDQ models' latency in interleaved rounds in this run. Writes qat_<workload>.md.

    python experiments/bench_qat.py
    python experiments/bench_qat.py --workload minilm --lr 1e-4 --epochs 8 --recovery smooth+round
    python experiments/bench_qat.py --workload ocr_det_lines --granularity per_channel --epochs 4 --recovery cle+bias+round
"""

from __future__ import annotations

import argparse
import importlib
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
    ap.add_argument("--workload", default="digits")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--granularity", default="per_tensor")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=None)
    ap.add_argument("--recovery", default=None, help="the PTQ recovery to compare with at the same plan")
    args = ap.parse_args()
    import onnx

    import qsearch
    from qsearch.commands import open_bench
    from qsearch.progress import output

    args.out = args.out or Path(f"/tmp/qsearch-bench-qat-{args.workload}")
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = None if args.workload == "digits" else importlib.import_module(f"qsearch.examples.{args.workload}").build()
    naive = args.out / "naive.yaml"
    with output(quiet=True):
        qsearch.baseline("naive", cfg, out=args.out, output=naive, method="minmax", granularity=args.granularity)
    runs = RUNS if args.workload == "digits" else [(
        f"lr {args.lr or 1e-3:g}, up to {args.epochs or 30} epochs",
        {k: v for k, v in (("lr", args.lr), ("epochs", args.epochs), ("timeout", args.timeout)) if v is not None})]
    rows, models = [], {}
    for label, kw in runs:
        t0 = time.perf_counter()
        with output(quiet=True):
            r = qsearch.finetune(cfg, plan=naive, out=args.out / f"run{len(rows)}", **kw)
        rows.append((label, r, time.perf_counter() - t0))
        models[label] = onnx.load(args.out / f"run{len(rows) - 1}" / "model.qsearch.onnx")
    with output(quiet=True):
        bench = open_bench(cfg, args.out)
    ptq = {"naive PTQ": qsearch.apply(naive, bench.workload.model)}
    recovered = None
    if args.recovery:
        t0 = time.perf_counter()
        with output(quiet=True):
            plan = qsearch.baseline("naive", cfg, out=args.out, output=args.out / "recovered.yaml", method="minmax",
                                    granularity=args.granularity, recovery=args.recovery)
        recovered = (args.recovery, plan, time.perf_counter() - t0)
        ptq[f"PTQ + {args.recovery}"] = qsearch.apply(plan, bench.workload.model)
    sessions = {"FP32": bench.engine.session(bench.prepared.proto),
                **{k: bench.engine.session(m) for k, m in ptq.items()},
                **{label: bench.engine.session(m) for label, m in models.items()}}
    timing = interleaved(bench.engine, sessions, bench.latency_feed)
    write(args, rows, timing, bench, recovered)


def write(args, rows, timing, bench, recovered=None) -> None:
    from qsearch.evaluator import Evaluator

    r0 = rows[0][1]
    budget = bench.allowed_drop()
    metric = bench.workload.metric.name
    lines = [f"# QAT on {bench.prepared.name} ({date.today()})", "",
             f"Machine: {cpu_flags()}, 1 ONNX Runtime thread. Plan: the naive {args.granularity.replace('_', '-')} "
             f"MinMax plan without recovery, every candidate layer INT8 ({sum(c.quantized for c in r0.plan.layers.values())}"
             f" of {len(r0.plan.layers)} layers). Budget: {budget:.4g} {metric} on test. Training data: the "
             "calibration and search inputs (no labels; distillation from FP32); early stopping on the search "
             f"split's {metric} of the exported QDQ model.", "",
             f"FP32 test {metric} {r0.fp32_test:.4f} (search {r0.fp32_search:.4f}); naive PTQ test {r0.ptq_test:.4f} "
             f"(drop {r0.fp32_test - r0.ptq_test:.4f}; search drop {r0.fp32_search - r0.ptq_search:.4f}).", ""]
    if recovered is not None:
        name, plan, seconds = recovered
        ev = Evaluator(bench)
        s, t = ev.evaluate(plan, "search", timing=False).score, ev.evaluate(plan, "test", timing=False).score
        lines += [f"The same plan with PTQ recovery `{name}` (no training): search {s:.4f} (drop "
                  f"{r0.fp32_search - s:.4f}), test {t:.4f} (drop {r0.fp32_test - t:.4f}), {seconds / 60:.2f} minutes "
                  "to build.", ""]
    lines += ["| fine-tuning | best epoch (stopped) | QAT search | QAT test | test drop | within budget | minutes | "
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
    (HERE / f"qat_{args.workload}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
