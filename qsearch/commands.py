"""The commands besides `optimize`: analyze, apply, show, evaluate, baseline, profile. Each checks
its arguments, runs its stages and returns a frozen result; `cli.py` only parses and reports."""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path

import onnx

from qsearch import engine as engines
from qsearch import limits
from qsearch.analysis import sensitivity
from qsearch.config import load_workload
from qsearch.engine import isa
from qsearch.engine.base import Engine
from qsearch.errors import ModelError, QsearchError
from qsearch.evaluator import Evaluator
from qsearch.files import atomic_write_bytes, atomic_write_text, ensure_writable_dir, ensure_writable_file
from qsearch.finalize import greedy_fallback, layer_reasons
from qsearch.model.load import load_model, prepare
from qsearch.plan.check import check_plan
from qsearch.plan.format import LayerChoice, Plan
from qsearch.plan.io import read_plan
from qsearch.progress import Progress, log, say
from qsearch.report.markdown import forms_line
from qsearch.scoring import fusion_check, model_size
from qsearch.search.framing import problem_for
from qsearch.workbench import Workbench, open_workbench


@dataclass(frozen=True, kw_only=True)
class EvaluationResult:
    """A model scored with the workload's metric and timed on its latency batch, beside FP32."""

    model: str
    metric: str
    search: float
    test: float
    latency_ms: float
    size_bytes: int
    fp32_test: float
    fp32_latency_ms: float


def open_bench(config: str | None, out: Path, eval_timeout: float | None = None, calibrate: bool = True,
               engine: Engine | None = None) -> Workbench:
    workload = load_workload(config)
    ensure_writable_dir(out, "--out", create=False)  # a bad config or model leaves no empty --out behind
    for sub in ("cache", "pareto", "closest"):
        if (out / sub).exists() and not (out / sub).is_dir():
            raise QsearchError(f"--out {out}: '{sub}' there is a file, but qsearch keeps a folder of that name; "
                               "move it or pick another --out")
    log(f"workload '{workload.name}': {workload.model.name}, metric {workload.metric.name}, "
        f"max_drop {workload.max_drop * 100 if workload.relative else workload.max_drop}{'%' if workload.relative else ''}")
    bench = open_workbench(workload, cache_dir=out / "cache", log=log, eval_timeout=eval_timeout, calibrate=calibrate,
                           engine=engine)
    ensure_writable_dir(out, "--out")
    return bench


def check_engine(name, where: str) -> None:
    """The engine a plan (or its model) names must be one qsearch knows and is installed here."""
    if name is None:
        return
    if name not in engines.ENGINE_EXTRAS:
        raise QsearchError(f"{where}: names engine {name!r}, not one of {', '.join(engines.ENGINE_EXTRAS)}")
    if not engines.installed(name):
        raise QsearchError(f"{where}: its plan was searched on engine {name}, which is not installed: "
                           f"pip install -c constraints.txt \"qsearch[{engines.ENGINE_EXTRAS[name]}]\"")


def check_eval_timeout(eval_timeout) -> None:
    """0 means no limit, and so does a limit too large for the timer (inf); NaN and negatives are refused."""
    if eval_timeout is not None and not eval_timeout >= 0:  # (NaN is not >= 0)
        raise QsearchError(f"--eval-timeout must be >= 0 seconds (0: no limit), got {eval_timeout:g}")


def check_samples(samples) -> None:
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise QsearchError(f"--samples must be a whole number >= 1, got {samples!r}")


