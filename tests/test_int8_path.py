"""The CPU's int8 arithmetic path: detected from planted flags, recorded in plans, and the
premise every kernel-vs-reference test rests on checked on the machine at hand."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qsearch.calibration import collect
from qsearch.engine.isa import WEIGHT_CODES, Int8Path, classify, detect, safe_weights
from qsearch.model.load import prepare
from qsearch.plan.build import build_plan
from qsearch.plan.format import LayerChoice
from qsearch.rewrite import Rewriter


@pytest.mark.parametrize("machine, flags, name, saturates", [
    ("x86_64", {"avx2", "fma"}, "avx2", True),
    ("x86_64", {"avx2", "avx512f", "avx512bw"}, "avx512", True),
    ("x86_64", {"avx2", "avx512bw", "avx512_vnni"}, "vnni", False),
    ("x86_64", {"avx2", "avx_vnni"}, "vnni", False),
    ("x86_64", {"avx512_vnni", "amx_int8", "amx_tile"}, "amx", False),
    ("aarch64", {"asimd", "asimddp"}, "arm-dot", False),
    ("aarch64", {"asimd"}, "arm", False),
    ("riscv64", set(), "other", False),
])
def test_paths_are_classified_from_the_cpu_flags(machine, flags, name, saturates):
    path = classify(machine, flags)
    assert path == Int8Path(name, saturates)
    assert safe_weights(path) == ("int7" if saturates else "int8")


def _big_conv() -> onnx.ModelProto:
    """One 3x3 Conv whose weights and inputs are large: adjacent u8 x s8 products sum past 2^15."""
    rng = np.random.default_rng(0)
    w = rng.uniform(-1, 1, (16, 16, 3, 3)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], "big",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16, 8, 8])],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _kernel_error(codes: str) -> float:
    """Max |int8 kernels - QDQ reference| of the rewritten Conv, in output quantization steps."""
    prepared = prepare(_big_conv())
    x = np.random.default_rng(1).uniform(0, 1, (2, 16, 8, 8)).astype(np.float32)
    stats = collect(prepared.proto, ["x", "y"], [{"x": x}])
    plan = build_plan(prepared, {"conv": LayerChoice("int8", "minmax", "per_tensor", weights=codes)}, stats)
    model = Rewriter(prepared)(plan).SerializeToString()
    off = ort.SessionOptions()
    off.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(model, off, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    lo, hi = plan.ranges["y"]
    return float(np.abs(got - ref).max() / ((hi - lo) / 255))


def test_int8_kernels_saturate_only_where_the_path_says():
    """The premise of every test that compares int8 kernels with the QDQ graph: 7-bit and uint8
    weights are exact on every path (at most one output step of requantization rounding); int8
    weights are exact where the detected path does not saturate, and far off where it does."""
    path = detect()
    errors = {codes: _kernel_error(codes) for codes in WEIGHT_CODES}
    assert errors["int7"] <= 1 and errors["uint8"] <= 1, errors
    if path.saturates:
        assert errors["int8"] > 5, (path, errors)
    else:
        assert errors["int8"] <= 1, (path, errors)


def test_plans_record_the_path_and_the_weight_codes(tmp_path):
    prepared = prepare(_big_conv())
    x = np.random.default_rng(1).uniform(0, 1, (2, 16, 8, 8)).astype(np.float32)
    stats = collect(prepared.proto, ["x", "y"], [{"x": x}])
    from qsearch.plan.format import provenance
    from qsearch.plan.io import read_plan

    plan = build_plan(prepared, {"conv": LayerChoice("int8", weights="int7")}, stats).with_info(**provenance())
    text = plan.to_yaml()
    assert "weights: int7" in text and f"int8_path: {detect().name}" in text
    (tmp_path / "p.yaml").write_text(text)
    back = read_plan(tmp_path / "p.yaml")
    assert back.choice("conv").weights == "int7" and back.provenance["int8_path"] == detect().name
    q = Rewriter(prepared)(back)
    codes = next(numpy_helper.to_array(i) for i in q.graph.initializer if i.name.startswith("w_") and
                 i.name.endswith("_quantized"))
    assert codes.dtype == np.int8 and np.abs(codes).max() == 63


def test_apply_and_evaluate_say_when_the_plan_was_measured_on_another_path(tmp_path, capsys):
    """A plan made on one int8 path, applied on another: `apply` says so in one line, and the model
    it writes carries the path, which `evaluate` compares with the machine it runs on."""
    from qsearch import api
    from qsearch.plan.io import read_plan

    src = _big_conv()
    onnx.save(src, tmp_path / "m.onnx")
    prepared = prepare(src)
    x = np.random.default_rng(1).uniform(0, 1, (2, 16, 8, 8)).astype(np.float32)
    plan = build_plan(prepared, {"conv": LayerChoice("int8")}, collect(prepared.proto, ["x", "y"], [{"x": x}]))
    other = "avx2" if not detect().saturates else "vnni"
    plan.with_info(int8_path=other).write(tmp_path / "p.yaml")
    model = api.apply(read_plan(tmp_path / "p.yaml"), str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"))
    err = capsys.readouterr().err
    assert f"measured on int8 path {other}; this machine's is {detect().name}" in err
    assert {p.key: p.value for p in model.metadata_props}["qsearch.int8_path"] == other
    plan.with_info(int8_path=detect().name).write(tmp_path / "same.yaml")
    api.apply(read_plan(tmp_path / "same.yaml"), str(tmp_path / "m.onnx"), str(tmp_path / "q2.onnx"))
    assert "measured on int8 path" not in capsys.readouterr().err


def test_a_bad_int8_path_override_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    from qsearch.cli import main

    from .conftest import last_error

    monkeypatch.setenv("QSEARCH_INT8_PATH", "avx9000")
    detect.cache_clear()
    try:
        assert main(["optimize", "--budget", "1", "--out", str(tmp_path / "o")]) == 2
        assert "QSEARCH_INT8_PATH: 'avx9000' is not one of vnni, amx, avx2" in last_error(capsys)
        assert not (tmp_path / "o").exists()
        monkeypatch.setenv("QSEARCH_INT8_PATH", "avx2")
        detect.cache_clear()
        assert detect() == Int8Path("avx2", True) and safe_weights() == "int7"
    finally:
        monkeypatch.delenv("QSEARCH_INT8_PATH")
        detect.cache_clear()
