"""Constant affine ops folded into Convs when the graph is prepared (`folding`), plans that
record the preparation, and float Convs that stay float inside int8 regions."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qsearch.calibration import collect
from qsearch.cli import main
from qsearch.model.folding import fold_affine
from qsearch.model.load import prepare
from qsearch.plan.build import build_plan
from qsearch.plan.format import LayerChoice
from qsearch.plan.io import read_plan
from qsearch.rewrite import Rewriter

from .conftest import EXACT_WEIGHTS, last_error
from .test_rewrite import _calibrated, _run

C, H = 4, 6


def _model(steps: list[tuple[str, tuple, bool]], kernel: int = 3, out_of_conv: bool = False, seed: int = 0):
    """x -> Conv -> [steps] -> Conv(kernel) -> y. A step is (op, constant shape, constant first);
    "relu" and "mid" (the second Conv) may appear among the steps."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (C, C, 3, 3)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.normal(0, 0.1, C).astype(np.float32), "b0"),
             numpy_helper.from_array(rng.normal(0, 0.5, (C, C, kernel, kernel)).astype(np.float32), "w1")]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["t0"], name="conv0", pads=[1, 1, 1, 1])]
    t = "t0"
    for i, (op, shape, first) in enumerate(steps):
        if op == "relu":
            nodes.append(helper.make_node("Relu", [t], [f"t{i + 1}"], name=f"relu{i}"))
        else:
            k = (rng.uniform(0.5, 2.0, shape) * rng.choice([-1, 1], shape)).astype(np.float32)
            inits.append(numpy_helper.from_array(k, f"k{i}"))
            nodes.append(helper.make_node(op, [f"k{i}", t] if first else [t, f"k{i}"], [f"t{i + 1}"], name=f"{op}{i}"))
        t = f"t{i + 1}"
    pad = (kernel - 1) // 2
    nodes.append(helper.make_node("Conv", [t, "w1"], ["y"], name="conv1", pads=[pad] * 4))
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, C, H, H])]
    if out_of_conv:
        outs.append(helper.make_tensor_value_info("t0", TensorProto.FLOAT, [2, C, H, H]))
    g = helper.make_graph(nodes, "affine", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, C, H, H])],
                          outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _same_outputs(a, b):
    x = {"x": np.random.default_rng(1).normal(size=(2, C, H, H)).astype(np.float32)}
    for u, v in zip(_run(a, x), _run(b, x)):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-4 * float(np.abs(u).max()))


def test_scales_and_shifts_fold_into_the_convs_on_both_sides():
    """PP-LCNetV3's learnable affine: Conv -> Mul(a) -> Add(b) -> Relu -> Mul(c) -> Add(d) ->
    padded Conv. a and b go into the first Conv; c into the second (d moved before it as d/c,
    since a padded Conv would see 0 where the Add gave d)."""
    src = _model([("Mul", (1,), True), ("Add", (C, 1, 1), False), ("relu", (), False),
                  ("Mul", (1,), True), ("Add", (1,), True)])
    prepared = prepare(src)
    assert _ops(prepared.proto) == ["Conv", "Relu", "Add", "Conv"] and prepared.folded == 3
    _same_outputs(src, prepared.proto)
    assert [la.name for la in prepared.layers] == ["conv0", "Add4", "conv1"]


def test_a_shift_folds_into_an_unpadded_conv():
    src = _model([("relu", (), False), ("Add", (), False)], kernel=1)
    prepared = prepare(src)
    assert _ops(prepared.proto) == ["Conv", "Relu", "Conv"]
    _same_outputs(src, prepared.proto)


@pytest.mark.parametrize("steps, out_of_conv, why", [
    ([("Mul", (1, 1, H, 1), False)], False, "broadcasts along H, not per channel"),
    ([("Add", (1, 1, 1, H), False)], False, "broadcasts along W, not per channel"),
    ([("Add", (), False)], True, "the Conv's output is also a graph output, the next Conv is padded"),
])
def test_what_must_not_fold_stays(steps, out_of_conv, why):
    src = _model(steps, kernel=3, out_of_conv=out_of_conv)
    m = onnx.ModelProto.FromString(src.SerializeToString())
    fold_affine(m)
    assert "Mul" in _ops(m) or "Add" in _ops(m), why
    _same_outputs(src, m)


def test_zero_and_non_finite_scales_are_left_alone():
    for value in (0.0, np.inf, np.nan):
        src = _model([("relu", (), False), ("Mul", (), False)])
        m = onnx.ModelProto.FromString(src.SerializeToString())
        next(i for i in m.graph.initializer if i.name == "k1").CopyFrom(
            numpy_helper.from_array(np.array(value, np.float32), "k1"))
        assert fold_affine(m) == 0


@settings(max_examples=40, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from(["Mul", "Add", "relu"]),
                                st.sampled_from([(), (1,), (C, 1, 1), (1, C, 1, 1), (1, 1, 1, H), (C,)]),
                                st.booleans()), min_size=1, max_size=5),
       kernel=st.sampled_from([1, 3]), out_of_conv=st.booleans(), seed=st.integers(0, 3))
def test_folding_never_changes_what_the_graph_computes(steps, kernel, out_of_conv, seed):
    src = _model(steps, kernel, out_of_conv, seed)
    try:
        _run(src, {"x": np.zeros((2, C, H, H), np.float32)})
    except Exception:  # (C,) broadcasts along W (H wide): not a valid model
        assume(False)
    m = onnx.ModelProto.FromString(src.SerializeToString())
    removed = fold_affine(m)
    onnx.checker.check_model(m)
    assert removed == len(src.graph.node) - len(m.graph.node) >= 0
    _same_outputs(src, m)


