"""ONNX Runtime sessions, metrics, latency and size: how a candidate model is judged.

Metrics are kept as additive partial sums per batch, so a trial can score a slice of the search
data, decide whether to prune, and then finish the rest without rescoring the slice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from qsearch import limits
from qsearch.data import Dataset
from qsearch.engine.onnxruntime import make_session
from qsearch.errors import QsearchError


def fused_op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Op types after ONNX Runtime's optimizer: shows which QDQ groups became int8 kernels."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qsearch-") as tmp:
        path = os.path.join(tmp, "fused.onnx")
        make_session(model, level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, optimized_path=path)
        fused = onnx.load(path)
    counts: dict[str, int] = {}
    for n in fused.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))


@dataclass(frozen=True)
class FusionCheck:
    """What the engine really runs: int8 kernels, and Q/DQ nodes (OpenVINO: FakeQuantize) left standing."""

    int8_kernels: int
    unfused_qdq: int
    ops: dict[str, int]

    def line(self) -> str:
        return f"{self.int8_kernels} int8 kernels, {self.unfused_qdq} Q/DQ nodes left unfused"


def fusion_check(model: onnx.ModelProto, engine=None) -> FusionCheck:
    """What the engine really runs: its own check where it has one (OpenVINO's runtime model),
    else ONNX Runtime's optimized graph."""
    if engine is not None and hasattr(engine, "fusion"):
        return engine.fusion(model)
    ops = fused_op_counts(model)
    int8 = sum(n for op, n in ops.items() if op.startswith(("QLinear", "QGemm", "MatMulInteger", "ConvInteger")))
    return FusionCheck(int8, ops.get("QuantizeLinear", 0) + ops.get("DequantizeLinear", 0), ops)


# ------------------------------------------------------------------------ metrics


def _top1(outs: list[np.ndarray], ref: list[np.ndarray] | None, labels: np.ndarray | None) -> np.ndarray:
    pred = outs[0].reshape(len(labels), -1).argmax(axis=1)
    return np.array([(pred == labels.reshape(-1)).sum(), len(labels)], dtype=np.float64)


def _cosine(outs, ref, labels) -> np.ndarray:
    total, n = 0.0, 0
    for o, r in zip(outs, ref):
        o = o.reshape(len(o), -1).astype(np.float64)
        r = r.reshape(len(r), -1).astype(np.float64)
        num = (o * r).sum(1)
        den = np.linalg.norm(o, axis=1) * np.linalg.norm(r, axis=1)
        total += float(np.where(den > 0, num / np.maximum(den, 1e-30), 1.0).sum())
        n += len(o)
    return np.array([total, n], dtype=np.float64)


def _sqnr(outs, ref, labels) -> np.ndarray:
    sig = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in ref)
    noise = sum(float(np.sum((o.astype(np.float64) - r) ** 2)) for o, r in zip(outs, ref))
    return np.array([sig, noise], dtype=np.float64)


def finish_metric(metric: str, acc: np.ndarray) -> float:
    if metric == "sqnr":  # dB; capped so an exact match is a large finite number
        return 10 * math.log10(max(acc[0], 1e-30) / max(acc[1], 1e-30 * max(acc[0], 1e-30))) if acc[1] > 0 else 120.0
    return float(acc[0] / acc[1]) if acc[1] else float("nan")


PARTIALS: dict[str, Callable] = {"top1": _top1, "cosine": _cosine, "sqnr": _sqnr}


@dataclass(frozen=True)
class Evaluation:
    score: float
    latency_ms: float | None = None
    size_bytes: int | None = None


