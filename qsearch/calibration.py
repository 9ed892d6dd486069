"""Calibration: one pass over the data -> per-tensor statistics -> ranges for every method.

The pass records, for each candidate activation, its min/max and a fine histogram. MinMax,
Percentile, Entropy (KL) and MSE ranges are pure functions of those statistics, so the search can
try any method for any layer without touching the data again. Weight scales need no data.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from qsearch.data import chunks
from qsearch.errors import QsearchError
from qsearch.files import atomic_write_bytes

METHODS = ("minmax", "entropy", "percentile", "mse")
GRANULARITIES = ("per_channel", "per_tensor")
NUM_BINS = 2048
STATS_VERSION = 3
RANGES_VERSION = 2  # bump when a method's range maths changes: cached profiles are then stale


@dataclass(frozen=True)
class TensorStats:
    """Running statistics of one tensor: exact min/max and a histogram over [lo, hi]."""

    min: float
    max: float
    counts: np.ndarray  # int64, NUM_BINS
    lo: float
    hi: float
    ranges: dict = field(default_factory=dict, compare=False, repr=False)  # memo of tensor_range

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, len(self.counts) + 1)

    @property
    def centers(self) -> np.ndarray:
        e = self.edges
        return (e[:-1] + e[1:]) / 2


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel statistics of one tensor over the calibration data: what bias correction
    (expected input per channel), clip-aware equalization (does a channel reach the clip?) and
    smoothing (each channel's range and power) need."""

    axis: int
    mean: np.ndarray  # float32, one per channel
    max: np.ndarray
    min: np.ndarray
    square: np.ndarray  # mean of x**2

    @property
    def absmax(self) -> np.ndarray:
        return np.maximum(np.abs(self.min), np.abs(self.max))


@dataclass(frozen=True)
class CalibrationStats:
    tensors: Mapping[str, TensorStats]
    samples: int
    batches: int
    channels: Mapping[str, ChannelStats] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        arrays = {"__meta__": np.array([STATS_VERSION, self.samples, self.batches], dtype=np.int64)}
        names = sorted(self.tensors)
        arrays["__names__"] = np.array(names)
        for i, n in enumerate(names):
            s = self.tensors[n]
            arrays[f"c{i}"] = s.counts
            arrays[f"r{i}"] = np.array([s.min, s.max, s.lo, s.hi], dtype=np.float64)
        chans = sorted(self.channels)
        arrays["__channels__"] = np.array(chans, dtype=str)
        for i, n in enumerate(chans):
            c = self.channels[n]
            arrays[f"m{i}"], arrays[f"x{i}"], arrays[f"a{i}"] = c.mean, c.max, np.array([c.axis], dtype=np.int64)
            arrays[f"n{i}"], arrays[f"q{i}"] = c.min, c.square
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        atomic_write_bytes(path, buf.getvalue())  # unique temp name: workers may save the same cache

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationStats:
        with np.load(path, allow_pickle=False) as z:
            version, samples, batches = (int(v) for v in z["__meta__"])
            if version != STATS_VERSION:
                raise ValueError("stale statistics cache")
            tensors = {}
            for i, n in enumerate(z["__names__"].tolist()):
                mn, mx, lo, hi = z[f"r{i}"].tolist()
                tensors[n] = TensorStats(mn, mx, z[f"c{i}"], lo, hi)
            channels = {n: ChannelStats(int(z[f"a{i}"][0]), z[f"m{i}"], z[f"x{i}"], z[f"n{i}"], z[f"q{i}"])
                        for i, n in enumerate(z["__channels__"].tolist())}
        return cls(tensors, samples, batches, channels)


