"""int16 on an NPU target: the same workload, `target: npu`, the same budget, searched twice:
INT8/int16/FP16 (the shipped `npu` search space) against INT8/FP16 (the same space without int16).
Both cost bit-operations (MACs x weight bits x activation bits) plus a charge per int8/int16
conversion; accuracy is this CPU's ONNX Runtime with Q/DQ unfused (what the QDQ graph says, as an
NPU's integer arithmetic computes). Also scored: all-INT8 and all-int16 at MinMax. Writes
int16_<workload>.md.

    python experiments/bench_int16.py --workload minilm --budget 30
    python experiments/bench_int16.py --workload ocr_rec --budget 30
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_engines import optimize  # noqa: E402  (runs `qsearch optimize`, keeps its logs)

SPACES = {"int8/int16/fp16": "[int8, int16, float]", "int8/fp16": "[int8, float]"}


def config(workload: str, name: str, precision: str, max_drop: str | None = None) -> Path:
    """The workload's config as built, retargeted to `npu`: its own search space (the shipped `npu`
    space's settings on the workload's candidates: a transformer's MatMuls, a CNN's layers) with
    these precisions and int8 weight codes."""
    src = Path(importlib.import_module(f"qsearch.examples.{workload}").build())
    text = re.sub(r"^target:.*\n", "", src.read_text(), flags=re.M)
    m = re.search(r"^search_space: *(\w+) *$", text, flags=re.M)
    base = m.group(1) if m else "default"
    text = re.sub(r"^search_space:.*\n(?:[ \t]+.*\n)*", "", text, flags=re.M)
    if max_drop is not None:
        text = re.sub(r"^max_drop:.*$", f"max_drop: {max_drop}", text, flags=re.M)
    out = src.parent / f"workload-npu-{name.replace('/', '-')}{'-' + max_drop if max_drop else ''}.yaml"
    out.write_text(text + f"target: npu\nsearch_space: {{extends: {base}, precision: {precision}, weights: [int8]}}\n")
    return out


def row(bench, evaluator, name: str, plan, seconds: float | None = None, evals: str = "") -> str:
    from qsearch.evaluator import bitops, border_bitops

    search = evaluator.evaluate(plan, "search", timing=False)
    test = evaluator.evaluate(plan, "test", timing=False)
    counts = {p: sum(plan.choice(la.name).precision == p for la in bench.candidates()) for p in ("int8", "int16", "fp16")}
    fp16 = sum(plan.choice(la.name).precision == "fp16" for la in bench.prepared.layers)
    ok = "yes" if max(search.drop, test.drop) <= bench.allowed_drop() + 1e-12 else "no"
    return (f"| {name} | {search.score:.4f} ({search.drop:+.4f}) | {test.score:.4f} ({test.drop:+.4f}) | {ok} | "
            f"{bitops(bench, plan):.4g} | {border_bitops(bench.prepared, plan):.3g} | {counts['int8']} | "
            f"{counts['int16']} | {counts['fp16']} ({fp16}) | {evals} | {'' if seconds is None else f'{seconds / 60:.1f}'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", required=True)
    ap.add_argument("--budget", type=int, default=30)
    ap.add_argument("--max-drop", help="the workload's budget replaced (e.g. 0.001)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/qsearch-bench-int16"))
    args = ap.parse_args()
    from qsearch.config import load_workload
    from qsearch.engine import isa
    from qsearch.evaluator import Evaluator
    from qsearch.plan.io import read_plan
    from qsearch.workbench import open_workbench

    runs = {}
    for name, space in SPACES.items():
        cfg = config(args.workload, name, space, args.max_drop)
        out = args.out / f"{args.workload}{args.max_drop or ''}" / name.replace("/", "-")
        out.mkdir(parents=True, exist_ok=True)
        runs[name] = (cfg, out, optimize(cfg, out, args.budget))
    cfg = runs["int8/int16/fp16"][0]
    bench = open_workbench(load_workload(cfg), cache_dir=args.out / f"{args.workload}{args.max_drop or ''}" / "cache",
                           log=lambda *a: None)
    ev = Evaluator(bench)
    cands = bench.candidates()
    lines = [
        f"# int16 on an NPU target: {args.workload}",
        "",
        f"{date.today()}, `python experiments/bench_int16.py --workload {args.workload} --budget {args.budget}"
        + (f" --max-drop {args.max_drop}" if args.max_drop else "") + "`. "
        f"Machine: {isa.detect().describe()}; ONNX Runtime with Q/DQ unfused (target npu scores the QDQ graph as "
        "written). Budget: drop <= "
        f"{bench.allowed_drop():g} ({bench.workload.metric.name}). Cost: GBOPs per sample, MACs x weight bits x "
        "activation bits (int8 8x8, int16 8x16, FP16 16x16), plus 16x16 bit-operations per element of each "
        "int8/int16 conversion (its column). Layers: the search's candidates; FP16 in brackets counts every "
        "layer, candidates or not.",
        "",
        "| plan | search (drop) | test (drop) | within budget on both | GBOPs | of which conversions | INT8 | "
        "int16 | FP16 | evaluations | minutes |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        row(bench, ev, "FP16 everywhere", bench.plan({})),
        row(bench, ev, "all-INT8 (MinMax, per-channel)", bench.plan({la.name: "int8/minmax/per_channel" for la in cands})),
        row(bench, ev, "all-int16 (MinMax, per-channel)", bench.plan({la.name: "int16/minmax/per_channel"
                                                                       for la in cands})),
    ]
    for name, (_, out, seconds) in runs.items():
        log = (out / "stdout.log").read_text() + (out / "stderr.log").read_text()
        m = re.search(r"Model evaluations: (\d+)", log)
        plan = read_plan(out / "plan.yaml")
        lines.append(row(bench, ev, f"qsearch, {name}", plan, seconds, m.group(1) if m else ""))
    lines.append("")
    suffix = f"_budget_{args.max_drop}" if args.max_drop else ""
    (HERE / f"int16_{args.workload}{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
