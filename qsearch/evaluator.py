"""Scoring a plan: the one chain plan -> rewrite -> session -> score -> time, with every evaluation
counted. Stages and strategies hand a plan in and get a frozen `Evaluation` back; the evaluator
owns the sessions, the per-evaluation time limit and the cache-sized runs (through its scorers).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from qsearch import timing as timing_rules
from qsearch.errors import QsearchError
from qsearch.limits import EvaluationTimeout
from qsearch.model.load import PreparedModel
from qsearch.plan.format import LayerChoice, Plan
from qsearch.plan.widths import plan_widths
from qsearch.replay import Recording, jackknife
from qsearch.resolution import DropInterval, drop_interval
from qsearch.scoring import model_size
from qsearch.workbench import Workbench

BITS = {"int8": (8, 8), "int16": (8, 16), "fp16": (16, 16), "fp32": (32, 32)}  # (weight, activation) bits
CONVERT_BITS = 16 * 16  # a conversion between uint8 and uint16 codes: one 16-bit multiply per element
SPLITS = ("search", "test")
REFERENCE_S = 0.6  # seconds of runs per timing of FP32's reference time (the best of three)
TRIAL_TIMING_S = 0.3  # seconds of runs per timing in a trial's three rounds (3 to 5 runs)


@dataclass(frozen=True)
class Evaluation:
    """One model scored on one split (and timed on the latency batch unless asked not to)."""

    score: float
    drop: float  # FP32's score on the same split minus this one
    latency_ms: float | None  # median wall time of the latency batch
    size_bytes: int
    bitops: float  # GBOPs: MACs x weight bits x activation bits
    cpu_ms: float | None = None  # median thread CPU time (with one intra-op thread: the model's own work)
    relative_ms: float | None = None  # its time over FP32's in the same rounds, times FP32's first time

    def cost(self, objective: str) -> float:
        """The search objective's value (lower is better). Latency is the plan's time relative to
        FP32 timed in the same interleaved rounds (`Evaluator.timed`), in FP32's milliseconds: what
        slows the machine for a moment slows both, and cancels; else the thread's CPU time."""
        if objective == "latency":
            ms = next((m for m in (self.relative_ms, self.cpu_ms, self.latency_ms) if m is not None), None)
            return float(ms if ms is not None else np.nan)
        return float(self.size_bytes) if objective == "size" else self.bitops


# called after the first slice of a sliceable metric: (estimated drop, batches scored); may raise to stop
SliceCheck = Callable[[float, int, np.ndarray], None]