def run_analyze(config, out: Path, *, samples=None, reverse=False, workers=1, eval_timeout=None,
                engine: Engine | None = None) -> sensitivity.SensitivityProfile:
    check_samples(samples)
    check_eval_timeout(eval_timeout)
    bench = open_bench(config, out, eval_timeout, engine=engine)
    profile = sensitivity.analyze(bench, samples=samples, reverse=reverse, workers=workers, cache_dir=out / "cache",
                                  progress=Progress("analyze"))
    paths = sensitivity.save_profile(profile, out)
    say(profile.table())
    if profile.forms:
        log(forms_line(profile))
    log(f"fp32 {profile.metric} {profile.fp32_score:.4f} on {profile.samples} samples; "
        f"{profile.meta.get('evaluations')} evaluations in {profile.seconds:.1f}s; wrote {', '.join(str(p) for p in paths)}")
    return profile


def apply_plan(plan: Plan | str, model_path: str, output: str | None = None) -> onnx.ModelProto:
    """The plan's QDQ model for `model_path`, checked; written atomically to `output` if given."""
    plan_path = str(plan) if not isinstance(plan, Plan) else "plan"
    if output is not None:
        ensure_writable_file(output, "-o", (plan_path, model_path))
    if not isinstance(plan, Plan):
        plan = read_plan(plan_path)
    prepared = prepare(load_model(model_path), name=Path(model_path).stem, source=model_path,
                       preparation=plan.preparation)
    check_plan(plan, prepared, plan_path)
    from qsearch.rewrite import Rewriter

    warning = isa.mismatch(plan.provenance.get("int8_path"), plan_path)
    if warning:
        log(warning)
    check_engine(plan.provenance.get("engine"), plan_path)
    t0 = time.perf_counter()
    model = Rewriter(prepared)(plan)
    dt = time.perf_counter() - t0
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise QsearchError(f"{plan_path}: rewritten model fails the ONNX checker: {str(exc).splitlines()[0]}") from None
    if output is not None:
        atomic_write_bytes(output, model.SerializeToString())
        n8 = sum(plan.choice(la.name).quantized for la in prepared.layers)
        log(f"wrote {output}: {n8}/{len(prepared.layers)} layers INT8, rewrite {dt * 1e3:.0f} ms")
    return model


def show_plan(plan: Plan | str, model_path: str | None = None) -> str:
    from qsearch.report.review import show_text

    plan_path = str(plan) if not isinstance(plan, Plan) else "plan"
    if not isinstance(plan, Plan):
        plan = read_plan(plan_path)
    if model_path is not None:
        prepared = prepare(load_model(model_path), name=Path(model_path).stem, source=model_path,
                           preparation=plan.preparation)
        check_plan(plan, prepared, plan_path)
        plan = plan.completed(prepared)
    return show_text(plan)


def _check_wide_model(model, model_path: str, bench) -> None:
    """A model with 16-bit Q/DQ (an NPU plan's int16 layers) is scored as written only by ONNX
    Runtime: refused on another engine; on a CPU target its int8 layers run this CPU's kernels (said)."""
    from onnx import TensorProto

    wide = {i.name for i in model.graph.initializer if i.data_type in (TensorProto.UINT16, TensorProto.INT16)}
    if not any(n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in wide for n in model.graph.node):
        return
    if bench.workload.engine != "onnxruntime":
        raise QsearchError(f"{model_path}: it has 16-bit Q/DQ (int16 layers), which runtime.engine "
                           f"{bench.workload.engine} does not compute as written; score it with onnxruntime "
                           f"({bench.workload.path})")
    if bench.workload.target != "npu":
        log(f"{model_path}: it has 16-bit Q/DQ (int16 layers, an NPU plan); target {bench.workload.target} scores its "
            "int8 layers on this CPU's int8 kernels, target npu as the Q/DQ graph says")


