"""Valid models that once broke the pipeline: control flow reading outer-scope tensors, IR < 4
(initializers listed as graph inputs), symbolic spatial dimensions. Each runs end to end."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qsearch.cli import main
from qsearch.model.load import prepare, with_input_shapes
from qsearch.plan.build import build_plan
from qsearch.plan.format import LayerChoice
from qsearch.rewrite import Rewriter

from .conftest import make_cnn, write_workload


def _control_flow_cnn() -> onnx.ModelProto:
    """make_cnn with an If whose branches read the outer `a_relu` and an outer initializer, and a
    Loop whose body adds the outer `b` to its carried value: subgraphs that the rewriter must see
    as readers (sort order, dead-node sweep, initializers kept)."""
    m = make_cnn()
    g = m.graph
    scale = numpy_helper.from_array(np.array(0.5, np.float32), "half")
    g.initializer.extend([scale, numpy_helper.from_array(np.array(2, np.int64), "trips"),
                          numpy_helper.from_array(np.array(True), "keep_going")])
    then_g = helper.make_graph([helper.make_node("Mul", ["a_relu", "half"], ["t_out"], name="then_mul")], "then", [],
                               [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Identity", ["a_relu"], ["e_out"], name="else_id")], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
         helper.make_node("Add", ["v_in", "b"], ["v_out"], name="body_add")], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)])
    nodes = list(g.node)
    i_add = next(i for i, n in enumerate(nodes) if n.name == "add_res")
    cf = [
        helper.make_node("ReduceMean", ["x"], ["xm"], name="xmean", keepdims=0),
        helper.make_node("Greater", ["xm", "zero"], ["pos"], name="is_pos"),
        helper.make_node("If", ["pos"], ["branch"], name="branch_if", then_branch=then_g, else_branch=else_g),
        helper.make_node("Loop", ["trips", "keep_going", "branch"], ["looped"], name="loop", body=body),
    ]
    g.initializer.append(numpy_helper.from_array(np.array(-10.0, np.float32), "zero"))
    nodes[i_add] = helper.make_node("Add", ["looped", "b"], ["s"], name="add_res")
    del g.node[:]
    g.node.extend(nodes[:i_add] + cf + nodes[i_add:])
    onnx.checker.check_model(m)
    return m


def _ir3_cnn() -> onnx.ModelProto:
    """make_cnn at opset 8 / IR 3: every initializer is also a graph input (overridable default)."""
    m = make_cnn(opset=9)
    g = m.graph
    g.input.extend(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in g.initializer)
    m.ir_version = 3
    return m


def _all_int8(prepared):
    rng = np.random.default_rng(0)
    from qsearch.calibration import collect

    tensors = sorted({t for la in prepared.layers for t in (*la.activations, la.output, la.fused_output) if t})
    stats = collect(prepared.proto, tensors, [{"x": rng.normal(0, 1, (4, 3, 8, 8)).astype(np.float32)}])
    choice = LayerChoice("int8", "minmax", "per_tensor")
    return build_plan(prepared, {la.name: choice for la in prepared.layers}, stats)


def test_control_flow_reading_outer_tensors_survives_every_rewrite():
    model = _control_flow_cnn()
    prepared = prepare(model)
    assert {"conv_a", "conv_b", "fc"} <= {la.name for la in prepared.layers}
    x = np.random.default_rng(1).normal(0, 1, (4, 3, 8, 8)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    rw = Rewriter(prepared)
    for plan in (build_plan(prepared, {}, None), _all_int8(prepared)):
        q = rw(plan)
        onnx.checker.check_model(q)
        got = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 0.25 * np.abs(want).max()
    fp16 = build_plan(prepared, {la.name: LayerChoice("fp16") for la in prepared.layers}, None, target="fp16")
    q = rw(fp16)
    got = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.dtype == want.dtype and got.shape == want.shape  # the model's own output type, FP16 inside
    assert np.abs(got - want).max() <= 0.01 * np.abs(want).max() + 1e-3  # FP16 rounding, nothing more


def test_control_flow_model_end_to_end(tmp_path, capsys):
    cfg = write_workload(tmp_path / "w", _control_flow_cnn(), n=64)
    out = tmp_path / "out"
    assert main(["baseline", "naive", "--config", str(cfg), "--out", str(out), "-o", str(tmp_path / "n.yaml")]) == 0
    assert main(["optimize", "--budget", "3", "--config", str(cfg), "--out", str(out)]) == 0
    assert (out / "model.qsearch.onnx").is_file()


def test_ir3_model_with_initializers_as_inputs_quantizes(tmp_path):
    model = _ir3_cnn()
    prepared = prepare(model)
    assert [i.name for i in prepared.inputs] == ["x"]
    q = Rewriter(prepared)(_all_int8(prepared))
    x = np.random.default_rng(1).normal(0, 1, (4, 3, 8, 8)).astype(np.float32)
    kinds = {n.op_type for n in q.graph.node}
    assert "QuantizeLinear" in kinds
    out = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert out.shape == (4, 10)
    cfg = write_workload(tmp_path / "w", model, n=64)
    assert main(["optimize", "--budget", "2", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 0


def test_macs_use_the_data_shape_when_spatial_dims_are_symbolic():
    m = make_cnn()
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    prepared = prepare(m)
    conv_a = next(la for la in prepared.layers if la.name == "conv_a")
    fixed = with_input_shapes(prepared, {"x": (32, 3, 8, 8)})
    conv_a8 = next(la for la in fixed.layers if la.name == "conv_a")
    # 8 output channels x 8 x 8 positions x (3 x 3 x 3) per output, per sample
    assert conv_a8.macs == 8 * 8 * 8 * 27
    assert conv_a.macs == 8 * 27  # without data the spatial size is unknown (counted as 1)
    assert [la.name for la in fixed.layers] == [la.name for la in prepared.layers]


@pytest.mark.parametrize("scopes", ["{1: 2}", "[" * 5000 + "]" * 5000, "[1, 2]", "not python", "['a', None]", "'x' * 9"])
def test_metadata_the_exporter_did_not_write_falls_back_to_op_names(scopes):
    from qsearch.model.load import prepare

    from .conftest import make_cnn

    m = make_cnn()
    for n in m.graph.node:
        p = n.metadata_props.add()
        p.key, p.value = "pkg.torch.onnx.name_scopes", scopes
    prepared = prepare(m)  # no command fails on it: readable names are best effort
    assert [la.readable for la in prepared.layers] == [""] * len(prepared.layers)
