"""Accuracy recovery: equalization and bias correction against hand-computed values, the
equalized float model against the original (property), the sidecar round trip byte for byte,
and every bad recovery input refused in one line."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qsearch.cli import main
from qsearch.model.load import Layer, prepare
from qsearch.plan.format import LayerChoice
from qsearch.plan.io import read_plan
from qsearch.recovery.equalization import bias_delta, compute_scales, equalized_model, find_pairs, pair_scales
from tests.conftest import last_error, open_bench, write_workload


def make_dw_cnn(act: str = "relu6", seed: int = 0, spread: float = 100.0, channels: int = 8) -> onnx.ModelProto:
    """x(N,3,8,8) -> conv_a + act -> depthwise conv_b + act -> 1x1 conv_c -> GAP -> fc: the
    depthwise weights' channel ranges `spread` apart and conv_c compensating (BatchNorm folded
    in), so every channel matters equally downstream: the case CLE is for."""
    rng = np.random.default_rng(seed)
    c = channels
    gain = np.geomspace(1.0, spread, c).astype(np.float32) / spread ** 0.5
    wb = rng.normal(0, 0.3, (c, 1, 3, 3)).astype(np.float32) * gain.reshape(c, 1, 1, 1)
    wc = rng.normal(0, 0.3, (c, c, 1, 1)).astype(np.float32) / gain.reshape(1, c, 1, 1)
    inits = {"wa": rng.normal(0, 0.4, (c, 3, 3, 3)), "ba": rng.normal(0.2, 0.1, c), "wb": wb,
             "bb": rng.normal(0.1, 0.1, c) * gain, "wc": wc, "bc": rng.normal(0, 0.1, c),
             "wfc": rng.normal(0, 0.3, (10, c)), "bfc": rng.normal(0, 0.1, 10),
             "shape": np.array([0, -1], dtype=np.int64), "lo": np.float32(0.0), "hi": np.float32(6.0)}

    def activation(src: str, dst: str, name: str) -> list:
        if act == "relu":
            return [helper.make_node("Relu", [src], [dst], name=name)]
        if act == "relu6":
            return [helper.make_node("Clip", [src, "lo", "hi"], [dst], name=name)]
        return [helper.make_node("Identity", [src], [dst], name=name)]

    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
             *activation("a", "a_act", "act_a"),
             helper.make_node("Conv", ["a_act", "wb", "bb"], ["b"], name="conv_b", pads=[1, 1, 1, 1], group=c),
             *activation("b", "b_act", "act_b"),
             helper.make_node("Conv", ["b_act", "wc", "bc"], ["cc"], name="conv_c"),
             helper.make_node("GlobalAveragePool", ["cc"], ["g"], name="gap"),
             helper.make_node("Reshape", ["g", "shape"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wfc", "bfc"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(
        nodes, "dwcnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(np.asarray(v, np.int64 if k == "shape" else np.float32), k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


# ---------------------------------------------------------------------- hand-computed values
def test_equalization_scales_by_hand():
    w1 = np.array([2.0, 0.5], np.float32).reshape(2, 1, 1, 1)  # head: channel ranges 2 and 0.5
    w2 = np.array([1.0, 4.0], np.float32).reshape(1, 2, 1, 1)  # tail reads them with ranges 1 and 4
    s = pair_scales(w1, w2, groups=1, clip=None, conv_max=None)
    np.testing.assert_allclose(s, [np.sqrt(2.0), np.sqrt(0.125)], rtol=1e-6)
    # both sides meet at sqrt(r1 * r2) = sqrt(2) per channel
    np.testing.assert_allclose(w1.ravel() / s, [np.sqrt(2)] * 2, rtol=1e-6)
    np.testing.assert_allclose(w2.ravel() * s, [np.sqrt(2)] * 2, rtol=1e-6)
    # a depthwise tail: channel c is its own group
    dw = np.array([1.0, 4.0], np.float32).reshape(2, 1, 1, 1)
    np.testing.assert_allclose(pair_scales(w1, dw, groups=2, clip=None, conv_max=None), s, rtol=1e-6)


def test_clip_aware_scales_by_hand():
    w1 = np.array([1.0, 1.0, 1.0], np.float32).reshape(3, 1, 1, 1)
    w2 = np.array([4.0, 4.0, 0.25], np.float32).reshape(1, 3, 1, 1)  # raw scales 0.5, 0.5, 2
    # channel 0 reaches the clip (keeps 1); channel 1 peaks at 4.5 (s >= 4.5/6 = 0.75); channel 2 may shrink
    s = pair_scales(w1, w2, groups=1, clip=6.0, conv_max=np.array([7.0, 4.5, 1.0]))
    np.testing.assert_allclose(s, [1.0, 0.75, 2.0], rtol=1e-6)


def test_bias_correction_by_hand():
    gemm = Layer("fc", "Gemm", ("fc",), ("x",), "y", weight="w", weight_axis=1)  # y = x @ W, W (K=2, N=2)
    w = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    deq = w + np.array([[0.1, 0.0], [0.0, -0.2]], np.float32)
    # delta_n = -sum_k (Wq - W)[k, n] E[x_k]
    np.testing.assert_allclose(bias_delta(gemm, w, deq, np.array([1.0, 2.0], np.float32)), [-0.1, 0.4], rtol=1e-6)
    # a grouped conv (2 groups of one input channel each): each output sums its kernel's error
    conv = Layer("c", "Conv", ("c",), ("x",), "y", weight="w")
    wc = np.zeros((2, 1, 2, 1), np.float32)
    err = np.array([[[[0.1], [0.2]]], [[[-0.3], [0.0]]]], np.float32)
    np.testing.assert_allclose(bias_delta(conv, wc, wc + err, np.array([2.0, 5.0], np.float32), groups=2),
                               [-(0.3 * 2.0), 0.3 * 5.0], rtol=1e-6)


# ---------------------------------------------------------------------- the equalized float model
@settings(max_examples=12, deadline=None)
@given(act=st.sampled_from(["relu", "relu6", "none"]), seed=st.integers(0, 1000),
       spread=st.floats(1.0, 1000.0), channels=st.integers(1, 6))
def test_equalized_float_model_reproduces_outputs(act, seed, spread, channels):
    """Relu and nothing commute with a positive channel scale: exact on any input. Under Relu6
    the scales are clip-aware from the data's maxima: exact on that data."""
    prepared = prepare(make_dw_cnn(act, seed, spread, channels))
    pairs = find_pairs(prepared)
    assert [(p.head, p.tail) for p in pairs] == [("conv_a", "conv_b"), ("conv_b", "conv_c")]
    x = np.random.default_rng(seed).normal(0, 2, (16, 3, 8, 8)).astype(np.float32)
    probe = onnx.ModelProto()
    probe.CopyFrom(prepared.proto)
    for p in pairs:
        probe.graph.output.append(helper.make_tensor_value_info(p.conv_out, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"x": x})
    conv_max = {p.conv_out: o.max(axis=(0, 2, 3)) for p, o in zip(pairs, outs[1:])}
    scales = compute_scales(prepared, conv_max)
    eq = equalized_model(prepared, scales)
    y = ort.InferenceSession(eq.proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, outs[0], rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(outs[0]).max())))
    if act == "relu6":
        assert all(p.clip == 6.0 for p in pairs)


