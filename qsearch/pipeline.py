"""The loaded workload every command works on: prepared model, data, statistics, scorers.

Built once per command. Calibration statistics are cached on disk by model + data fingerprint,
so `analyze` and `optimize` on the same workload never recalibrate.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from qsearch import calibration, data
from qsearch.calibration import CalibrationStats
from qsearch.config import Workload
from qsearch.errors import QsearchError
from qsearch.limits import EvaluationTimeout
from qsearch.model import Layer, PreparedModel, load_model, prepare, with_input_shapes
from qsearch.plan import LayerChoice, Plan, build_plan, provenance
from qsearch.rewrite import LAYOUT_VERSION, Rewriter
from qsearch.scoring import Evaluation, Scorer, latency_ms, make_session, model_size, reference_outputs

CALIBRATION_PARTS = 2  # shared calibration jobs (by tensor) when a study queue is given
RUN_BYTES = 4 << 20  # the largest activation of one ONNX Runtime run stays about cache-sized


@dataclass(frozen=True)
class Baseline:
    fp32_search: float
    fp32_latency_ms: float
    fp32_size: int


class Context:
    def __init__(self, workload: Workload, cache_dir: Path | None = None, log=print,
                 eval_timeout: float | None = None, calibrate: bool = True):
        """`eval_timeout`: seconds one model evaluation may take (0: no limit; None: 20x the FP32
        model's evaluation time, at least a minute). `calibrate=False` defers the calibration pass
        to `calibrate()` (which can share it between workers)."""
        self.workload = workload
        self.log = log
        self.prepared: PreparedModel = prepare(load_model(workload.model), name=workload.name,
                                                 source=str(workload.model))
        bs, base = workload.batch_size, workload.base
        self.calib_data = data.load(workload.calibration, self.prepared.inputs, bs, base)
        self.search_data = data.load(workload.search, self.prepared.inputs, bs, base)
        self.test_data = data.load(workload.test, self.prepared.inputs, bs, base)
        # layer costs at the data's shapes (symbolic H x W would count every feature map as 1 x 1)
        self.prepared = with_input_shapes(self.prepared, {k: v.shape for k, v in self.search_data.batches[0].items()})
        self.rewriter = Rewriter(self.prepared)
        self.run_samples = run_samples(self.prepared)
        self.cache_dir = cache_dir
        self.calibration_passes = 0
        fp32 = make_session(self.prepared.proto, workload.threads)
        if workload.metric.name == "top1":  # before calibrating: a bad metric must cost nothing
            for ds in (self.search_data, self.test_data):
                self._check_top1(fp32, ds)
        self.stats: CalibrationStats | None = self._stats() if calibrate else None
        # how patterns without an int8 kernel (hardswish) run in int8 regions: measured by the
        # analysis (`sensitivity.choose_forms`); until then, as before (decomposed)
        self.forms: dict[str, str] = {}
        self.search_scorer = self._scorer(fp32, self.search_data, workload.metric.search_entry)
        self.test_scorer = self._scorer(fp32, self.test_data, workload.metric.test_entry)
        self.latency_feed = self._latency_feed()
        user_limit = eval_timeout if eval_timeout is not None and eval_timeout > 0 else None
        self.search_scorer.limit_s = self.test_scorer.limit_s = user_limit
        self._fp32 = fp32
        self._fp32_test: float | None = None
        try:
            t0 = time.perf_counter()
            fp32_search = self.search_scorer.score(fp32)
            t1 = time.perf_counter()
            # the test score is needed only by the final stage: a built-in metric defers it (a
            # user's test function is run now, so a broken one fails before the analysis)
            test_estimate = (t1 - t0) * self.test_scorer.samples / max(1, self.search_scorer.samples)
            self.score_seconds = {"search": t1 - t0, "test": test_estimate}
            if self.test_scorer.custom is not None:
                self._score_fp32_test()
        except EvaluationTimeout as exc:
            raise QsearchError(f"{workload.path}: the FP32 model: {exc}") from None
        self.baseline = Baseline(
            fp32_search=fp32_search,
            fp32_latency_ms=latency_ms(fp32, self.latency_feed),
            fp32_size=model_size(self.prepared.proto),
        )
        if eval_timeout is None:  # an INT8 plan may be slower than FP32, never 20x
            user_limit = max(60.0, 20 * max(self.score_seconds.values()))
        self.eval_timeout = user_limit
        self.search_scorer.limit_s = self.test_scorer.limit_s = user_limit
        self._check_deterministic(fp32)

    # ------------------------------------------------------------------ setup
    def _check_top1(self, fp32, ds) -> None:
        """top1 needs per-class float scores and integer class labels in range; anything else
        (an ArgMax output, one-hot or float labels) would score silently wrong."""

        # output shape and dtype: two samples tell (a fixed batch dimension: its own batch)
        first = next(data.chunks(ds.batches[:1], None if self.run_samples is None else 2))
        out = fp32.run(None, first)[0]
        n = len(next(iter(first.values())))
        name = self.prepared.outputs[0]
        where = f"{self.workload.path}: metric top1"
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

    def _score_fp32_test(self) -> float:
        t0 = time.perf_counter()
        self._fp32_test = self.test_scorer.score(self._fp32)
        self.score_seconds["test"] = time.perf_counter() - t0
        return self._fp32_test

    @property
    def fp32_test(self) -> float:
        """The FP32 model's test score, measured on first use."""
        if self._fp32_test is None:
            try:
                return self._score_fp32_test()
            except EvaluationTimeout as exc:
                raise QsearchError(f"{self.workload.path}: the FP32 model: {exc}") from None
        return self._fp32_test

    def _check_deterministic(self, fp32) -> None:
        """A metric that scores the same FP32 model differently twice makes every drop noise. A
        user's function is scored again in full; a built-in metric is qsearch's own arithmetic over
        ONNX Runtime's outputs, so one run of the first search batch in a fresh session tells."""
        fresh = make_session(self.prepared.proto, self.workload.threads)
        if self.search_scorer.custom is None:
            first, again = self.search_scorer.partial(fp32, 0, 1), self.search_scorer.partial(fresh, 0, 1)
            if np.array_equal(first, again):
                return
            first, again = self.search_scorer.finish(first), self.search_scorer.finish(again)
        else:
            again = self.search_scorer.score(fresh)
            first = self.baseline.fp32_search
        if not math.isclose(again, first, rel_tol=1e-9, abs_tol=1e-12):
            what = f"score function '{self.search_scorer.custom_name}'" if self.search_scorer.custom else \
                f"metric {self.workload.metric.name}"
            raise QsearchError(f"{self.workload.path}: {what} is not deterministic: the FP32 model scored {first!r} "
                               f"then {again!r} on the same search data; every measured drop would be noise")

    def study_key(self) -> str:
        """Hash of everything that defines a trial's meaning: model, data, metric, budget, search
        space, target, runtime, plan schema. A study is bound to it."""
        import hashlib

        from qsearch.plan import SCHEMA_VERSION

        w = self.workload
        parts = [self.prepared.fingerprint, self.calib_data.fingerprint, self.search_data.fingerprint,
                 self.test_data.fingerprint, repr(w.metric), repr(self.allowed_drop()), repr(w.space), w.target,
                 w.threads, w.latency_batch, SCHEMA_VERSION, LAYOUT_VERSION]
        return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


    def _scorer(self, fp32, ds, entry: str | None) -> Scorer:
        m = self.workload.metric
        if m.name == "custom":
            fn = data.import_entry(entry, f"{self.workload.path}: metric", self.workload.base)
            return Scorer("custom", ds, custom=fn, custom_name=entry)
        ds = data.rechunked(ds, self.run_samples)  # per-sample results do not depend on the run size
        ref = reference_outputs(fp32, ds) if m.name in ("cosine", "sqnr") else None
        return Scorer(m.name, ds, reference=ref)

    def _latency_feed(self) -> dict:
        return latency_feed(self.search_data.batches[0], self.prepared, self.workload.latency_batch)

    def calibration_tensors(self) -> list[str]:
        return sorted({t for layer in self.prepared.layers
                       for t in (*layer.activations, layer.output, layer.fused_output) if t})

    def _cache_path(self, tensors: list[str], part: str = "") -> Path | None:
        key = calibration.cache_key(self.prepared.fingerprint, self.calib_data.fingerprint, json.dumps(tensors),
                                    str(self.run_samples))
        return self.cache_dir / f"calibration-{key}{part}.npz" if self.cache_dir else None

    @staticmethod
    def _load(path: Path | None) -> CalibrationStats | None:
        if path is None or not path.is_file():
            return None
        try:
            return CalibrationStats.load(path)
        except Exception:
            return None  # stale or damaged cache: recalibrate

    def _collect(self, tensors: list[str], path: Path | None) -> CalibrationStats:
        self.calibration_passes += 1
        stats = calibration.collect(self.prepared.proto, tensors, self.calib_data.batches, self.workload.threads,
                                    self.run_samples)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            stats.save(path)
        return stats

    def _stats(self) -> CalibrationStats:
        tensors = self.calibration_tensors()
        path = self._cache_path(tensors)
        stats = self._load(path)
        if stats is None:
            self.log(f"calibrating on {self.calib_data.samples} samples ({len(tensors)} tensors, one pass)")
            stats = self._collect(tensors, path)
        return stats

    def calibrate(self, queue=None, progress=None) -> CalibrationStats:
        """The calibration statistics, with a `queue` (a `search.StudyQueue` stage) split by tensor
        into CALIBRATION_PARTS shared jobs: workers on one study each run the pass for their share
        (per-tensor statistics do not depend on the other tensors, so the result is the same as one
        pass). Parts land in the cache folder; one another machine made and this one cannot see is
        collected here."""
        if self.stats is not None:
            return self.stats
        tensors = self.calibration_tensors()
        path = self._cache_path(tensors)
        stats = self._load(path)
        if stats is None and queue is None:
            stats = self._stats()
        if stats is None:
            self.log(f"calibrating on {self.calib_data.samples} samples ({len(tensors)} tensors, "
                     f"{CALIBRATION_PARTS} shared passes)")
            parts = [tensors[k::CALIBRATION_PARTS] for k in range(CALIBRATION_PARTS)]
            paths = [self._cache_path(tensors, f"-part{k}of{len(parts)}") for k in range(len(parts))]

            def run(job: dict) -> tuple:
                self._collect(parts[job["part"]], paths[job["part"]])
                return ()

            queue.map([{"part": k} for k in range(len(parts))], run, progress, what="calibration")
            merged: dict = {}
            for part, p in zip(parts, paths):
                got = self._load(p) or self._collect(part, p)
                merged.update(got.tensors)
            stats = CalibrationStats(merged, got.samples, got.batches)
            if path is not None:
                stats.save(path)
        self.stats = stats
        return stats

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
        return "fp16" if self.workload.target == "fp16" else "fp32"

    def plan(self, choices: Mapping[str, LayerChoice], forms: Mapping[str, str] | None = None) -> Plan:
        """Layers not named in `choices` stay float; patterns take `forms` (default: the measured
        `self.forms`). Every plan records when and with what it was made."""
        plan = build_plan(self.prepared, choices, self.stats, self.workload.target, self.workload.space.percentile,
                          self.forms if forms is None else forms)
        return dataclasses.replace(plan, model_file=self.workload.model.name).with_info(**provenance())

    def uniform_plan(self, method: str = "minmax", granularity: str = "per_tensor",
                     keep_float: tuple[str, ...] = ()) -> Plan:
        """All candidate layers INT8 with one method: the naive baseline (or hybrid with keep_float)."""
        fp = LayerChoice(self.float_precision)
        return self.plan({la.name: fp if la.name in keep_float else LayerChoice("int8", method, granularity)
                          for la in self.candidates()})

    def evaluate(self, model: Plan | onnx.ModelProto, split: str = "search", timing: bool = True) -> Evaluation:
        proto = self.rewriter(model) if isinstance(model, Plan) else model
        sess = make_session(proto, self.workload.threads)
        scorer = self.search_scorer if split == "search" else self.test_scorer
        score = scorer.score(sess)
        lat = latency_ms(sess, self.latency_feed) if timing else None
        return Evaluation(score, lat, model_size(proto))

    def allowed_drop(self) -> float:
        return self.workload.allowed_drop(self.baseline.fp32_search)


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
