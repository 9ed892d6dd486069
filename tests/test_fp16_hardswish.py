"""The FP16 target on models with hardswish in both exporters' forms (torch: x * (Clip(x + 3) / 6);
paddle2onnx: (x * Clip(x + 3)) / 6, the /6 a tail after the product), end to end as users run it:
`optimize`, then `apply` of a plan whose INT8 hardswish sits among FP16 layers in either measured
form, then `evaluate`."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qsearch.cli import main
from qsearch.plan.format import LayerChoice

from .conftest import open_bench, write_workload


def hardswish_cnn(form: str) -> onnx.ModelProto:
    """x -> conv1 -> hardswish (`form`) -> conv2 + relu -> GAP -> fc."""
    rng = np.random.default_rng(0)
    inits = {"w1": rng.normal(0, 0.4, (8, 3, 3, 3)), "b1": rng.normal(0, 0.1, 8), "w2": rng.normal(0, 0.3, (8, 8, 3, 3)),
             "b2": rng.normal(0, 0.1, 8), "wfc": rng.normal(0, 0.3, (10, 8)), "bfc": rng.normal(0, 0.1, 10),
             "three": np.float32(3), "zero": np.float32(0), "six": np.float32(6)}
    gate = [helper.make_node("Add", ["c1", "three"], ["a"], name="hs_add"),
            helper.make_node("Clip", ["a", "zero", "six"], ["cl"], name="hs_clip")]
    if form == "paddle":
        gate += [helper.make_node("Mul", ["c1", "cl"], ["m"], name="hs_mul"),
                 helper.make_node("Div", ["m", "six"], ["hs"], name="hs_div")]
    else:
        gate += [helper.make_node("Div", ["cl", "six"], ["g"], name="hs_div"),
                 helper.make_node("Mul", ["c1", "g"], ["hs"], name="hs_mul")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]), *gate,
             helper.make_node("Conv", ["hs", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["g2"], name="gap"),
             helper.make_node("Flatten", ["g2"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wfc", "bfc"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, f"hardswish_{form}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("form", ["paddle", "torch"])
def test_fp16_target_with_hardswish_optimizes_applies_and_evaluates(form, tmp_path):
    cfg = write_workload(tmp_path / "w", hardswish_cnn(form), n=64, max_drop="0.05", extra="target: fp16\n")
    assert main(["optimize", "--config", str(cfg), "--budget", "3", "--out", str(tmp_path / "run")]) == 0
    bench = open_bench(cfg, tmp_path / "cache")
    hs = next(la for la in bench.prepared.layers if la.pattern == "hardswish")
    names = [la.name for la in bench.prepared.layers]
    for measured in ("fused", "decomposed"):
        choices = {n: LayerChoice("int8", "minmax", "per_tensor") if n == hs.name else LayerChoice("fp16") for n in names}
        plan_path = tmp_path / f"{measured}.yaml"
        bench.plan(choices, forms={"hardswish": measured}).write(plan_path)
        out = tmp_path / f"{measured}.onnx"
        assert main(["apply", str(plan_path), str(cfg.parent / "model.onnx"), "-o", str(out)]) == 0
        model = onnx.load(str(out))
        onnx.checker.check_model(model, full_check=True)
        assert any(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer)  # the FP16 layers
        assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)  # the INT8 hardswish
        assert main(["evaluate", str(out), "--config", str(cfg), "--out", str(tmp_path / f"ev-{measured}")]) == 0