def run_evaluate(model_path: str, config: str | None, out: Path, *, eval_timeout=None,
                 engine: Engine | None = None) -> EvaluationResult:
    check_eval_timeout(eval_timeout)
    bench = open_bench(config, out, eval_timeout, engine=engine)
    model = load_model(model_path)
    try:
        sess = bench.engine.session(model)
    except Exception as exc:
        raise ModelError(f"{model_path}: {bench.engine.name} cannot load the model: {str(exc).splitlines()[0]}") from None
    # the model must take the workload's data: same input names and element types
    want = {i.name: i.dtype for i in bench.prepared.inputs}
    have = {i.name: i.type for i in sess.get_inputs()}
    if set(want) != set(have):
        raise QsearchError(f"{model_path}: its inputs {sorted(have)} do not match the workload's data "
                           f"{sorted(want)} ({bench.workload.path})")
    from qsearch.rewrite import ENGINE_KEY, INT8_PATH_KEY

    props = {p.key: p.value for p in model.metadata_props}
    warning = isa.mismatch(props.get(INT8_PATH_KEY), model_path)
    if warning:
        log(warning)
    check_engine(props.get(ENGINE_KEY), model_path)
    _check_wide_model(model, model_path, bench)
    if props.get(ENGINE_KEY, "onnxruntime") != bench.workload.engine:
        log(f"{model_path}: its plan was searched on {props.get(ENGINE_KEY, 'onnxruntime')}; scored and timed here on "
            f"{bench.workload.engine} (runtime.engine in {bench.workload.path})")
    evaluator = Evaluator(bench)
    try:
        r = EvaluationResult(
            model=model_path, metric=bench.workload.metric.name,
            search=bench.search_scorer.score(sess), test=bench.test_scorer.score(sess),
            latency_ms=bench.engine.time(sess, bench.latency_feed, repeat=30).wall_ms, size_bytes=model_size(model),
            fp32_test=evaluator.fp32_test(), fp32_latency_ms=bench.baseline.fp32_latency_ms)
    except (QsearchError, limits.EvaluationTimeout):
        raise
    except Exception as exc:  # ORT refused the data (shape, type) or the metric the outputs
        raise QsearchError(f"{model_path}: scoring on the workload's data failed: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    say(f"{model_path}: {r.metric} search {r.search:.4f}, test {r.test:.4f} (fp32 {r.fp32_test:.4f}); "
          f"latency {r.latency_ms:.3f} ms ({r.fp32_latency_ms / r.latency_ms:.2f}x vs fp32"
          + (f", timed by the latency hook {bench.workload.latency}" if bench.workload.latency else "")
          + f"); size {r.size_bytes / 1024:.1f} KiB")
    return r


def run_baseline(kind: str, config: str | None, out: Path, *, output: str, method: str, granularity: str,
                 eval_timeout=None, recovery: str = "none") -> Plan:
    check_eval_timeout(eval_timeout)
    ensure_writable_file(output, "-o", (config,))
    bench = open_bench(config, out, eval_timeout)
    ensure_writable_file(output, "-o", bench.workload.files_read())
    evaluator = Evaluator(bench)
    if kind == "naive":  # in the forms `optimize` would measure for it (hardswish fused or not)
        forms, _ = sensitivity.choose_forms(bench, {la.name: LayerChoice("int8", method, granularity,
                                                                         weights=bench.workload.space.weights[0])
                                                    for la in bench.candidates()})
        bench = bench.with_forms(forms)
        plan = bench.uniform_plan(method, granularity, recovery=recovery)
    elif recovery != "none":
        raise QsearchError(f"--recovery applies to the naive baseline, not to {kind}")
    elif kind in ("fp32", "fp16"):
        if kind == "fp16" and bench.workload.target == "cpu":
            raise QsearchError(f"{bench.workload.path}: baseline fp16 needs target fp16 or npu (target is {bench.workload.target})")
        plan = bench.plan({})
    else:  # hybrid: the greedy fallback, which needs the sensitivity profile
        profile = sensitivity.analyze(bench, cache_dir=out / "cache", progress=Progress("analyze"))
        bench = bench.with_forms(profile.forms)
        evaluator = Evaluator(bench)
        plan, _, _ = greedy_fallback(bench, evaluator, problem_for(bench, profile), method, granularity)
        plan = plan.with_why(layer_reasons(plan, profile, absorbed=bench.prepared.absorbed(plan.forms)))
    ev = evaluator.evaluate(plan, "test")
    fp32_test = evaluator.fp32_test()
    plan = plan.with_info({"test": ev.score, "latency_ms": ev.latency_ms, "size_bytes": ev.size_bytes,
                           "fp32_test": fp32_test}, baseline=kind)
    plan.write(output)
    log(f"wrote {output}: {kind} plan, test {bench.workload.metric.name} {ev.score:.4f} "
        f"(fp32 {fp32_test:.4f}), latency {ev.latency_ms:.3f} ms")
    return plan