class _Channels:
    """Running per-channel sum and sum of squares (float64), count, min and max along one axis."""

    def __init__(self, axis: int):
        self.axis, self.sum, self.sq, self.max, self.min, self.count = axis, None, None, None, None, 0

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 0 or x.size == 0:
            return
        x = np.moveaxis(x, self.axis, -1).reshape(-1, x.shape[self.axis])
        total, sq = x.sum(axis=0, dtype=np.float64), np.einsum("ij,ij->j", x, x, dtype=np.float64)
        top, bottom = x.max(axis=0), x.min(axis=0)
        first = self.sum is None
        self.sum = total if first else self.sum + total
        self.sq = sq if first else self.sq + sq
        self.max = top if first else np.maximum(self.max, top)
        self.min = bottom if first else np.minimum(self.min, bottom)
        self.count += x.shape[0]

    def stats(self) -> ChannelStats:
        if self.sum is None:
            empty = np.zeros(0, np.float32)
            return ChannelStats(self.axis, empty, empty, empty, empty)
        n = max(self.count, 1)
        return ChannelStats(self.axis, (self.sum / n).astype(np.float32), self.max.astype(np.float32),
                            self.min.astype(np.float32), (self.sq / n).astype(np.float32))


class _Histogram:
    """Streaming histogram whose range grows; old counts are re-binned on growth."""

    def __init__(self, bins: int = NUM_BINS):
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.int64)
        self.lo = self.hi = None
        self.min = np.inf
        self.max = -np.inf

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32).ravel()
        if x.size == 0:
            return
        mn, mx = float(x.min()), float(x.max())
        if not (np.isfinite(mn) and np.isfinite(mx)):
            raise FloatingPointError(f"non-finite values (min {mn}, max {mx})")
        self.min, self.max = min(self.min, mn), max(self.max, mx)
        if self.lo is None:
            lo, hi = mn, mx
            if hi - lo < 1e-12:
                lo, hi = lo - 1e-6, hi + 1e-6
            self.lo, self.hi = lo, hi
        elif mn < self.lo or mx > self.hi:
            self._grow(min(mn, self.lo), max(mx, self.hi))
        # bin index in float32 and one truncating cast (x >= lo: no negatives); x == hi lands one
        # past the last bin and is folded back, which saves two clipping passes over the tensor
        idx = np.subtract(x, np.float32(self.lo), dtype=np.float32)
        idx *= np.float32(self.bins / (self.hi - self.lo))
        counts = np.bincount(idx.astype(np.intp), minlength=self.bins)
        self.counts += counts[: self.bins]
        self.counts[-1] += counts[self.bins:].sum()

    def _grow(self, lo: float, hi: float) -> None:
        # Grow by at least 25% so a slowly widening tensor is not re-binned every batch.
        width = self.hi - self.lo
        lo = min(lo, self.lo - 0.25 * width) if lo < self.lo else lo
        hi = max(hi, self.hi + 0.25 * width) if hi > self.hi else hi
        old_centers = np.linspace(self.lo, self.hi, self.bins + 1)
        old_centers = (old_centers[:-1] + old_centers[1:]) / 2
        idx = np.clip(((old_centers - lo) * (self.bins / (hi - lo))).astype(np.int64), 0, self.bins - 1)
        self.counts = np.bincount(idx, weights=self.counts, minlength=self.bins).astype(np.int64)
        self.lo, self.hi = lo, hi

    def stats(self) -> TensorStats:
        if self.lo is None:
            return TensorStats(0.0, 0.0, self.counts, -1e-6, 1e-6)
        return TensorStats(self.min, self.max, self.counts, self.lo, self.hi)


