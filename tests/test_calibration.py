import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qsearch.calibration import (
    CalibrationStats,
    TensorStats,
    _Histogram,
    collect,
    kl_threshold,
    tensor_range,
)
from qsearch.model.load import prepare
from qsearch.qparams import activation_qparams, quantize_weight


def _stats(x, bins=2048):
    h = _Histogram(bins)
    h.add(x)
    return h.stats()


def test_activation_qparams_hand_computed():
    scale, zp = activation_qparams(-1.0, 3.0)
    assert scale == pytest.approx(4.0 / 255)
    assert zp == round(1.0 / (4.0 / 255))  # 64
    scale, zp = activation_qparams(0.0, 6.0)  # post-ReLU: zero point 0 so ORT can drop the Relu
    assert zp == 0 and scale == pytest.approx(6 / 255)
    assert activation_qparams(2.0, 5.0)[1] == 0  # range is widened to contain 0


def test_quantize_weight_per_channel_and_per_tensor():
    w = np.array([[1.0, -0.5], [0.01, 0.02]], dtype=np.float32)
    q, s = quantize_weight(w, axis=0, per_channel=True)
    np.testing.assert_allclose(s, [1 / 127, 0.02 / 127], rtol=1e-6)
    np.testing.assert_array_equal(q[0], [127, -64])
    assert q[1, 1] == 127 and abs(int(q[1, 0]) - 64) <= 1
    q, s = quantize_weight(w, axis=0, per_channel=False)
    assert s.shape == () and s == pytest.approx(1 / 127)
    np.testing.assert_array_equal(q[1], [1, 3])  # the small channel keeps almost no resolution


def test_minmax_and_percentile_ranges():
    x = np.concatenate([np.linspace(0, 1, 10000), [50.0]]).astype(np.float32)
    s = _stats(x)
    assert tensor_range(s, "minmax") == (0.0, pytest.approx(50.0))
    lo, hi = tensor_range(s, "percentile", 99.9)
    assert lo == 0.0 and 0.9 < hi < 1.1  # the single outlier is clipped


def test_entropy_and_mse_clip_outliers_but_keep_bulk():
    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(0, 1, 200_000)).astype(np.float32)
    x[:5] = 40.0
    s = _stats(x)
    lo, hi = tensor_range(s, "entropy")
    assert lo == 0.0 and 2.5 < hi < 20.0, hi
    # MSE keeps rare large outliers (clipping them costs more than rounding) but clips long tails
    assert tensor_range(s, "mse")[1] > 30
    data = np.abs(rng.laplace(0, 1, 200_000)).astype(np.float32)
    tail = _stats(data)
    assert tensor_range(tail, "mse")[1] < tail.max

    def qmse(r):  # real quantize-dequantize error on the data itself
        scale, zp = activation_qparams(*r)
        q = np.clip(np.round(data / scale) + zp, 0, 255)
        return float(np.mean(((q - zp) * scale - data) ** 2))

    assert qmse(tensor_range(tail, "mse")) < qmse(tensor_range(tail, "minmax"))
    two_sided = _stats(rng.normal(0, 1, 100_000).astype(np.float32))
    lo, hi = tensor_range(two_sided, "entropy")
    assert lo < -2 and hi > 2


def test_kl_threshold_keeps_uniform_distribution_whole():
    hist = np.ones(2048)
    assert kl_threshold(hist) == 1024