def run_profile(model_path: str, config: str | None, top: int = 15, output: str | None = None):
    """Where the time goes in any ONNX model (the user's own, a qsearch or ORT QDQ model) on the
    workload's latency batch: ORT's per-node profile by kind, by op type and by layer of the
    workload's model. Needs no calibration and no scoring."""
    from qsearch import data
    from qsearch.analysis import profiling
    from qsearch.workbench import latency_feed

    if top < 1:
        raise QsearchError(f"--top must be >= 1, got {top}")
    workload = load_workload(config)
    if output is not None:
        ensure_writable_file(output, "-o", (model_path, *workload.files_read()))
    prepared = prepare(load_model(workload.model), name=workload.name, source=str(workload.model))
    model = load_model(model_path)
    engine = engines.create(workload.engine, threads=workload.threads)
    try:
        sess = engine.session(model)
    except Exception as exc:
        raise ModelError(f"{model_path}: {engine.name} cannot load the model: {str(exc).splitlines()[0]}") from None
    want = {i.name for i in prepared.inputs}
    have = {i.name for i in sess.get_inputs()}
    if want != have:
        raise QsearchError(f"{model_path}: its inputs {sorted(have)} do not match the workload's data {sorted(want)} "
                           f"({workload.path})")
    search = data.load(workload.search, prepared.inputs, workload.batch_size, workload.base)
    feed = latency_feed(search.batches[0], prepared, workload.latency_batch)
    try:
        prof = profiling.profile(prepared, model, feed, engine, runs=10)
    except Exception as exc:
        raise QsearchError(f"{model_path}: profiling on the workload's data failed: {str(exc).splitlines()[0]}") from None
    fusion = fusion_check(model, engine)
    batch = len(next(iter(feed.values())))
    total = max(prof.total_ms, 1e-12)
    lines = [f"{model_path}: {prof.total_ms:.3f} ms per batch of {batch} in ONNX Runtime's kernels "
             f"(CPU, {workload.threads} thread(s), mean of 10 runs); {fusion.line()}", "",
             "| kind | ms | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.3f} | {v / total:.0%} |" for k, v in prof.by_kind.items()]
    lines += ["", "| op type | ms | share |", "|---|---:|---:|"]
    ops = sorted(prof.by_op.items(), key=lambda kv: -kv[1])
    lines += [f"| {op} | {ms:.3f} | {ms / total:.0%} |" for op, ms in ops[:top]]
    layers = sorted(prof.by_layer.items(), key=lambda kv: -sum(kv[1].values()))
    lines += ["", f"| layer of `{workload.name}` | " + " | ".join(f"{k} ms" for k in profiling.KINDS) + " | total ms |",
              "|---|" + "---:|" * (len(profiling.KINDS) + 1)]
    lines += [f"| {name} | " + " | ".join(f"{k[x]:.3f}" for x in profiling.KINDS) + f" | {sum(k.values()):.3f} |"
              for name, k in layers[:top]]
    say("\n".join(lines))
    if output is not None:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["layer", *profiling.KINDS, "total_ms"])
        for name, k in layers:
            w.writerow([name, *(round(k[x], 6) for x in profiling.KINDS), round(sum(k.values()), 6)])
        atomic_write_text(output, buf.getvalue())
        log(f"wrote {output}: {len(layers)} layers")
    return prof