def _depthwise_sandwich():
    """int8 Conv -> depthwise Conv with channel ranges 1000x apart -> int8 Conv."""
    rng = np.random.default_rng(0)
    dw = rng.normal(0, 1, (C, 1, 3, 3)).astype(np.float32) * np.array([1e-3, 1e-2, 1.0, 1.0], np.float32)[:, None,
                                                                                                          None, None]
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (C, C, 1, 1)).astype(np.float32), "wa"),
             numpy_helper.from_array(dw, "wdw"), numpy_helper.from_array(np.zeros(C, np.float32), "bdw"),
             numpy_helper.from_array(rng.normal(0, 0.5, (C, C, 1, 1)).astype(np.float32), "wc")]
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a"),
             helper.make_node("Conv", ["a", "wdw", "bdw"], ["d"], name="conv_dw", group=C, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["d", "wc"], ["y"], name="conv_c")]
    g = helper.make_graph(nodes, "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, C, 8, 8])],
                          [helper.make_tensor_value_info("d", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_a_float_conv_between_int8_layers_runs_float():
    """ONNX Runtime (1.21+) quantizes a float Conv's weight per tensor when it sits between a
    per-tensor DQ and a Q; the plan keeps it float, so the model must run it float: the same
    output with ONNX Runtime's optimizations on as with them off."""
    prepared, stats, feeds = _calibrated(_depthwise_sandwich(), shape=(4, C, 8, 8))
    int8 = LayerChoice("int8", weights=EXACT_WEIGHTS)  # kernels exact on this path: any difference is the graph's
    plan = build_plan(prepared, {"conv_a": int8, "conv_dw": LayerChoice("fp32"), "conv_c": int8}, stats)
    model = Rewriter(prepared)(plan)
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(model.SerializeToString(), so).run(["d"], feeds[0])[0]
    optimized = _run(model, feeds[0])[0]
    assert np.abs(optimized - plain).max() <= 1e-5 * np.abs(plain).max()


def test_plans_name_their_preparation_and_older_plans_apply_to_the_unfolded_graph(tmp_path, capsys):
    src = _model([("Mul", (1,), True), ("Add", (1,), False), ("relu", (), False)], kernel=1)
    onnx.save(src, tmp_path / "m.onnx")
    x = {"x": np.random.default_rng(0).normal(size=(2, C, H, H)).astype(np.float32)}
    names = {}
    for preparation in (1, 2):
        prepared = prepare(src, name="m", preparation=preparation)
        names[preparation] = set(prepared.layer_names)
        tensors = [t for la in prepared.layers for t in (*la.activations, la.output) if t]
        plan = build_plan(prepared, {n: LayerChoice("int8") for n in prepared.layer_names},
                          collect(prepared.proto, tensors, [x]))
        text = plan.to_yaml()
        assert ("preparation: 2" in text) == (preparation == 2)
        path = tmp_path / f"plan{preparation}.yaml"
        path.write_text(text)
        assert read_plan(path).preparation == preparation
        assert main(["apply", str(path), str(tmp_path / "m.onnx"), "-o", str(tmp_path / f"q{preparation}.onnx")]) == 0
    assert names[1] - names[2] == {"Mul0", "Add1"}  # the old plan names layers only the unfolded graph has
    bad = tmp_path / "bad.yaml"
    bad.write_text((tmp_path / "plan2.yaml").read_text().replace("preparation: 2", "preparation: 7"))
    assert main(["apply", str(bad), str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx")]) == 2
    assert "model.preparation 7 is not one of 1, 2" in last_error(capsys)
    assert not (tmp_path / "q.onnx").exists()


def test_a_float_gemm_reading_a_quantized_tensor_runs_float():
    """The same for Gemm: x quantized for the INT8 Gemm that reads it, the float Gemm beside it
    reads the dequantized x and writes into the INT8 Gemm after it."""
    rng = np.random.default_rng(1)
    w_float = rng.normal(0, 1, (8, 8)).astype(np.float32) * np.array([1e-3, 1e-2] + [1.0] * 6, np.float32)[:, None]
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (8, 8)).astype(np.float32), "wa"),
             numpy_helper.from_array(w_float, "wb"), numpy_helper.from_array(rng.normal(0, 0.5, (8, 8)).astype(np.float32), "wc")]
    nodes = [helper.make_node("Gemm", ["x", "wa"], ["a"], name="gemm_a", transB=1),
             helper.make_node("Gemm", ["x", "wb"], ["b"], name="gemm_b", transB=1),
             helper.make_node("Gemm", ["b", "wc"], ["c"], name="gemm_c", transB=1),
             helper.make_node("Add", ["a", "c"], ["y"], name="add")]
    g = helper.make_graph(nodes, "gemms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                          [helper.make_tensor_value_info("b", TensorProto.FLOAT, [4, 8]),
                           helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    prepared, stats, feeds = _calibrated(model, shape=(4, 8))
    plan = build_plan(prepared, {"gemm_a": LayerChoice("int8"), "gemm_b": LayerChoice("fp32"),
                                 "gemm_c": LayerChoice("int8")}, stats)
    out = Rewriter(prepared)(plan)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(out.SerializeToString(), so).run(["b"], feeds[0])[0]
    optimized = _run(out, feeds[0])[0]
    assert np.abs(optimized - plain).max() <= 1e-5 * np.abs(plain).max()