def _kl_threshold_loop(hist, levels=128, eps=1e-4):
    """The TensorRT/ONNX Runtime scheme written as the plain loop over windows: the oracle the
    blocked implementation must agree with."""
    def smooth(p):
        zeros = p == 0
        nonzero = int((~zeros).sum())
        return None if nonzero == 0 else p + eps * zeros - (eps * float(zeros.sum()) / nonzero) * (~zeros)

    hist = np.asarray(hist, dtype=np.float64)
    n, zero = len(hist), len(hist) // 2
    cum = np.concatenate([[0.0], np.cumsum(hist)])
    best_i, best_kl = zero, np.inf
    for i in range(levels // 2, zero + 1):
        a, b = zero - i, min(zero + i + 1, n)
        window = hist[a:b]
        p = window.copy()
        p[0] += cum[a]
        p[-1] += cum[n] - cum[b]
        m = len(window) // levels
        body = m * levels
        group = window[:body].reshape(levels, m).sum(1)
        group[-1] += window[body:].sum()
        nz = p != 0
        per = nz[:body].reshape(levels, m).sum(1)
        q = np.zeros(len(p))
        q[:body] = np.repeat(np.where(per > 0, np.floor(group / np.maximum(per, 1)), 0.0), m) * nz[:body]
        ps, qs = smooth(p), smooth(q)
        if ps is None or qs is None:
            continue
        ps, qs = ps / ps.sum(), qs / qs.sum()
        pos = ps > 0
        with np.errstate(divide="ignore"):
            kl = float(np.sum(ps[pos] * np.log(ps[pos] / qs[pos])))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["normal", "relu", "sparse", "spike", "empty_side"]),
       st.sampled_from([256, 512, 2048]))
def test_kl_threshold_matches_the_plain_loop(seed, shape, bins):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(20_000) * rng.uniform(0.1, 3)
    if shape == "relu":
        x = np.maximum(x, 0)
    elif shape == "spike":
        x[: rng.integers(1, 2000)] = x.max()
    elif shape == "empty_side":
        x = np.abs(x) + 1
    hist = np.histogram(x, bins=bins, range=(-abs(x).max() - 1e-3, abs(x).max() + 1e-3))[0].astype(np.float64)
    if shape == "sparse":
        hist = rng.integers(0, 5, bins) * (rng.random(bins) < 0.2)
    assert kl_threshold(hist) == _kl_threshold_loop(hist)


def test_entropy_keeps_relu6_saturation():
    """Post-ReLU6 data: most values near 0, a spike at 6 that carries signal; KL must not cut it."""
    rng = np.random.default_rng(1)
    x = np.clip(np.abs(rng.normal(0, 1.2, 100_000)), 0, 6).astype(np.float32)
    x[:3000] = 6.0
    lo, hi = tensor_range(_stats(x), "entropy")
    assert lo == 0.0 and hi > 4.5


def test_histogram_growth_keeps_counts_and_extremes():
    h = _Histogram(256)
    h.add(np.linspace(0, 1, 1000))
    h.add(np.linspace(-2, 5, 1000))
    s = h.stats()
    assert s.counts.sum() == 2000 and s.min == -2 and s.max == 5
    assert s.lo <= -2 and s.hi >= 5


def test_stats_roundtrip(tmp_path):
    s = CalibrationStats({"t": TensorStats(-1.0, 2.0, np.arange(8), -1.0, 2.0)}, samples=3, batches=1)
    s.save(tmp_path / "c.npz")
    r = CalibrationStats.load(tmp_path / "c.npz")
    assert r.samples == 3 and r.tensors["t"].max == 2.0
    np.testing.assert_array_equal(r.tensors["t"].counts, np.arange(8))


def test_collect_is_one_pass_for_every_method(cnn):
    """All four methods' ranges come from a single pass over the data: each batch is read once."""
    prepared = prepare(cnn)
    reads = []
    rng = np.random.default_rng(0)
    batches = [{"x": rng.normal(0, 1, (4, 3, 8, 8)).astype(np.float32)} for _ in range(5)]

    def feeds():
        for i, b in enumerate(batches):
            reads.append(i)
            yield b

    tensors = [t for la in prepared.layers for t in (*la.activations, la.output)]
    stats = collect(prepared.proto, tensors, feeds())
    assert reads == [0, 1, 2, 3, 4]
    for t in tensors:
        ranges = {m: tensor_range(stats.tensors[t], m) for m in ("minmax", "entropy", "percentile", "mse")}
        assert all(lo <= 0 <= hi for lo, hi in ranges.values())
        assert ranges["percentile"][1] <= ranges["minmax"][1] + 1e-6
    assert reads == [0, 1, 2, 3, 4]  # deriving ranges never touched the data again