class Evaluator:
    def __init__(self, bench: Workbench):
        self.bench = bench
        self.evaluations = 0  # every model evaluation this process ran through this evaluator
        self.seconds = 0.0  # ... and the time they took
        self._fp32_test = bench.baseline.fp32_test
        self._fp32: tuple | None = None  # FP32's (search score, parts, record), on first need
        self._fp32_session = None  # FP32's session, the reference every trial is timed against
        self._fp32_ref_ms = 0.0  # ... and its time, measured once (`timed`)

    def session(self, model: Plan | onnx.ModelProto) -> ort.InferenceSession:
        proto = self.bench.rewriter(model) if isinstance(model, Plan) else model
        return self.bench.engine.session(proto)

    def plan(self, choices: dict[str, str]) -> Plan:
        return self.bench.plan({n: LayerChoice.parse(lbl) for n, lbl in choices.items()})

    def evaluate(self, model: Plan | onnx.ModelProto, split: str = "search", timing: bool = True,
                 check: SliceCheck | None = None, prune_fraction: float = 0.3,
                 session: ort.InferenceSession | None = None) -> Evaluation:
        """Score `model` (a plan or a finished ONNX model) on `split`. With `check`, a sliceable
        metric first scores `prune_fraction` of the batches and calls `check(estimated drop,
        batches, partial sums)`, which may raise (a pruned trial) before the rest is scored.
        `session`: the model's session if one is already built (it must be this model's)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        t0 = time.perf_counter()
        proto = self.bench.rewriter(model) if isinstance(model, Plan) else model
        sess = session or self.bench.engine.session(proto)
        scorer = self.bench.search_scorer if split == "search" else self.bench.test_scorer
        fp32 = self.fp32_score(split)
        self.evaluations += 1
        try:
            if check is not None and scorer.sliceable and scorer.batches >= 3:
                k = max(1, round(scorer.batches * prune_fraction))
                head = scorer.partial(sess, 0, k)
                check(fp32 - scorer.finish(head), k, head)
                score = scorer.finish(head + scorer.partial(sess, k, scorer.batches))
            else:
                score = scorer.score(sess)
            lat, cpu, rel = self.timed(sess) if timing else (None, None, None)
            if self.bench.workload.threads != 1:
                cpu = None  # several threads: CPU time sums them, wall time is the latency
        finally:
            self.seconds += time.perf_counter() - t0
        bops = bitops(self.bench, model) if isinstance(model, Plan) else float("nan")
        return Evaluation(score, fp32 - score, lat, model_size(proto), bops, cpu, rel)

    def timed(self, sess, rounds: int = 3) -> tuple[float, float, float]:
        """(median wall ms, median CPU ms, relative ms) of a session on the latency batch, timed in
        `rounds` interleaved with the FP32 model's session: relative ms is the median per-round
        ratio to FP32 times FP32's reference time (the best of three timings of about REFERENCE_S,
        taken once: 100 runs of the recognizer's 220 ms batch took 28 s of every run before),
        on the CPU clock with one thread, else the wall clock. Each timing runs about TRIAL_TIMING_S
        (3 to 5 runs): the session was warmed by scoring, FP32's by the timings before."""
        feed, engine, ms = self.bench.latency_feed, self.bench.engine, self._clock_ms
        if self._fp32_session is None:  # the reference scales every trial's cost alike: it ranks nothing
            self._fp32_session = engine.session(self.bench.prepared.proto)
            runs = timing_rules.runs_within(REFERENCE_S, self.bench.baseline.fp32_latency_ms / 1e3, 15)
            best = [engine.time(self._fp32_session, feed, warmup=2, repeat=runs) for _ in range(3)]
            self._fp32_ref_ms = min(ms(t) for t in best)
        repeat = timing_rules.runs_within(TRIAL_TIMING_S, self._fp32_ref_ms / 1e3, 5)
        own, ref = [], []
        for k in range(rounds):
            own.append(engine.time(sess, feed, warmup=2 if k == 0 else 1, repeat=repeat))
            ref.append(engine.time(self._fp32_session, feed, warmup=1, repeat=repeat))
        ratios = [ms(a) / ms(b) for a, b in zip(own, ref)]
        wall = float(np.median([t.wall_ms for t in own]))
        cpu = float(np.median([t.cpu_ms for t in own]))
        return wall, cpu, float(np.median(ratios)) * self._fp32_ref_ms

    def race(self, sess, incumbent) -> timing_rules.Ratio:
        """The incumbent session's time over `sess`'s on the latency batch, in interleaved rounds
        until they decide whether `sess` is faster by more than the tie (`timing.race`); the CPU
        clock with one thread, else the wall clock. Each timing runs about TRIAL_TIMING_S."""
        feed, engine, ms = self.bench.latency_feed, self.bench.engine, self._clock_ms
        repeat = timing_rules.runs_within(TRIAL_TIMING_S, self.bench.baseline.fp32_latency_ms / 1e3, 5)

        def one_round(k: int) -> tuple[float, float]:
            a, b = (engine.time(s, feed, warmup=2 if k == 0 else 1, repeat=repeat) for s in (sess, incumbent))
            return ms(a), ms(b)

        return timing_rules.race(one_round)

    def _clock_ms(self, t) -> float:
        """A timing on the clock comparisons use: the thread's CPU time with one intra-op thread
        (ONNX Runtime computes on the calling thread alone), else the wall clock."""
        return t.cpu_ms if self.bench.workload.threads == 1 else t.wall_ms

    def search_with_interval(self, model: Plan | onnx.ModelProto, session: ort.InferenceSession | None = None,
                             fp32_session: ort.InferenceSession | None = None) -> tuple[float, DropInterval | None]:
        """The search score and the drop's interval against FP32 on the same runs: a paired
        bootstrap where the metric has parts (built-in metrics per run, a score function that
        returns per-sample parts), else a jackknife over the score function's own runs replayed
        from their recorded outputs (`replay`; None where replay does not hold). Sessions already
        built may be passed."""
        if self._fp32 is None:
            self._fp32 = self._scored(self.bench.prepared.proto, fp32_session)
        t0 = time.perf_counter()
        score, parts, record = self._scored(model, session)
        self.evaluations += 1
        self.seconds += time.perf_counter() - t0
        fp32_score, fp32_parts, fp32_record = self._fp32
        if parts is not None and fp32_parts is not None and len(parts) == len(fp32_parts):
            return score, drop_interval(self.bench.search_scorer.metric, fp32_parts, parts)
        if record is not None and fp32_record is not None:
            return score, jackknife(self.bench.search_scorer.custom, fp32_record, record, fp32_score, score)
        return score, None

    def _scored(self, model: Plan | onnx.ModelProto, session=None) -> tuple[float, np.ndarray | None, Recording | None]:
        """(score, per-run or per-sample parts or None, the recorded runs of a score function without parts)."""
        scorer = self.bench.search_scorer
        sess = session or self.session(model)
        if scorer.sliceable:
            parts = scorer.parts(sess)
            return scorer.finish(parts.sum(0)), parts, None
        record = Recording(sess)
        score = scorer.score(record)
        return score, scorer.last_parts, None if scorer.last_parts is not None else record

    def drop(self, choices: dict[str, str]) -> float:
        """Metric drop on the whole search data of a plan given as layer -> option label (layers
        not named stay float): what search strategies measure."""
        return self.evaluate(self.plan(choices), timing=False).drop

    def fp32_score(self, split: str) -> float:
        return self.bench.baseline.fp32_search if split == "search" else self.fp32_test()

    def fp32_test(self) -> float:
        """The FP32 model's test score, measured on first use (only the final stage needs it)."""
        if self._fp32_test is None:
            t0 = time.perf_counter()
            try:
                self._fp32_test = self.bench.test_scorer.score(self.bench.engine.session(self.bench.prepared.proto))
            except EvaluationTimeout as exc:
                raise QsearchError(f"{self.bench.workload.path}: the FP32 model: {exc}") from None
            self.seconds += time.perf_counter() - t0
        return self._fp32_test


def bitops(bench: Workbench, plan: Plan) -> float:
    """Analytic cost for targets we cannot time: MACs x weight bits x activation bits (GBOPs), plus
    each conversion between int8 and int16 codes charged per element (`border_bitops`)."""
    own = sum(la.macs * np.prod(BITS[plan.choice(la.name).precision]) for la in bench.prepared.layers)
    return float(own) / 1e9 + border_bitops(bench.prepared, plan)


def border_bitops(prepared: PreparedModel, plan: Plan) -> float:
    """GBOPs of the plan's int8/int16 conversions: elements of each converted tensor (its writer
    layer's output, else its reader's: shapes are per sample) x `CONVERT_BITS`. 0 without int16."""
    widths = plan_widths(prepared, plan)
    size = {la.quantized_output(plan.forms): la.output_bytes // 4 for la in prepared.layers}
    total = 0
    for t, readers in widths.converts.items():
        for bits in {b for _, b in readers}:
            n = size.get(t) or max(prepared.layer(name).output_bytes // 4 for name, b in readers if b == bits)
            total += n * CONVERT_BITS
    return total / 1e9
