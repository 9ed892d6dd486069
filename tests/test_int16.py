"""int16 layers (uint16 activations, int8 weights) for `target: npu`: the layout against ONNX
Runtime's QNN flow, conversions only at int8/int16 borders, the bit-operation cost with its border
charge, the search's int16 options, and the refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from qsearch.cli import main
from qsearch.errors import PlanError
from qsearch.evaluator import CONVERT_BITS, bitops
from qsearch.plan.build import quantized_tensors
from qsearch.plan.format import LayerChoice, Plan
from qsearch.plan.widths import activation_widths
from qsearch.search.problem import LayerFacts, Problem, Start
from qsearch.search.strategy import build_dimensions, warm_start_plans
from qsearch.search.top_down import top_down
from tests.conftest import last_error, make_cnn, open_bench, write_workload

NPU = "target: npu\nsearch_space: {extends: npu}\n"
MIXED = {"conv_a": "int16/minmax/per_channel", "conv_b": "int8/minmax/per_channel", "add_res": "int8/minmax/per_tensor",
         "gap": "int16/minmax/per_tensor", "fc": "int16/minmax/per_tensor"}
ALL16 = {"conv_a": "int16/minmax/per_channel", "conv_b": "int16/minmax/per_channel",
         "add_res": "int16/minmax/per_tensor", "gap": "int16/minmax/per_tensor", "fc": "int16/minmax/per_tensor"}


@pytest.fixture(scope="module")
def npu_bench(tmp_path_factory):
    """The small CNN at opset 21 (what ONNX Runtime's QNN flow writes 16-bit Q/DQ into), target npu."""
    tmp = tmp_path_factory.mktemp("npu")
    cfg = write_workload(tmp / "w", make_cnn(opset=21), extra=NPU)
    return open_bench(cfg, tmp / "cache"), cfg


def _qdq(model: onnx.ModelProto) -> dict:
    """What a QDQ layout says: activation tensors (by their source name) -> zero-point dtype, weight
    and bias DQ dtypes, conversions (a Q reading a DQ) as (from, to) dtypes, the default opset."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    dtype = {}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert n.domain in ("", "ai.onnx")  # opset 21's own ops, no com.microsoft contrib ops
            dtype[n.output[0]] = TensorProto.DataType.Name(inits[n.input[2]].data_type)
    acts, converts, consts = {}, [], []
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            src = producer.get(n.input[0])
            if src is not None and src.op_type == "DequantizeLinear":
                converts.append((dtype[src.output[0]], dtype[n.output[0]]))
            else:
                acts[n.input[0].removesuffix("_prequant").removesuffix("_QuantizeLinear_Input")] = dtype[n.output[0]]
        elif n.op_type == "DequantizeLinear" and n.input[0] in inits:
            consts.append(dtype[n.output[0]])
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return {"acts": acts, "converts": sorted(converts), "consts": sorted(consts), "opset": opset}


def _qnn(path: Path, calib: np.ndarray, overrides=None) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": calib}])

        def get_next(self):
            return next(self.batches, None)

    cfg = get_qnn_qdq_config(str(path), Reader(), activation_type=QuantType.QUInt16, weight_type=QuantType.QInt8,
                             per_channel=True, init_overrides=overrides)
    out = path.with_name("qnn.onnx")
    quantize(str(path), str(out), cfg)
    return onnx.load(out)


def test_all_int16_layout_is_onnx_runtimes_qnn_layout(npu_bench):
    bench, cfg = npu_bench
    ours = _qdq(bench.rewriter(bench.plan(ALL16)))
    calib = np.load(cfg.parent / "calib.npz")["x"]
    qnn = _qdq(_qnn(cfg.parent / "model.onnx", calib))
    assert ours["opset"] == qnn["opset"] == 21
    # the same tensors get uint16 Q/DQ, except the classifier's output: a Gemm/MatMul output stays
    # float in qsearch (layout 4: nothing int8 reads it), where the QNN flow quantizes every output
    assert set(qnn["acts"]) - set(ours["acts"]) == {"y"}
    assert ours["acts"] == {t: "UINT16" for t in qnn["acts"] if t != "y"}
    assert ours["consts"] == qnn["consts"] == ["INT32"] * 3 + ["INT8"] * 3  # int8 weights, int32 biases
    assert ours["converts"] == qnn["converts"] == []


def test_mixed_plan_converts_only_at_its_two_borders_as_the_qnn_flow_does(npu_bench):
    bench, cfg = npu_bench
    model = bench.rewriter(bench.plan(MIXED))
    ours = _qdq(model)
    calib = np.load(cfg.parent / "calib.npz")["x"]
    # the same choices in the QNN flow: conv_a's output (read by the int8 conv_b and Add) is uint8 and
    # the Add's output (read by the int16 pool) uint16; ORT converts where the types change
    qnn_model = _qnn(cfg.parent / "model.onnx", calib, {"a_relu": [{"quant_type": _u8()}],
                                                        "b": [{"quant_type": _u8()}], "s": [{"quant_type": _u8()}]})
    qnn = _qdq(qnn_model)
    assert ours["converts"] == qnn["converts"] == [("UINT16", "UINT8"), ("UINT8", "UINT16")]
    assert ours["acts"]["a_relu"] == "UINT16" and ours["acts"]["b"] == "UINT8"  # written in the writer's width
    # and it computes what the QNN flow's model computes: MinMax ranges of the same data, so the two
    # differ far less than either differs from FP32 (both run with Q/DQ unfused, as the NPU computes)
    x = np.load(cfg.parent / "test.npz")["x"][:32]
    ref = ort.InferenceSession(bench.prepared.proto.SerializeToString()).run(None, {"x": x})[0]
    got = bench.engine.session(model).run(None, {"x": x})[0]
    theirs = bench.engine.session(qnn_model).run(None, {"x": x})[0]
    assert np.abs(got - theirs).max() < 0.3 * np.abs(theirs - ref).max()  # measured: 0.010 vs 0.048


def _u8():
    from onnxruntime.quantization import QuantType

    return QuantType.QUInt8


def test_widths_and_the_border_charge_by_hand(npu_bench):
    bench, _ = npu_bench
    plan = bench.plan(MIXED)
    choices = {la.name: plan.choice(la.name) for la in bench.prepared.layers}
    tensors, groups = quantized_tensors(bench.prepared, {n for n, c in choices.items() if c.quantized}, plan.forms)
    w = activation_widths(bench.prepared, choices, tensors, groups, plan.forms)
    assert w.bits["x"] == 16 and w.bits["a_relu"] == 16 and w.bits["b"] == 8 and w.bits["s_relu"] == 8
    assert dict(w.converts) == {"a_relu": (("conv_b", 8), ("add_res", 8)), "s_relu": (("gap", 16),)}
    assert w.borders == 2
    layer = {la.name: la for la in bench.prepared.layers}
    # 8x8 channels at 8x8 pixels, per sample: conv_a's output (read by conv_b and the Add), the Add's (read by the pool)
    charge = 2 * 8 * 8 * 8 * CONVERT_BITS / 1e9
    own = sum(layer[n].macs * (8 * 16 if c.startswith("int16") else 8 * 8) for n, c in MIXED.items()) / 1e9
    assert bitops(bench, plan) == pytest.approx(own + charge)
    all16 = bench.plan(ALL16)
    assert bitops(bench, all16) == pytest.approx(sum(la.macs for la in bench.prepared.layers) * 128 / 1e9)


def test_an_int16_plan_is_refused_where_its_target_cannot_run_it(npu_bench, tmp_path):
    bench, _ = npu_bench
    plan = bench.plan(MIXED)
    with pytest.raises(PlanError, match="layer 'conv_a' is int16.*target 'cpu'"):
        Plan(plan.model_name, plan.fingerprint, "cpu", layers=plan.layers, ranges=plan.ranges)
    with pytest.raises(PlanError, match="weights 'int7' need precision int8"):
        LayerChoice("int16", weights="int7")
    written = tmp_path / "plan.yaml"
    plan.write(written)
    text = written.read_text()
    written.write_text(text.replace("target: npu", "target: cpu"))
    assert main(["apply", str(written), str(bench.workload.model), "-o", str(tmp_path / "m.onnx")]) == 2
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("extra, key", [
    ("target: cpu\nsearch_space: {extends: npu}\n", "search_space.precision lists int16.*target 'cpu'"),
    ("target: fp16\nsearch_space: {precision: [int8, int16, float]}\n", "target 'fp16' cannot run"),
    ("target: npu\nsearch_space: {precision: [int16, float]}\n", "search_space.precision: int16 is searched beside int8"),
])
def test_int16_asked_of_a_target_that_cannot_run_it_is_one_line(tmp_path, capsys, extra, key):
    cfg = write_workload(tmp_path / "w", make_cnn(), n=32, extra=extra)
    assert main(["optimize", "--config", str(cfg), "--budget", "2", "--out", str(tmp_path / "out")]) == 2
    line = last_error(capsys)
    assert "workload.yaml" in line
    import re

    assert re.search(key, line), line
    assert not (tmp_path / "out").exists()


def test_int16_asked_of_openvino_is_one_line(tmp_path, capsys):
    from qsearch.engine import installed

    if not installed("openvino"):
        pytest.skip("the openvino wheel is not installed (extra: openvino)")
    cfg = write_workload(tmp_path / "w", make_cnn(), n=32, extra=NPU + "runtime: {engine: openvino}\n")
    assert main(["optimize", "--config", str(cfg), "--budget", "2", "--out", str(tmp_path / "out")]) == 2
    assert "runtime.engine openvino does not compute int16" in last_error(capsys)


def _problem(wide: bool) -> Problem:
    from qsearch.config import SearchSpace

    names = [f"l{i}" for i in range(6)]
    layers = tuple(LayerFacts(n, ("int8/mse/per_channel@int7", "int8/minmax/per_tensor"), 1.0, 0.1 * (6 - i), i)
                   for i, n in enumerate(names))
    space = SearchSpace(precisions=("int8", "int16", "float") if wide else ("int8", "float"), min_searched=0)
    return Problem(layers, "fp16", 0.01, space, tuple(zip(names, names[1:])))


def test_the_search_offers_each_layer_an_int16_option():
    # MinMax (65536 steps: nothing worth clipping for), per-channel where the layer has it, bias
    # correction kept, smoothing dropped (it moves range into the int8 weights), no weight codes
    planted = Problem((LayerFacts("a", ("int8/percentile/per_tensor", "int8/mse/per_channel/smooth+bias@int7"), 1, 0),
                       LayerFacts("b", ("int8/entropy/per_tensor/bias",), 1, 0)), "fp16", 0.01, _problem(True).space)
    assert planted.int16("a") == "int16/minmax/per_channel" and planted.int16("b") == "int16/minmax/per_tensor/bias"
    dims = build_dimensions(_problem(True))
    assert dims.searched["l0"] == ("int8/mse/per_channel@int7", "int8/minmax/per_tensor", "int16/minmax/per_channel",
                                   "fp16")
    assert "int16/minmax/per_channel" not in build_dimensions(_problem(False)).searched["l0"]
    from qsearch.search.problem import FixDecision

    plans = warm_start_plans(_problem(True), dims, FixDecision((), None, 0.05, 1))
    assert {n: "int16/minmax/per_channel" for n in dims.searched} in plans  # all-int16
    assert {**{n: "int8/mse/per_channel@int7" for n in dims.searched}, "l0": "int16/minmax/per_channel"} in plans


def test_walking_down_from_all_int8_widens_the_sensitive_layers_to_int16_before_float():
    from qsearch.search.problem import Dimensions, FixDecision

    problem = _problem(True)
    seen = []

    def measure(plan):  # planted: a layer of rank < 3 in INT8 costs 0.01 each
        seen.append(dict(plan))
        return sum(0.01 for n, lbl in plan.items() if lbl.startswith("int8") and int(n[1:]) < 3)

    start = Start({}, Dimensions({}, {}), FixDecision((), None, 0.03, 1), 10)
    top_down(problem, measure, start)
    assert seen and all(lbl != "fp16" for plan in seen for lbl in plan.values())
    assert any(plan["l0"] == "int16/minmax/per_channel" and plan["l5"].startswith("int8") for plan in seen)


def test_finetune_of_an_int16_plan_is_one_line(npu_bench, tmp_path, capsys):
    pytest.importorskip("torch")
    bench, cfg = npu_bench
    written = tmp_path / "plan.yaml"
    bench.plan(MIXED).write(written)
    assert main(["finetune", "--config", str(cfg), "--plan", str(written), "--out", str(tmp_path / "qat")]) == 2
    assert "layer 'conv_a' is int16: finetune trains INT8 layers only" in last_error(capsys)
    assert not (tmp_path / "qat").exists()


def test_optimize_for_an_npu_ships_the_cheapest_plan_within_budget_in_bit_operations(tmp_path):
    """End to end on a CNN whose first Conv has one huge output channel (uint8 activations crush the
    others; uint16 keeps them): the study offers int16, the report shows GBOPs, and the plan that
    ships is the cheapest of the final rows within budget on search data."""
    import csv

    from qsearch.api import optimize

    cfg = write_workload(tmp_path / "w", make_cnn(opset=21, outlier_layer="conv_a"), extra=NPU, max_drop="0.03")
    res = optimize(cfg, budget=12, out=tmp_path / "out")
    assert res.status == 0 and res.plan.target == "npu"
    with open(tmp_path / "out" / "trials.csv") as f:
        labels = {v for r in csv.DictReader(f) for k, v in r.items() if k in ALL16}
    assert any(v.startswith("int16/") for v in labels)
    lines = (tmp_path / "out" / "report.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "| GBOPs |" in line)
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    col = [c.strip() for c in lines[start].split("|")].index("GBOPs")
    table = [line.split("|") for line in lines[start + 2:end]]
    fp32_search = float(table[0][2])
    within = [float(r[col]) for r in table[1:] if r[3].strip() != "not scored (over budget on search data)"
              and fp32_search - float(r[2]) <= 0.03 + 1e-9]
    shipped = float(table[-1][col])
    assert shipped == min(within)
    if any(c.precision == "int16" for c in res.plan.layers.values()):  # its model is the QNN-style layout
        model = onnx.load(tmp_path / "out" / "model.qsearch.onnx")
        assert _qdq(model)["opset"] == 21


def test_show_and_diff_count_int16_layers_apart(npu_bench):
    from qsearch.report.review import diff, diff_text, show_text

    bench, _ = npu_bench
    mixed, all16 = bench.plan(MIXED), bench.plan(ALL16)
    assert "5 layers listed: 2 INT8, 3 int16, 0 float" in show_text(mixed)
    d = diff(mixed, all16)
    assert {(c.layer, c.before, c.after) for c in d.layers if c.option_changed} == {
        ("conv_b", "int8/minmax/per_channel", "int16/minmax/per_channel"),
        ("add_res", "int8/minmax/per_tensor", "int16/minmax/per_tensor")}
    assert "2 layer(s) changed option (0 to INT8, 2 to int16, 0 to float, 0 option changes" in diff_text(d)


def test_evaluating_an_int16_model_on_openvino_is_one_line(npu_bench, tmp_path, capsys):
    from qsearch.engine import installed

    if not installed("openvino"):
        pytest.skip("the openvino wheel is not installed (extra: openvino)")
    bench, _ = npu_bench
    model = tmp_path / "m.onnx"
    onnx.save(bench.rewriter(bench.plan(MIXED)), model)
    cfg = write_workload(tmp_path / "w", make_cnn(opset=21), n=32, extra="target: npu\nruntime: {engine: openvino}\n")
    assert main(["evaluate", str(model), "--config", str(cfg), "--out", str(tmp_path / "eval")]) == 2
    assert "16-bit Q/DQ (int16 layers), which runtime.engine openvino does not compute as written" in last_error(capsys)


def test_an_int16_layer_with_other_weight_codes_in_a_plan_file_is_one_line(npu_bench, tmp_path, capsys):
    bench, _ = npu_bench
    written = tmp_path / "plan.yaml"
    bench.plan(MIXED).write(written)
    text = written.read_text().replace("precision: int16\n", "precision: int16\n  weights: int7\n", 1)
    written.write_text(text)
    assert main(["show", str(written)]) == 2
    assert "weights 'int7' needs precision int8: an int16 layer's weights are int8" in last_error(capsys)