def observing(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of the model that also outputs these intermediate tensors."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    present = {o.name for o in m.graph.output}
    for n in names:
        if n not in present:
            m.graph.output.append(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    return m


def collect(
    model: onnx.ModelProto,
    tensors: Iterable[str],
    feeds: Iterable[Mapping[str, np.ndarray]],
    threads: int = 0,
    chunk: int | None = None,
    channels: Mapping[str, int] | None = None,
) -> CalibrationStats:
    """The single calibration pass: every candidate tensor is a graph output of one session, the
    batches run in pieces of `chunk` samples (cache-sized; the statistics depend on it only through
    the order the histograms grow in, so it is part of the cache key). `channels` (tensor -> channel
    axis): tensors whose per-channel mean and max are recorded too (for accuracy recovery)."""
    import onnxruntime as ort

    from qsearch.engine.onnxruntime import make_session

    channels = dict(channels or {})
    names = sorted(set(tensors) | set(channels))
    m = observing(model, names)
    # basic optimizations only: with ~100 intermediate outputs, the layout transformer (NCHWc) adds a
    # reorder per output and the pass ran 5x slower (PP-LCNet: 3.9 s vs 0.8 s for 64 samples);
    # the model is already basic-optimized by `prepare`, so the values are the same
    sess = make_session(m, threads, level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    hists = {n: _Histogram() for n in names}
    per_channel = {n: _Channels(a) for n, a in channels.items()}
    samples = batches = 0
    for feed in feeds:
        for piece in chunks([feed], chunk):
            outs = sess.run(names, piece)
            for n, arr in zip(names, outs):
                try:
                    hists[n].add(arr)
                    if n in per_channel:
                        per_channel[n].add(arr)
                except FloatingPointError as exc:
                    raise QsearchError(f"calibration: tensor '{n}' has {exc} on the calibration data (batch "
                                       f"{batches}); the FP32 model overflows or the data is not what it expects") from None
        batches += 1
        samples += len(next(iter(feed.values())))
    if batches == 0:
        raise QsearchError("calibration data is empty: no batch to calibrate on")
    return CalibrationStats({n: h.stats() for n, h in hists.items()}, samples, batches,
                            {n: c.stats() for n, c in per_channel.items()})


def cache_key(*parts: str) -> str:
    h = hashlib.sha256(f"stats-v{STATS_VERSION}".encode())
    for p in parts:
        h.update(b"\0" + p.encode())
    return h.hexdigest()[:20]


# ---------------------------------------------------------------- ranges (pure functions)


def tensor_range(s: TensorStats, method: str, percentile: float = 99.99) -> tuple[float, float]:
    """The [rmin, rmax] to quantize a tensor with, always containing 0 (uint8 asymmetric).
    Memoized on the stats: every trial's plan asks again, entropy costs ~50 ms per tensor."""
    key = (method, percentile if method == "percentile" else None)
    if key not in s.ranges:
        s.ranges[key] = _range(s, method, percentile)
    return s.ranges[key]


def _range(s: TensorStats, method: str, percentile: float) -> tuple[float, float]:
    if method == "minmax":
        lo, hi = s.min, s.max
    elif method == "percentile":
        lo, hi = _percentile_range(s, percentile)
    elif method == "entropy":
        lo, hi = _entropy_range(s)
    elif method == "mse":
        lo, hi = _mse_range(s)
    else:
        raise ValueError(f"unknown calibration method {method!r}")
    return float(min(lo, 0.0)), float(max(hi, 0.0))


def _percentile_range(s: TensorStats, p: float) -> tuple[float, float]:
    total = s.counts.sum()
    if total == 0:
        return s.min, s.max
    cdf = np.cumsum(s.counts) / total
    edges = s.edges
    hi = edges[1:][min(np.searchsorted(cdf, p / 100.0), len(cdf) - 1)]
    lo = s.min
    if s.min < 0:  # two-sided: clip the low tail the same way
        lo = edges[:-1][min(np.searchsorted(cdf, 1.0 - p / 100.0), len(cdf) - 1)]
    return max(lo, s.min), min(hi, s.max)


def _symmetric_histogram(s: TensorStats, bins: int = NUM_BINS) -> tuple[np.ndarray, np.ndarray]:
    """The stored histogram re-binned onto [-max|x|, max|x|], zero at the centre bin."""
    amax = max(abs(s.lo), abs(s.hi), 1e-12)
    edges = np.linspace(-amax, amax, bins + 1)
    idx = np.clip(np.searchsorted(edges, s.centers, side="right") - 1, 0, bins - 1)
    return np.bincount(idx, weights=s.counts, minlength=bins), edges


def kl_threshold(hist: np.ndarray, levels: int = 128) -> int:
    """Entropy calibration: the half-width i (in bins, around the centre bin) of the window whose
    clipped, `levels`-quantized distribution is closest (KL divergence) to the reference.

    Windows grow symmetrically around zero and the clipped mass folds into the end bins, the
    TensorRT scheme as ONNX Runtime's quantizer runs it; a one-sided variant with one level per
    bin at the smallest window over-clips ReLU6 outputs, whose saturated values carry signal.
    Candidate windows are scored in blocks of rows (one array op per step for 64 windows, 2x faster
    than a loop over ~1000 windows); the earliest window with the smallest KL wins, as in the loop."""
    hist = np.asarray(hist, dtype=np.float64)
    zero = len(hist) // 2
    cum = np.concatenate([[0.0], np.cumsum(hist)])
    best_i, best_kl = zero, np.inf
    widths = np.arange(levels // 2, zero + 1)
    for c in range(0, len(widths), _KL_BLOCK):
        i, kl = _kl_block(hist, cum, widths[c:c + _KL_BLOCK], levels)
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i


_KL_BLOCK = 64


def _kl_block(hist: np.ndarray, cum: np.ndarray, widths: np.ndarray, levels: int,
              eps: float = 1e-4) -> tuple[int, float]:
    """The best (width, KL) among `widths`: one row per candidate window, padded to the widest."""
    n, zero = len(hist), len(hist) // 2
    a, b = zero - widths, np.minimum(zero + widths + 1, n)
    length = b - a
    rows = np.arange(len(widths))
    k = np.arange(int(length.max()))[None, :]
    valid = k < length[:, None]
    p = np.where(valid, hist[np.minimum(a[:, None] + k, n - 1)], 0.0)
    p[:, 0] += cum[a]  # the clipped tails fold into the end bins
    p[rows, length - 1] += cum[n] - cum[b]
    m = length // levels  # window bins per quantized level; the remainder joins the last level
    body = m * levels
    starts = np.arange(levels)[None, :] * m[:, None]
    group = cum[a[:, None] + starts + m[:, None]] - cum[a[:, None] + starts]  # of the unfolded window
    group[:, -1] += cum[b] - cum[a + body]
    nonzero = p != 0
    in_body = k < body[:, None]
    count = np.zeros((len(widths), k.shape[1] + 1))
    np.cumsum(nonzero & in_body, axis=1, out=count[:, 1:])
    per = np.take_along_axis(count, starts + m[:, None], 1) - np.take_along_axis(count, starts, 1)
    level = np.where(per > 0, np.floor(group / np.maximum(per, 1)), 0.0)
    q = np.where(in_body & nonzero, np.take_along_axis(level, np.minimum(k // m[:, None], levels - 1), 1), 0.0)
    smoothed = []
    for x in (p, q):  # eps of mass into empty bins so KL stays finite (TensorRT, ONNX Runtime)
        zeros = (x == 0) & valid
        n_zero = zeros.sum(1)
        y = x + eps * zeros - (eps * n_zero / np.maximum(length - n_zero, 1))[:, None] * (valid & ~zeros)
        total = y.sum(1)
        smoothed.append((y / np.where(total == 0, 1, total)[:, None], length - n_zero > 0))
    (ps, ok_p), (qs, ok_q) = smoothed
    pos = ps > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(pos, ps * np.log(np.where(pos, ps, 1) / np.where(pos, qs, 1)), 0.0).sum(1)
    kl = np.where(ok_p & ok_q & ~np.isnan(kl), kl, np.inf)
    j = int(np.argmin(kl))
    return int(widths[j]), float(kl[j])


def _entropy_range(s: TensorStats) -> tuple[float, float]:
    if s.counts.sum() == 0:
        return s.min, s.max
    hist, edges = _symmetric_histogram(s)
    i = kl_threshold(hist)
    zero = len(hist) // 2
    return max(float(edges[zero - i]), s.min), min(float(edges[min(zero + i + 1, len(hist))]), s.max)


def _mse_range(s: TensorStats, steps: int = 100) -> tuple[float, float]:
    """Shrink [min, max] towards 0 by the factor that minimizes expected quantization MSE."""
    if s.counts.sum() == 0:
        return s.min, s.max
    lo0, hi0 = min(s.min, 0.0), max(s.max, 0.0)
    alphas = np.linspace(0.05, 1.0, steps)[:, None]
    lo, hi = alphas * lo0, alphas * hi0
    step = np.maximum((hi - lo) / 255.0, 1e-12)
    c = s.centers[None, :]
    clipped = np.clip(c, lo, hi)
    err = (c - clipped) ** 2 + np.where((c >= lo) & (c <= hi), step**2 / 12.0, 0.0)
    mse = (err * s.counts[None, :]).sum(axis=1)
    a = float(alphas[int(np.argmin(mse)), 0])
    return a * lo0, a * hi0
