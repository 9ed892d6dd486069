"""SmoothQuant as a plan option: factors by hand, the noise model, the rewrite (a Mul, or folded
into the LayerNorm), MatMul bias correction through its Add, the sidecar, bad input."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qsearch.calibration import ChannelStats
from qsearch.cli import main
from qsearch.model.load import Layer
from qsearch.plan.format import LayerChoice
from qsearch.recovery.equalization import bias_delta
from qsearch.recovery.smoothing import output_noise, scales_for, smoothed_range
from tests.conftest import last_error, open_bench, write_workload
from tests.test_recovery import _edit_layer, _forge


def make_attention_like(residual: bool, seed: int = 0, outlier: float = 40.0) -> onnx.ModelProto:
    """x (N,3,8,8) -> tokens (N,8,24) -> LayerNorm whose gamma has one channel `outlier`x the
    rest -> q and v projections (MatMul + bias Add) -> (+ the LayerNorm output when `residual`,
    which then also reads it) -> mean over tokens -> fc. The q/v input has an outlier channel."""
    rng = np.random.default_rng(seed)
    gamma = np.ones(24, np.float32)
    gamma[5] = outlier
    inits = [numpy_helper.from_array(np.array([-1, 8, 24], np.int64), "shape"),
             numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(np.zeros(24, np.float32), "beta"),
             numpy_helper.from_array(np.array([1], np.int64), "axes"),
             numpy_helper.from_array(rng.normal(0, 0.3, (24, 10)).astype(np.float32), "wfc"),
             numpy_helper.from_array(np.zeros(10, np.float32), "bfc")]
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["tok"], name="tokens"),
             helper.make_node("LayerNormalization", ["tok", "gamma", "beta"], ["ln"], name="ln", axis=-1)]
    for k in ("q", "v"):
        inits += [numpy_helper.from_array(rng.normal(0, 0.2, (24, 24)).astype(np.float32), f"w{k}"),
                  numpy_helper.from_array(rng.normal(0, 0.1, 24).astype(np.float32), f"b{k}")]
        nodes += [helper.make_node("MatMul", ["ln", f"w{k}"], [f"{k}_mm"], name=f"mm_{k}"),
                  helper.make_node("Add", [f"{k}_mm", f"b{k}"], [k], name=f"bias_{k}")]
    nodes.append(helper.make_node("Add", ["q", "v"], ["qv"], name="sum_qv"))
    last = "qv"
    if residual:
        nodes.append(helper.make_node("Add", ["qv", "ln"], ["res"], name="residual"))
        last = "res"
    nodes += [helper.make_node("ReduceMean", [last, "axes"], ["pooled"], name="pool", keepdims=0),
              helper.make_node("Gemm", ["pooled", "wfc", "bfc"], ["y"], name="fc")]
    g = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


# ---------------------------------------------------------------------- closed form, by hand
def test_smoothing_factors_and_range_by_hand():
    s = scales_for(np.array([4.0, 1.0, 0.0]), np.array([1.0, 4.0, 2.0]), 0.5)
    np.testing.assert_allclose(s, [2.0, 0.5, 1.0])  # sqrt(4/1), sqrt(1/4); a silent channel keeps 1
    chan = ChannelStats(-1, np.zeros(2, np.float32), np.array([4.0, 1.0], np.float32),
                        np.array([-2.0, 0.5], np.float32), np.ones(2, np.float32))
    assert smoothed_range(chan, np.array([2.0, 0.5], np.float32)) == (-1.0, 2.0)  # [min/s, max/s], zero in


def test_smoothing_lowers_the_expected_noise_of_an_outlier_channel():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.2, (8, 6))
    top = np.ones(8, np.float32)
    top[2] = 50.0  # one channel 50x the others: a per-tensor activation scale spends its levels on it
    chan = ChannelStats(-1, np.zeros(8, np.float32), top, -top, (top / 3) ** 2)
    plain = output_noise([w], chan, np.ones(8, np.float32), per_channel=True)
    smoothed = output_noise([w], chan, scales_for(top, np.abs(w).max(1), 0.5), per_channel=True)
    assert smoothed < plain / 3


def test_matmul_bias_correction_by_hand():
    layer = Layer("mm", "MatMul", ("mm",), ("x",), "y", weight="w", weight_axis=1, bias_add="add")
    w = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)  # (K=2, N=2)
    deq = w + np.array([[0.1, 0.0], [0.0, -0.2]], np.float32)
    # -(dW^T E[x]) per output: x means (2, 5) -> -(2*0.1 + 5*0), -(2*0 + 5*-0.2)
    np.testing.assert_allclose(bias_delta(layer, w, deq, np.array([2.0, 5.0], np.float32)), [-0.2, 1.0], rtol=1e-6)


# ---------------------------------------------------------------------- plans that smooth
def _bench(tmp_path, residual: bool):
    cfg = write_workload(tmp_path / "w", make_attention_like(residual), n=64, max_drop="0.01")
    return cfg, open_bench(cfg, tmp_path / "cache")


def _all_int8(bench, recovery: str) -> dict:
    smoothable = {n for sm in bench.recovery.smoothing.values() for n in sm.group.layers}
    return {la.name: LayerChoice("int8", "minmax", "per_channel",
                                 recovery if la.name in smoothable and la.op_type == "MatMul" else "none")
            for la in bench.candidates() if la.op_type == "MatMul"}


def _error(bench, plan) -> float:
    x = np.concatenate([b["x"] for b in bench.search_data.batches])
    ref = ort.InferenceSession(bench.prepared.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(bench.rewriter(plan).SerializeToString(), providers=["CPUExecutionProvider"])
    return float(((got.run(None, {"x": x})[0] - ref.run(None, {"x": x})[0]) ** 2).mean())


@pytest.mark.parametrize("residual", [False, True])
def test_smoothing_reduces_the_error_with_a_mul_or_folded(tmp_path, residual):
    _, bench = _bench(tmp_path, residual)
    (sm,) = [s for s in bench.recovery.smoothing.values() if s.group.tensor == "ln"]
    assert set(sm.group.layers) == {"mm_q", "mm_v"} and sm.scales[5] > 2 * np.median(sm.scales)
    plain, smooth = bench.plan(_all_int8(bench, "none")), bench.plan(_all_int8(bench, "smooth"))
    assert _error(bench, smooth) < 0.75 * _error(bench, plain)  # the rest: the outputs' own Q/DQ
    model = bench.rewriter(smooth)
    muls = [n for n in model.graph.node if n.op_type == "Mul"]
    gamma = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "gamma"))
    if residual:  # the residual Add needs the original: one Mul feeds both projections
        assert len(muls) == 1 and gamma[5] == 40.0
        assert "one Mul inserted" in smooth.notes["mm_q"].recovery
    else:  # every reader is smoothed: the divisor goes into the LayerNorm's scale, no Mul
        assert not muls and gamma[5] == pytest.approx(40.0 / sm.scales[5])
        assert "folded into LayerNormalization 'ln'" in smooth.notes["mm_v"].recovery
    assert f"alpha {sm.alpha:g}" in smooth.notes["mm_q"].recovery


def test_matmul_bias_correction_goes_into_its_add_and_apply_rebuilds_it(tmp_path):
    cfg, bench = _bench(tmp_path, True)
    plan = bench.plan(_all_int8(bench, "smooth+bias"))
    assert set(plan.sidecar.means()) == {"mm_q", "mm_v"} and set(plan.sidecar.of("smooth")) == {"ln"}
    model = bench.rewriter(plan)
    bq = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "bq"))
    orig = numpy_helper.to_array(next(i for i in bench.prepared.proto.graph.initializer if i.name == "bq"))
    assert not np.allclose(bq, orig)  # the correction is in the bias Add's constant
    path = tmp_path / "p" / "plan.yaml"
    path.parent.mkdir()
    plan.write(path)
    assert main(["apply", str(path), str(cfg.parent / "model.onnx"), "-o", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").read_bytes() == model.SerializeToString()
    assert main(["show", str(path)]) == 0


@pytest.mark.parametrize("case, message", [
    ("not_matmul", "smoothing needs a MatMul or Gemm"),
    ("method", "a smoothed input's range is MinMax"),
    ("negative", "smoothing factors must be positive"),
    ("stray", "which no int8 layer with recovery smooth reads"),
    ("unsmoothed", "is smoothed but the sidecar has no 24 smoothing factors"),
])
def test_bad_smoothing_input_is_refused_in_one_line(tmp_path, capsys, case, message):
    cfg, bench = _bench(tmp_path, True)
    path = tmp_path / "p" / "plan.yaml"
    path.parent.mkdir()
    bench.plan({**_all_int8(bench, "smooth"), "sum_qv": LayerChoice("int8", "minmax")}).write(path)
    side, text = path.parent / "plan.recovery.onnx", path.read_text()
    arrays = {n.name: numpy_helper.to_array(n) for n in onnx.GraphProto.FromString(side.read_bytes()).initializer}
    if case == "not_matmul":
        path.write_text(_edit_layer(text, "sum_qv", "calibration: minmax", "calibration: minmax\n  recovery: smooth"))
    elif case == "method":
        path.write_text(_edit_layer(text, "mm_q", "calibration: minmax", "calibration: percentile"))
    elif case == "negative":
        _forge(side, {**arrays, "smooth/ln": -arrays["smooth/ln"]}, path)
    elif case == "stray":
        _forge(side, {**arrays, "smooth/pooled": np.ones(24), "smooth_range/pooled": np.array([0.0, 1.0])}, path)
    elif case == "unsmoothed":
        _forge(side, {}, path)
    out = tmp_path / "out.onnx"
    assert main(["apply", str(path), str(cfg.parent / "model.onnx"), "-o", str(out)]) == 2
    err = last_error(capsys)
    assert message in err and "\n" not in err
    assert not out.exists()


# ---------------------------------------------------------------------- learned rounding
def test_learned_rounding_beats_nearest_on_correlated_inputs():
    from qsearch.recovery.rounding import layer_problem, learn

    rng = np.random.default_rng(0)
    x = (rng.normal(0, 1, (2048, 32)) @ rng.normal(0, 1, (32, 32)) * 0.3 + rng.normal(0, 1, (2048, 32)))
    w = rng.normal(0, 0.1, (16, 32)).astype(np.float32)
    layer = Layer("g", "Gemm", ("g",), ("x",), "y", weight="w", weight_axis=0)
    for per_channel in (True, False):
        wg, sg, g, back = layer_problem(layer, w, per_channel, x.astype(np.float32))
        codes, nearest, learned = learn(wg, sg, g)
        assert learned < 0.8 * nearest  # neighbouring weights' errors stop adding up
        c = back(codes)
        assert c.shape == w.shape and np.all(np.abs(c) <= 127) and np.all(c == np.round(c))
        # each weight rounds down or up, never further
        assert np.all(np.abs(c * sg[0, :, 0][:, None] - w) <= sg[0, :, 0][:, None] * (1 + 1e-6))


def test_rounded_plan_is_written_checked_and_rebuilt(tmp_path, capsys):
    from qsearch.recovery.rounding import learn_for_plan

    cfg, bench = _bench(tmp_path, False)
    plan, rounded = learn_for_plan(bench, bench.plan(_all_int8(bench, "smooth")), ["mm_q", "mm_v"])
    assert set(rounded) == {"mm_q", "mm_v"} and plan.choice("mm_q").recovery == "smooth+round"
    assert all(r.learned_error <= r.nearest_error for r in rounded.values())
    assert "less output error than nearest rounding" in plan.notes["mm_q"].recovery
    path = tmp_path / "p" / "plan.yaml"
    path.parent.mkdir()
    plan.write(path)
    assert main(["apply", str(path), str(cfg.parent / "model.onnx"), "-o", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").read_bytes() == bench.rewriter(plan).SerializeToString()
    side = path.parent / "plan.recovery.onnx"
    arrays = {n.name: numpy_helper.to_array(n) for n in onnx.GraphProto.FromString(side.read_bytes()).initializer}
    for forged, message in (({**arrays, "round/mm_q": arrays["round/mm_q"] + 0.5}, "must be integers"),
                            ({k: v for k, v in arrays.items() if k != "round/mm_v"}, "no 576 weight codes")):
        _forge(side, forged, path)
        assert main(["apply", str(path), str(cfg.parent / "model.onnx"), "-o", str(tmp_path / "bad.onnx")]) == 2
        assert message in last_error(capsys)
        assert not (tmp_path / "bad.onnx").exists()


@pytest.mark.parametrize("codes", ["int7", "int8"])
def test_learned_rounding_keeps_the_weights_scale_for_every_encoding(codes, tmp_path):
    """Learned codes are rounded on the scale the rewriter stores them with: 7-bit weights (the
    default where u8s8 saturates) once got codes fitted to the 8-bit scale, doubling every weight."""
    import dataclasses

    from qsearch.recovery.rounding import learn_for_plan

    _, bench = _bench(tmp_path, False)
    choices = {n: dataclasses.replace(c, weights=codes) for n, c in _all_int8(bench, "none").items()}
    nearest = bench.plan(choices)
    rounded, _ = learn_for_plan(bench, nearest, list(choices))
    assert all(rounded.choice(n).recovery == "round" for n in choices)
    assert _error(bench, rounded) <= _error(bench, nearest) * 1.05


def test_learned_rounding_rescues_a_cheaper_trial_over_budget(tmp_path):
    """Planted trials: a feasible all-float one and a cheaper all-INT8 one over the budget. The
    final stage fits learned rounding to the cheaper one and keeps it as a finalist only when
    that brings it within budget; a trial far over budget (more than 2x) is not tried."""
    from qsearch.config import SearchSpace
    from qsearch.evaluator import Evaluator
    from qsearch.finalize import rounded_entries
    from qsearch.search.problem import Dimensions, FixDecision, LayerFacts, Problem
    from qsearch.search.trials import SearchResult, TrialResult

    _, bench = _bench(tmp_path, True)
    ev = Evaluator(bench)
    names = [la.name for la in bench.candidates() if la.op_type == "MatMul"]
    problem = Problem(tuple(LayerFacts(n, ("int8/minmax/per_channel",), 1.0, 1e-3 * (i + 1))
                            for i, n in enumerate(names)), "fp32", 0.01, SearchSpace())
    int8 = {n: "int8/minmax/per_channel" for n in names}
    fp = bench.baseline.fp32_search
    plain = fp - ev.evaluate(bench.plan(int8), "search", timing=False).score

    def result(allowed, drop):
        trials = (TrialResult(0, {n: "fp32" for n in names}, fp, 0.0, 10.0, 10.0, 0, 0.0, True),
                  TrialResult(1, int8, fp - drop, drop, 5.0, 5.0, 0, 0.0, False))
        return SearchResult("s", "mem", allowed, problem, Dimensions({}, {}), FixDecision((), None, None, 0),
                            trials, (), 2, 0, 0.0)

    lines = []
    got = rounded_entries(bench, ev, result(1.0, plain), lines.append)  # any drop fits a budget of 1
    assert len(got) == 1 and got[0].name == "qsearch (trial 1 + learned rounding)"
    assert {got[0].plan.choice(n).recovery for n in names} == {"round"} and "a finalist" in lines[0]
    assert got[0].search == ev.evaluate(got[0].plan, "search", timing=False).score
    assert plain > 0  # all-INT8 loses something here
    tight = result(plain / 1.9, plain)  # within 2x of the budget: tried
    assert rounded_entries(bench, ev, tight, lines.append) == [] and "still over" in lines[-1]
    before = len(lines)
    assert rounded_entries(bench, ev, result(0.1, 0.25), lines.append) == [] and len(lines) == before  # > 2x


def test_per_tensor_weights_take_their_own_alpha(tmp_path):
    """Per-tensor weights take far less of the input's range than per-channel ones: a plan whose
    smoothed readers are all per-tensor uses the factors chosen for per-tensor weights."""
    _, bench = _bench(tmp_path, True)
    pc, pt = bench.recovery.smoothing["ln"], bench.recovery.smoothing_pt["ln"]
    choices = _all_int8(bench, "smooth")
    np.testing.assert_array_equal(bench.plan(choices).sidecar.of("smooth")["ln"], pc.scales)
    per_tensor = {n: LayerChoice("int8", "minmax", "per_tensor", "smooth") for n in choices}
    plan = bench.plan(per_tensor)
    np.testing.assert_array_equal(plan.sidecar.of("smooth")["ln"], pt.scales)
    assert f"alpha {pt.alpha:g}" in plan.notes["mm_q"].recovery and pt.alpha <= pc.alpha