# ---------------------------------------------------------------------- plans with recovery
@pytest.fixture
def dw_workload(tmp_path):
    return write_workload(tmp_path / "w", make_dw_cnn(), n=64, max_drop="0.005")


def _everywhere(bench, recovery: str, granularity: str = "per_tensor") -> dict:
    from qsearch.recovery.equalization import correctable

    partnered = {n for p in bench.recovery.pairs for n in (p.head, p.tail)}
    out = {}
    for la in bench.candidates():
        parts = [t for t in recovery.split("+") if (t == "cle" and la.name in partnered)
                 or (t == "bias" and correctable(la))]
        out[la.name] = LayerChoice("int8", "minmax", granularity, "+".join(parts) or "none")
    return out


def _output_error(bench, plan) -> tuple[float, np.ndarray]:
    """(mean squared error of the outputs, mean error per output) on the search data vs FP32."""
    x = np.concatenate([b["x"] for b in bench.search_data.batches])
    ref = ort.InferenceSession(bench.prepared.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(bench.rewriter(plan).SerializeToString(), providers=["CPUExecutionProvider"])
    d = got.run(None, {"x": x})[0] - ref.run(None, {"x": x})[0]
    return float((d ** 2).mean()), d.mean(axis=0)


def test_equalization_and_bias_correction_reduce_the_error(dw_workload, tmp_path):
    bench = open_bench(dw_workload, tmp_path / "cache")
    plain = _output_error(bench, bench.plan(_everywhere(bench, "none")))
    cle = _output_error(bench, bench.plan(_everywhere(bench, "cle")))
    both = _output_error(bench, bench.plan(_everywhere(bench, "cle+bias")))
    assert cle[0] < plain[0] / 4  # the 100x-apart depthwise channels stop rounding to nothing
    bias = _output_error(bench, bench.plan(_everywhere(bench, "bias")))
    assert np.abs(bias[1]).mean() < np.abs(plain[1]).mean()  # the mean output error shrinks
    assert both[0] < plain[0]


def test_apply_with_sidecar_rebuilds_the_model_byte_for_byte(dw_workload, tmp_path):
    bench = open_bench(dw_workload, tmp_path / "cache")
    plan = bench.plan(_everywhere(bench, "cle+bias"))
    assert plan.sidecar.scales() and plan.sidecar.means()
    out = tmp_path / "p" / "plan.yaml"
    out.parent.mkdir()
    plan.write(out)
    side = out.parent / "plan.recovery.onnx"
    assert yaml.safe_load(out.read_text())["recovery"] == {"file": side.name,
                                                           "sha256": hashlib.sha256(side.read_bytes()).hexdigest()}
    assert read_plan(out) == plan
    assert main(["apply", str(out), str(dw_workload.parent / "model.onnx"), "-o", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").read_bytes() == bench.rewriter(plan).SerializeToString()
    entry = next(e for e in yaml.safe_load(out.read_text())["layers"] if e["layer"] == "conv_a")
    assert entry["recovery"] == "cle+bias" and "equalized with conv_b" in entry["recovery_factors"]


def test_equalization_is_dropped_and_said_so_when_the_partner_is_float(dw_workload, tmp_path):
    bench = open_bench(dw_workload, tmp_path / "cache")
    choices = _everywhere(bench, "cle")
    choices["conv_c"] = LayerChoice("fp32")
    plan = bench.plan(choices)
    assert set(plan.sidecar.scales()) == {"conv_a"}  # conv_b -> conv_c is not equalized
    assert "equalization with conv_c dropped: conv_c is not int8" in plan.notes["conv_b"].recovery


# ---------------------------------------------------------------------- bad recovery input
def _written(dw_workload, tmp_path):
    bench = open_bench(dw_workload, tmp_path / "cache")
    plan = bench.plan(_everywhere(bench, "cle+bias"))
    path = tmp_path / "p" / "plan.yaml"
    path.parent.mkdir(exist_ok=True)
    plan.write(path)
    return path, path.parent / "plan.recovery.onnx"


def _forge(side, arrays: dict, plan_path) -> None:
    """A sidecar with other arrays, its sha256 written into the plan (a hostile but consistent pair)."""
    g = helper.make_graph([], "qsearch_recovery", [], [],
                          [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in sorted(arrays.items())])
    side.write_bytes(g.SerializeToString(deterministic=True))
    text = plan_path.read_text()
    plan_path.write_text(re.sub(r"sha256: [0-9a-f]{64}", f"sha256: {hashlib.sha256(side.read_bytes()).hexdigest()}",
                                text))


def _edit_layer(text: str, layer: str, old: str, new: str) -> str:
    head, tail = text.split(f"- layer: {layer}\n", 1)
    return head + f"- layer: {layer}\n" + tail.replace(old, new, 1)


@pytest.mark.parametrize("case, message", [
    ("no_partner", "asks for recovery cle but has no equalization partner"),
    ("no_weight", "bias correction needs a Conv or Gemm"),
    ("missing", "recovery sidecar"),
    ("truncated", "does not match the plan's"),
    ("foreign", "does not match the plan's"),
    ("negative", "equalization scales must be positive"),
    ("not_finite", "finite numbers"),
    ("path", "must be a file name next to the plan"),
    ("partner_edited", "re-run optimize"),
    ("float_recovery", "needs precision int8"),
])
def test_bad_recovery_input_is_refused_in_one_line(dw_workload, tmp_path, capsys, case, message):
    plan, side = _written(dw_workload, tmp_path)
    text = plan.read_text()
    if case == "no_partner":
        plan.write_text(_edit_layer(text, "fc", "recovery: bias", "recovery: cle+bias"))
    elif case == "no_weight":
        plan.write_text(_edit_layer(text, "gap", "calibration: minmax", "calibration: minmax\n  recovery: bias"))
    elif case == "missing":
        side.unlink()
    elif case == "truncated":
        side.write_bytes(side.read_bytes()[:-7])
    elif case == "foreign":
        other = make_dw_cnn(seed=3)
        side.write_bytes(other.graph.SerializeToString())
    elif case in ("negative", "not_finite"):
        arrays = {n.name: numpy_helper.to_array(n) for n in onnx.GraphProto.FromString(side.read_bytes()).initializer}
        key = "equalize/conv_a" if case == "negative" else "mean/conv_c"
        arrays[key] = -arrays[key] if case == "negative" else arrays[key] * np.nan
        _forge(side, arrays, plan)
    elif case == "path":
        plan.write_text(text.replace("file: plan.recovery.onnx", "file: ../plan.recovery.onnx"))
    elif case == "partner_edited":  # the pair's ranges were calibrated equalized: a float partner is refused
        plan.write_text(_edit_layer(_edit_layer(text, "conv_c", "precision: int8", "precision: fp32"), "conv_c",
                                    "  recovery: cle+bias\n", ""))
    elif case == "float_recovery":
        plan.write_text(_edit_layer(text, "conv_c", "precision: int8", "precision: fp32"))
    out = tmp_path / "out.onnx"
    assert main(["apply", str(plan), str(dw_workload.parent / "model.onnx"), "-o", str(out)]) == 2
    err = last_error(capsys)
    assert message in err and "\n" not in err
    assert not out.exists()


def test_baseline_recovery_the_search_space_does_not_allow(tmp_path, capsys):
    cfg = write_workload(tmp_path / "w", make_dw_cnn(), n=32, extra="search_space: {recovery: [none]}\n")
    out = tmp_path / "naive.yaml"
    assert main(["baseline", "naive", "--recovery", "cle", "--config", str(cfg), "--out", str(tmp_path / "o"),
                 "-o", str(out)]) == 2
    assert "recovery cle is not allowed by the search space" in last_error(capsys)
    assert not out.exists()
    bad = write_workload(tmp_path / "w2", make_dw_cnn(), n=32, extra="search_space: {recovery: [none, cle]}\n")
    assert main(["baseline", "naive", "--config", str(bad), "--out", str(tmp_path / "o"), "-o", str(out)]) == 2
    assert "'none' cannot be listed with techniques" in last_error(capsys)
