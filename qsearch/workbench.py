"""The loaded workload every stage works on: one frozen record of model, data, statistics, scorers
and the FP32 baseline.

`open_workbench` loads and checks everything once per command. Calibration statistics are cached
on disk by model + data fingerprint, so `analyze` and `optimize` on the same workload never
recalibrate. Stages never change a workbench: what they decide (the calibration statistics, the
measured forms) comes back as a new record (`calibrated`, `with_forms`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from qsearch import calibration, data
from qsearch import engine as engines
from qsearch.calibration import CalibrationStats
from qsearch.config import Workload
from qsearch.data import Dataset
from qsearch.engine import isa
from qsearch.engine.base import Engine
from qsearch.engine.onnxruntime import OrtCpu
from qsearch.errors import QsearchError
from qsearch.limits import EvaluationTimeout
from qsearch.model.load import Layer, PreparedModel, load_model, prepare, with_input_shapes
from qsearch.plan.build import build_plan
from qsearch.plan.format import LayerChoice, Plan, provenance
from qsearch.recovery import equalization as recovery
from qsearch.recovery import rounding, smoothing
from qsearch.recovery.equalization import RecoveryStats, correctable
from qsearch.rewrite import LAYOUT_VERSION, Rewriter
from qsearch.scoring import Scorer, model_size, reference_outputs

CALIBRATION_PARTS = 2  # shared calibration jobs (by tensor) when a study queue is given
RUN_BYTES = 4 << 20  # the largest activation of one ONNX Runtime run stays about cache-sized


@dataclass(frozen=True)
class Baseline:
    """The FP32 model, measured once: what every drop and speed-up is relative to."""

    fp32_search: float
    fp32_latency_ms: float
    fp32_size: int
    score_seconds: Mapping[str, float]  # one scoring of the FP32 model per split (test: estimated until scored)
    fp32_test: float | None = None  # measured up front only for a user's test function (`Evaluator.fp32_test`)


@dataclass(frozen=True)
class Workbench:
    workload: Workload
    prepared: PreparedModel
    calib_data: Dataset
    search_data: Dataset
    test_data: Dataset
    rewriter: Rewriter
    run_samples: int | None
    cache_dir: Path | None
    search_scorer: Scorer
    test_scorer: Scorer
    latency_feed: dict
    baseline: Baseline
    eval_timeout: float | None  # seconds one model evaluation may take (None: no limit)
    stats: CalibrationStats | None = None
    # how patterns without an int8 kernel (hardswish) run in int8 regions: measured by the analysis
    # (`sensitivity.choose_forms`); until then, as before (decomposed)
    forms: Mapping[str, str] = dataclasses.field(default_factory=dict)
    calibration_passes: int = 0  # passes this command ran (0: statistics came from the cache)
    # equalization pairs, scales and the equalized statistics (`recovery`); None: no cle allowed
    recovery: RecoveryStats | None = None
    eq_rewriter: Rewriter | None = None  # rewrites the equalized float model (probes of cle options)
    engine: Engine = dataclasses.field(default_factory=OrtCpu)  # every session and timing goes through it

    # ------------------------------------------------------------------ derived records
    def with_forms(self, forms: Mapping[str, str]) -> Workbench:
        return dataclasses.replace(self, forms=dict(forms))

    def calibrated(self, queue=None, progress: Callable | None = None, log: Callable = print) -> Workbench:
        """This workbench with calibration statistics: from the cache, or one pass (with a `queue`,
        a `jobs.StudyQueue` stage, split by tensor into CALIBRATION_PARTS shared jobs: per-tensor
        statistics do not depend on the other tensors, so the result is the same as one pass)."""
        if self.stats is not None:
            return self
        stats, passes = _calibrate(self, queue, progress, log)
        rec, more = _recovery(self, stats, log)
        return dataclasses.replace(self, stats=stats, calibration_passes=self.calibration_passes + passes + more,
                                   recovery=rec, eq_rewriter=None if rec.prepared is None else Rewriter(rec.prepared))

    # ------------------------------------------------------------------ plans
    def candidates(self) -> list[Layer]:
        space = self.workload.space
        absorbed = self.prepared.absorbed(self.forms)  # inside a fused pattern: they follow it
        layers = [la for la in self.prepared.layers if space.matches(la.name, la.op_type) and la.name not in absorbed]
        if not layers:
            raise QsearchError(
                f"{self.workload.path}: the search space's candidates (op_types {list(space.op_types)}, include "
                f"{list(space.include)}, exclude {list(space.exclude)}) match no layer of '{self.prepared.name}'"
            )
        return layers

    @property
    def float_precision(self) -> str:
        return "fp32" if self.workload.target == "cpu" else "fp16"

    def plan(self, choices: Mapping[str, LayerChoice | str], forms: Mapping[str, str] | None = None) -> Plan:
        """Layers not named in `choices` (objects or labels) stay float; patterns take `forms`
        (default: this workbench's). Every plan records when and with what it was made."""
        parsed = {n: LayerChoice.parse(c) if isinstance(c, str) else c for n, c in choices.items()}
        plan = build_plan(self.prepared, parsed, self.stats, self.workload.target, self.workload.space.percentile,
                          self.forms if forms is None else forms, self.recovery)
        hook = {"latency_hook": self.workload.latency} if self.workload.latency else {}
        if self.workload.engine != "onnxruntime":
            hook["engine"] = self.workload.engine
        return dataclasses.replace(plan, model_file=self.workload.model.name).with_info(**provenance(**hook))

    def uniform_plan(self, method: str = "minmax", granularity: str = "per_tensor",
                     keep_float: tuple[str, ...] = (), recovery: str = "none") -> Plan:
        """All candidate layers INT8 with one method: the naive baseline (or hybrid with keep_float).
        `recovery`: applied where a layer can take it (equalization in pairs, smoothing in
        groups, bias correction with a bias, learned rounding with a weight of its own, within
        `rounding.CAP_S`); refused when the search space does not allow it."""
        allowed = self.workload.space.recovery
        for technique in recovery.split("+") if recovery != "none" else ():
            if technique not in allowed:
                raise QsearchError(f"{self.workload.path}: recovery {technique} is not allowed by the search space "
                                   f"(search_space.recovery: {list(allowed) or ['none']})")
        if "smooth" in recovery and method != "minmax":
            raise QsearchError(f"recovery smooth needs calibration minmax (a smoothed input's range is MinMax), "
                               f"not {method}")
        rec = self.recovery or RecoveryStats()
        partnered = {n for p in rec.pairs for n in (p.head, p.tail)}
        smoothable = {n for sm in rec.smoothing.values() for n in sm.group.layers}
        fp = LayerChoice(self.float_precision)
        choices = {}
        for la in self.candidates():
            parts = [t for t in recovery.split("+") if (t == "cle" and la.name in partnered)
                     or (t == "bias" and correctable(la)) or (t == "smooth" and la.name in smoothable)]
            choices[la.name] = fp if la.name in keep_float else \
                LayerChoice("int8", method, granularity, "+".join(parts) or "none", self.workload.space.weights[0])
        plan = self.plan(choices)
        if "round" in recovery.split("+"):  # learned for this plan, in graph order, within the cap
            plan, _ = rounding.learn_for_plan(self, plan, [la.name for la in self.candidates()])
        return plan

    def allowed_drop(self) -> float:
        return self.workload.allowed_drop(self.baseline.fp32_search)

    def study_key(self) -> str:
        """Hash of everything that defines a trial's meaning: model, data, metric, budget, search
        space, target, runtime, plan schema. A study is bound to it."""
        from qsearch.plan.format import SCHEMA_VERSION

        w = self.workload
        parts = [self.prepared.fingerprint, self.calib_data.fingerprint, self.search_data.fingerprint,
                 self.test_data.fingerprint, repr(w.metric), repr(self.allowed_drop()), repr(w.space), w.target,
                 w.threads, w.latency_batch, SCHEMA_VERSION, LAYOUT_VERSION, self.prepared.preparation,
                 isa.detect().name, *([w.latency] if w.latency else []),
                 *([w.engine] if w.engine != "onnxruntime" else [])]
        return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()

    def calibration_tensors(self) -> list[str]:
        return sorted({t for layer in self.prepared.layers
                       for t in (*layer.activations, layer.output, layer.fused_output) if t}
                      | set(recovery.channel_tensors(self.prepared)))


# ---------------------------------------------------------------------- loading and checks
def open_workbench(workload: Workload, cache_dir: Path | None = None, log: Callable = print,
                   eval_timeout: float | None = None, calibrate: bool = True, engine: Engine | None = None) -> Workbench:
    """Load, check and measure the FP32 model once. `eval_timeout`: seconds one model evaluation
    may take (0: no limit; None: 20x the FP32 model's evaluation time, at least a minute).
    `calibrate=False` defers the calibration pass to `Workbench.calibrated` (which can share it).
    `engine`: where models are scored and timed (default: ONNX Runtime's CPU provider)."""
    engine = engine or engines.for_workload(workload, eval_timeout)
    for note in workload.notes:
        log(note)
    prepared = prepare(load_model(workload.model), name=workload.name, source=str(workload.model))
    bs, base = workload.batch_size, workload.base
    calib_data = data.load(workload.calibration, prepared.inputs, bs, base)
    search_data = data.load(workload.search, prepared.inputs, bs, base)
    test_data = data.load(workload.test, prepared.inputs, bs, base)
    # layer costs at the data's shapes (symbolic H x W would count every feature map as 1 x 1)
    prepared = with_input_shapes(prepared, {k: v.shape for k, v in search_data.batches[0].items()})
    chunk = run_samples(prepared)
    fp32 = engine.session(prepared.proto)
    if workload.metric.name == "top1":  # before calibrating: a bad metric must cost nothing
        for ds in (search_data, test_data):
            _check_top1(workload, prepared, fp32, ds, chunk)
    user_limit = eval_timeout if eval_timeout is not None and eval_timeout > 0 else None
    search_scorer = _scorer(workload, fp32, search_data, workload.metric.search_entry, chunk)
    test_scorer = _scorer(workload, fp32, test_data, workload.metric.test_entry, chunk)
    search_scorer.limit_s = test_scorer.limit_s = user_limit
    feed = latency_feed(search_data.batches[0], prepared, workload.latency_batch)
    try:
        t0 = time.perf_counter()
        fp32_search = search_scorer.score(fp32)
        seconds = {"search": time.perf_counter() - t0}
        # the test score is needed only by the final stage: a built-in metric defers it (a user's
        # test function is run now, so a broken one fails before the analysis)
        seconds["test"] = seconds["search"] * test_scorer.samples / max(1, search_scorer.samples)
        fp32_test = None
        if test_scorer.custom is not None:
            t0 = time.perf_counter()
            fp32_test = test_scorer.score(fp32)
            seconds["test"] = time.perf_counter() - t0
    except EvaluationTimeout as exc:
        raise QsearchError(f"{workload.path}: the FP32 model: {exc}") from None
    baseline = Baseline(fp32_search, engine.time(fp32, feed).wall_ms, model_size(prepared.proto), seconds, fp32_test)
    if eval_timeout is None:  # an INT8 plan may be slower than FP32, never 20x
        user_limit = max(60.0, 20 * max(seconds.values()))
    search_scorer.limit_s = test_scorer.limit_s = user_limit
    _check_deterministic(workload, engine.session(prepared.proto), search_scorer, fp32, fp32_search)
    bench = Workbench(workload, prepared, calib_data, search_data, test_data, Rewriter(prepared), chunk, cache_dir,
                      search_scorer, test_scorer, feed, baseline, user_limit, engine=engine)
    return bench.calibrated(log=log) if calibrate else bench


def _check_top1(workload: Workload, prepared: PreparedModel, fp32: ort.InferenceSession, ds: Dataset,
                chunk: int | None) -> None:
    """top1 needs per-class float scores and integer class labels in range; anything else
    (an ArgMax output, one-hot or float labels) would score silently wrong."""
    # output shape and dtype: two samples tell (a fixed batch dimension: its own batch)
    first = next(data.chunks(ds.batches[:1], None if chunk is None else 2))
    out = fp32.run(None, first)[0]
    n = len(next(iter(first.values())))
    name = prepared.outputs[0]
    where = f"{workload.path}: metric top1"
    if not np.issubdtype(out.dtype, np.floating) or out.ndim < 2 or out.shape[0] != n or out[0].size < 2:
        raise QsearchError(f"{where}: the model's first output '{name}' must hold per-class float scores of shape "
                           f"(batch, classes), got {out.dtype} {out.shape}")
    classes = out[0].size
    for i, y in enumerate(ds.labels):
        y = np.asarray(y)
        if y.dtype.kind not in "iu" or y.reshape(-1).size != len(next(iter(ds.batches[i].values()))):
            raise QsearchError(f"{where}: {ds.name} labels must be one integer class index per sample, got "
                               f"{y.dtype} {y.shape}" + (" (one-hot? give class indices)" if y.ndim == 2 else ""))
        if y.size and (y.min() < 0 or y.max() >= classes):
            raise QsearchError(f"{where}: {ds.name} labels must lie in [0, {classes - 1}] (the output has "
                               f"{classes} classes), found {int(y.min())}..{int(y.max())}")


def _check_deterministic(workload: Workload, fresh, scorer: Scorer, fp32, first: float) -> None:
    """A metric that scores the same FP32 model differently twice makes every drop noise. A
    user's function is scored again in full; a built-in metric is qsearch's own arithmetic over
    ONNX Runtime's outputs, so one run of the first search batch in a fresh session tells."""
    if scorer.custom is None:
        a, b = scorer.partial(fp32, 0, 1), scorer.partial(fresh, 0, 1)
        if np.array_equal(a, b):
            return
        first, again = scorer.finish(a), scorer.finish(b)
    else:
        again = scorer.score(fresh)
    if not math.isclose(again, first, rel_tol=1e-9, abs_tol=1e-12):
        what = f"score function '{scorer.custom_name}'" if scorer.custom else f"metric {workload.metric.name}"
        raise QsearchError(f"{workload.path}: {what} is not deterministic: the FP32 model scored {first!r} "
                           f"then {again!r} on the same search data; every measured drop would be noise")


def _scorer(workload: Workload, fp32, ds: Dataset, entry: str | None, chunk: int | None) -> Scorer:
    m = workload.metric
    if m.name == "custom":
        fn = data.import_entry(entry, f"{workload.path}: metric", workload.base)
        return Scorer("custom", ds, custom=fn, custom_name=entry)
    ds = data.rechunked(ds, chunk)  # per-sample results do not depend on the run size
    ref = reference_outputs(fp32, ds) if m.name in ("cosine", "sqnr") else None
    return Scorer(m.name, ds, reference=ref)


# ---------------------------------------------------------------------- calibration
def _cache_path(bench: Workbench, tensors: list[str], part: str = "") -> Path | None:
    key = calibration.cache_key(bench.prepared.fingerprint, str(bench.prepared.preparation),
                                bench.calib_data.fingerprint, json.dumps(tensors), str(bench.run_samples))
    return bench.cache_dir / f"calibration-{key}{part}.npz" if bench.cache_dir else None


def _load(path: Path | None) -> CalibrationStats | None:
    if path is None or not path.is_file():
        return None
    try:
        return CalibrationStats.load(path)
    except Exception:
        return None  # stale or damaged cache: recalibrate


def _collect(bench: Workbench, tensors: list[str], path: Path | None,
             prepared: PreparedModel | None = None) -> CalibrationStats:
    prepared = prepared or bench.prepared
    axes = recovery.channel_tensors(bench.prepared)
    stats = calibration.collect(prepared.proto, tensors, bench.calib_data.batches, bench.workload.threads,
                                bench.run_samples, {t: a for t, a in axes.items() if t in set(tensors)})
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        stats.save(path)
    return stats


def _calibrate(bench: Workbench, queue, progress, log) -> tuple[CalibrationStats, int]:
    """(statistics, passes run). Parts land in the cache folder; one another machine made and
    this one cannot see is collected here."""
    tensors = bench.calibration_tensors()
    path = _cache_path(bench, tensors)
    stats = _load(path)
    if stats is not None:
        return stats, 0
    if queue is None:
        log(f"calibrating on {bench.calib_data.samples} samples ({len(tensors)} tensors, one pass)")
        return _collect(bench, tensors, path), 1
    log(f"calibrating on {bench.calib_data.samples} samples ({len(tensors)} tensors, "
        f"{CALIBRATION_PARTS} shared passes)")
    parts = [tensors[k::CALIBRATION_PARTS] for k in range(CALIBRATION_PARTS)]
    paths = [_cache_path(bench, tensors, f"-part{k}of{len(parts)}") for k in range(len(parts))]
    passes = 0

    def run(job: dict) -> tuple:
        nonlocal passes
        _collect(bench, parts[job["part"]], paths[job["part"]])
        passes += 1
        return ()

    queue.map([{"part": k} for k in range(len(parts))], run, progress, what="calibration")
    merged: dict = {}
    channels: dict = {}
    for part, p in zip(parts, paths):
        got = _load(p)
        if got is None:
            got, passes = _collect(bench, part, p), passes + 1
        merged.update(got.tensors)
        channels.update(got.channels)
    stats = CalibrationStats(merged, got.samples, got.batches, channels)
    if path is not None:
        stats.save(path)
    return stats, passes


def _recovery(bench: Workbench, stats: CalibrationStats, log) -> tuple[RecoveryStats, int]:
    """(what recovery needs, passes run): smoothing factors from the per-channel statistics (no
    pass); for cle the pairs, scales from the weights and the calibration maxima, and one
    calibration pass of the equalized model over the tensors between pairs (cached)."""
    space = bench.workload.space
    on = "smooth" in space.recovery
    smooth = smoothing.compute(bench.prepared, stats.channels, True) if on else {}
    smooth_pt = smoothing.compute(bench.prepared, stats.channels, False) if on else {}
    pairs = recovery.find_pairs(bench.prepared) if "cle" in space.recovery else ()
    if not pairs:
        return RecoveryStats(smoothing=smooth, smoothing_pt=smooth_pt), 0
    scales = recovery.compute_scales(bench.prepared, {p.conv_out: stats.channels[p.conv_out].max for p in pairs})
    eq = recovery.equalized_model(bench.prepared, scales)
    tensors = sorted({t for p in pairs for t in p.tensors})
    digest = hashlib.sha256(b"".join(scales[h].tobytes() for h in sorted(scales))).hexdigest()[:16]
    path = _cache_path(bench, tensors, f"-equalized-{digest}")
    got, passes = _load(path), 0
    if got is None:
        log(f"calibrating the equalized model ({len(pairs)} pairs, {len(tensors)} tensors, one pass)")
        got, passes = _collect(bench, tensors, path, eq), 1
    return RecoveryStats(pairs, scales, got, eq, smooth, smooth_pt), passes


# ---------------------------------------------------------------------- run sizes
def latency_feed(batch: Mapping, prepared: PreparedModel, want: int) -> dict:
    """The batch every latency is measured on: `want` samples of the first search batch, repeated
    if it is smaller (a fixed-batch model gets its own batch)."""
    n = len(next(iter(batch.values())))
    if n >= want or any(i.shape and i.shape[0] is not None for i in prepared.inputs):
        return {k: v[:want] for k, v in batch.items()}
    return {k: np.concatenate([v] * (want // n + 1))[:want] for k, v in batch.items()}


def run_samples(prepared: PreparedModel) -> int | None:
    """Samples per ONNX Runtime run when qsearch runs the model over data (calibration, the proxy,
    the screen, built-in metrics): a power of two that keeps the model's largest activation within
    RUN_BYTES. Whole 32-sample batches ran memory-bound on PP-LCNet: the probe pass took 4.1 s
    (2.8 s in 2-sample runs), and two workers side by side were 1.7x slower each instead of 1.0x.
    Per-sample outputs do not depend on it. None: whole batches (a fixed batch dimension, or
    activation sizes unknown)."""
    if any(i.shape and i.shape[0] is not None for i in prepared.inputs):
        return None
    biggest = max((la.output_bytes for la in prepared.layers), default=0)
    if biggest <= 0:
        return None
    return 1 << max(0, (RUN_BYTES // biggest).bit_length() - 1)