class Scorer:
    """Scores sessions on one split with the workload's metric (built-in or custom)."""

    def __init__(self, metric: str, data: Dataset | None, reference: Sequence[list[np.ndarray]] | None = None,
                 custom: Callable | None = None, custom_name: str = ""):
        self.metric, self.data, self.reference = metric, data, reference
        self.custom, self.custom_name = custom, custom_name
        self.limit_s: float | None = None  # per-evaluation time limit (see `limits`); set once FP32 is timed
        self.last_parts: np.ndarray | None = None  # a user's per-sample parts from the last score, if it gave any

    def _limit(self):
        what = f"score function '{self.custom_name}'" if self.custom is not None else f"metric {self.metric}"
        name = self.data.name if self.data is not None else "the"
        return limits.limit(self.limit_s, f"one evaluation ({what} on the {name} data) ran past the "
                                          f"{self.limit_s or 0:.0f} s per-evaluation limit (--eval-timeout)")

    @property
    def sliceable(self) -> bool:
        return self.custom is None

    @property
    def samples(self) -> int:
        return self.data.samples if self.data is not None else 0

    @property
    def batches(self) -> int:
        return len(self.data) if self.data is not None else 0

    def partial(self, sess: ort.InferenceSession, start: int, stop: int) -> np.ndarray:
        f = PARTIALS[self.metric]
        acc = np.zeros(2)
        with self._limit():
            for i in range(start, min(stop, len(self.data))):
                outs = sess.run(None, dict(self.data.batches[i]))
                ref = self.reference[i] if self.reference is not None else None
                acc += f(outs, ref, self.data.labels[i])
        return acc

    def parts(self, sess: ort.InferenceSession) -> np.ndarray:
        """Per-run partial sums (runs x 2) of a built-in metric: summed, they give the score; resampled,
        how finely the split resolves it (`resolution.drop_interval`)."""
        f = PARTIALS[self.metric]
        out = []
        with self._limit():
            for i, batch in enumerate(self.data.batches):
                ref = self.reference[i] if self.reference is not None else None
                out.append(f(sess.run(None, dict(batch)), ref, self.data.labels[i]))
        return np.asarray(out, dtype=np.float64).reshape(-1, 2)

    def finish(self, acc: np.ndarray) -> float:
        return finish_metric(self.metric, acc)

    def score(self, sess: ort.InferenceSession) -> float:
        if self.custom is not None:
            return self._custom_score(sess)
        return self.finish(self.partial(sess, 0, len(self.data)))

    def _custom_score(self, sess: ort.InferenceSession) -> float:
        """A user's score: a number, or per-sample parts [[numerator, denominator], ...] whose
        ratio of sums is the metric (mean accuracy, character accuracy, F1 as 2TP / (2TP+FP+FN)):
        then the parts are kept (`last_parts`) and the drop gets a bootstrap interval."""
        try:
            with self._limit():
                v = self.custom(sess)
        except limits.EvaluationTimeout:
            raise
        except (Exception, SystemExit) as exc:  # an entry point that exits is an error, never a silent success
            raise QsearchError(f"score function '{self.custom_name}' raised {type(exc).__name__}: {exc}") from None
        self.last_parts = None
        if isinstance(v, (list, tuple, np.ndarray)) and not isinstance(v, bool):
            parts = _parts(v)
            if parts is None:
                raise QsearchError(f"score function '{self.custom_name}' returned a sequence that is not per-sample "
                                   "parts [[numerator, denominator], ...] with finite values and a positive total "
                                   "denominator")
            self.last_parts = parts
            return self.finish(parts.sum(0))
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v):
            raise QsearchError(f"score function '{self.custom_name}' returned {v!r}, not a finite number")
        return float(v)


def _parts(v) -> np.ndarray | None:
    try:
        a = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if a.ndim != 2 or a.shape[1] != 2 or not len(a) or not np.isfinite(a).all() or a[:, 1].sum() <= 0:
        return None
    return a


def reference_outputs(sess: ort.InferenceSession, data: Dataset) -> list[list[np.ndarray]]:
    return [sess.run(None, dict(b)) for b in data.batches]


def model_size(model: onnx.ModelProto) -> int:
    return model.ByteSize()
