"""All-INT8 parity: qsearch's all-INT8 model against ONNX Runtime's quantize_static at the same
calibration (MinMax) and granularity, on one prepared graph (opset >= 13), timed in interleaved
rounds in one run. The rewriter's layouts are judged here: as many int8 kernels, no more Q/DQ
left unfused after ORT's optimizer, and at least the speed. Also the search-space candidates
only (what `qsearch optimize` can choose from), to show what the space leaves float.
Writes parity_<workload>.md.

    python experiments/bench_parity.py --workload ocr_det
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

from bench_peers import context, interleaved_latency, ort_static, require  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=["digits", "minilm", "orientation", "ocr_det"], default="ocr_det")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    require(args.workload)
    from qsearch.plan.format import LayerChoice
    from qsearch.scoring import fusion_check

    ctx = context(args.workload, None)
    every = {la.name: None for la in ctx.prepared.layers}

    def ours(granularity: str, layers=every, forms=None):
        return ctx.rewriter(ctx.plan({n: LayerChoice("int8", "minmax", granularity) for n in layers}, forms))

    from qsearch.model.load import PATTERN_FORMS

    patterns = sorted({la.pattern for la in ctx.prepared.layers if la.pattern})

    models = {"FP32": ctx.prepared.proto}
    for pc in (False, True):
        g = "per-channel" if pc else "per-tensor"
        models[f"qsearch all-INT8 ({g})"] = ours(g.replace("-", "_"))
        models[f"ORT quantize_static ({g})"] = ort_static(ctx, "MinMax", pc).model
        for p in patterns:  # the other forms of patterns without an int8 kernel (hardswish): measured
            for form in PATTERN_FORMS[p][1:]:
                models[f"qsearch all-INT8 ({g}, {p} {form})"] = ours(g.replace("-", "_"), forms={p: form})
    models["qsearch search-space candidates INT8 (per-tensor)"] = ours(
        "per_tensor", {la.name: None for la in ctx.candidates()})
    names = [n for n, m in models.items() if m is not None]
    counts = {p: sum(la.pattern == p for la in ctx.prepared.layers) for p in patterns}
    lat = interleaved_latency(ctx, [models[n] for n in names], rounds=args.rounds)
    fp32 = lat[0][0]
    lines = [f"# All-INT8 parity on `{ctx.workload.name}` ({date.today()}, {platform.machine()}, {os.cpu_count()} cores, "
             f"ONNX Runtime {__import__('onnxruntime').__version__}, {ctx.workload.threads} thread, batch "
             f"{ctx.workload.latency_batch})", "",
             f"{len(ctx.prepared.layers)} quantizable layers ({len(ctx.candidates())} in the search space). MinMax "
             f"calibration on the same batches; latency: best median of {args.rounds} interleaved rounds, spread = "
             "(max - min) / min over rounds. Fusion after ORT's optimizer."
             + (f" Patterns without an int8 kernel: {', '.join(f'{p} ({n} layers)' for p, n in counts.items())}; "
                "rows without a form named run them decomposed." if patterns else ""), "",
             "| model | latency ms (spread) | vs FP32 | int8 kernels | Q/DQ left unfused |", "|---|---:|---:|---:|---:|"]
    for n, (ms, spread) in zip(names, lat):
        f = fusion_check(models[n]) if n != "FP32" else None
        lines.append(f"| {n} | {ms:.3f} (±{spread:.0%}) | {fp32 / ms:.2f}x | {f.int8_kernels if f else 0} | "
                     f"{f.unfused_qdq if f else 0} |")
    text = "\n".join(lines) + "\n"
    (HERE / f"parity_{args.workload}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
