"""Golden fusion per pattern: what ONNX Runtime's optimizer turns qsearch's all-INT8 model into,
pinned op by op, and never fewer int8 kernels nor more unfused Q/DQ nodes than ORT's own
quantize_static (QDQ, MinMax, per-tensor) makes of the same prepared model."""

import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qsearch.calibration import collect
from qsearch.model.load import prepare
from qsearch.plan.build import build_plan
from qsearch.plan.format import LayerChoice
from qsearch.rewrite import Rewriter
from qsearch.scoring import fusion_check

C = 8


def _model(nodes, inits, out_shape, opset=17):
    graph = helper.make_graph(
        nodes, "pattern", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _conv(rng, inits, name, src, out, cin=C, cout=C, k=3, **kw):
    inits[f"{name}_w"] = rng.normal(0, 0.3, (cout, cin, k, k)).astype(np.float32)
    inits[f"{name}_b"] = rng.normal(0, 0.1, cout).astype(np.float32)
    pads = [k // 2] * 4
    return helper.make_node("Conv", [src, f"{name}_w", f"{name}_b"], [out], name=name, pads=pads, **kw)


def se_block():
    """Squeeze-excite: GAP -> 1x1 conv -> Relu -> 1x1 conv -> Sigmoid -> channel scaling (Mul)."""
    rng, inits = np.random.default_rng(0), {}
    nodes = [_conv(rng, inits, "c0", "x", "a"), helper.make_node("Relu", ["a"], ["ar"], name="r0"),
             helper.make_node("GlobalAveragePool", ["ar"], ["g"], name="gap"),
             _conv(rng, inits, "se1", "g", "s1", k=1), helper.make_node("Relu", ["s1"], ["s1r"], name="r1"),
             _conv(rng, inits, "se2", "s1r", "s2", k=1), helper.make_node("Sigmoid", ["s2"], ["gate"], name="sig"),
             helper.make_node("Mul", ["ar", "gate"], ["m"], name="scale"), _conv(rng, inits, "c1", "m", "y")]
    return _model(nodes, inits, ["N", C, 8, 8])


def hardswish():
    """Conv -> HardSwish -> Conv (ORT inlines HardSwish as HardSigmoid + Mul)."""
    rng, inits = np.random.default_rng(1), {}
    nodes = [_conv(rng, inits, "c0", "x", "a"), helper.make_node("HardSwish", ["a"], ["h"], name="hs"),
             _conv(rng, inits, "c1", "h", "y")]
    return _model(nodes, inits, ["N", C, 8, 8])


def hardswish_clip(opset: int = 12, scale_op: str = "Div", after: bool = False):
    """Conv -> x * Clip(x + 3, 0, 6) / 6 -> Conv: hardswish as opset 11/12 exporters write it
    (`after`: the /6 after the product, as paddle2onnx writes it)."""
    rng, inits = np.random.default_rng(5), {}
    inits.update({"three": np.float32(3), "zero": np.float32(0), "six": np.float32(6),
                  "k": np.float32(6 if scale_op == "Div" else 1 / 6)})
    nodes = [_conv(rng, inits, "c0", "x", "a"), helper.make_node("Add", ["a", "three"], ["a3"], name="add3"),
             helper.make_node("Clip", ["a3", "zero", "six"], ["r6"], name="relu6")]
    if after:
        nodes += [helper.make_node("Mul", ["a", "r6"], ["m"], name="hswish"),
                  helper.make_node(scale_op, ["m", "k"], ["h"], name="scale")]
    else:
        nodes += [helper.make_node(scale_op, ["r6", "k"], ["gate"], name="scale"),
                  helper.make_node("Mul", ["a", "gate"], ["h"], name="hswish")]
    nodes.append(_conv(rng, inits, "c1", "h", "y"))
    return _model(nodes, inits, ["N", C, 8, 8], opset=opset)


def fpn(mode: str = "nearest"):
    """Downsample (MaxPool), upsample (Resize), Concat the two scales, Conv (FPN / detector neck)."""
    rng, inits = np.random.default_rng(2), {}
    inits["scales"] = np.array([1, 1, 2, 2], np.float32)
    nodes = [_conv(rng, inits, "c0", "x", "a"), helper.make_node("Relu", ["a"], ["ar"], name="r0"),
             helper.make_node("MaxPool", ["ar"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             _conv(rng, inits, "c1", "p", "b"), helper.make_node("Relu", ["b"], ["br"], name="r1"),
             helper.make_node("Resize", ["br", "", "scales"], ["up"], name="up", mode=mode),
             helper.make_node("Concat", ["ar", "up"], ["cat"], name="cat", axis=1),
             _conv(rng, inits, "c2", "cat", "y", cin=2 * C)]
    return _model(nodes, inits, ["N", C, 8, 8])


def shuffle():
    """Channel shuffle (Reshape -> Transpose -> Reshape), Split into two convs, Slice, Concat back."""
    rng, inits = np.random.default_rng(3), {}
    inits.update({"s1": np.array([0, 2, C // 2, 8, 8], np.int64), "s2": np.array([0, C, 8, 8], np.int64),
                  "st": np.array([0], np.int64), "en": np.array([C // 2], np.int64), "ax": np.array([1], np.int64),
                  "split": np.array([C // 2, C // 2], np.int64)})
    nodes = [_conv(rng, inits, "c0", "x", "a"),
             helper.make_node("Reshape", ["a", "s1"], ["a5"], name="rs1"),
             helper.make_node("Transpose", ["a5"], ["t5"], name="tr", perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["t5", "s2"], ["sh"], name="rs2"),
             helper.make_node("Split", ["sh", "split"], ["h0", "h1"], name="split", axis=1),
             _conv(rng, inits, "c1", "h0", "b0", cin=C // 2, cout=C // 2),
             helper.make_node("Slice", ["h1", "st", "en", "ax"], ["h1s"], name="slice"),
             _conv(rng, inits, "c2", "h1s", "b1", cin=C // 2, cout=C // 2),
             helper.make_node("Concat", ["b0", "b1"], ["cat"], name="cat", axis=1),
             _conv(rng, inits, "c3", "cat", "y")]
    return _model(nodes, inits, ["N", C, 8, 8])


def fanout():
    """Conv -> Transpose read by two Slices (q/k/v style) -> a Conv each -> Concat -> Conv: the
    Transpose and both Slices run on uint8 only if they share one scale (as in ORT's model)."""
    rng, inits = np.random.default_rng(6), {}
    inits.update({"s0": np.array([0], np.int64), "s1": np.array([C // 2], np.int64), "s2": np.array([C], np.int64),
                  "ax": np.array([1], np.int64)})
    nodes = [_conv(rng, inits, "c0", "x", "a"), helper.make_node("Transpose", ["a"], ["t"], name="tr", perm=[0, 1, 3, 2]),
             helper.make_node("Slice", ["t", "s0", "s1", "ax"], ["h0"], name="slice0"),
             helper.make_node("Slice", ["t", "s1", "s2", "ax"], ["h1"], name="slice1"),
             _conv(rng, inits, "c1", "h0", "b0", cin=C // 2, cout=C // 2),
             _conv(rng, inits, "c2", "h1", "b1", cin=C // 2, cout=C // 2),
             helper.make_node("Concat", ["b0", "b1"], ["cat"], name="cat", axis=1), _conv(rng, inits, "c3", "cat", "y")]
    return _model(nodes, inits, ["N", C, 8, 8])


def head():
    """LeakyRelu, AveragePool, Flatten, Gemm, Softmax: a classifier tail."""
    rng, inits = np.random.default_rng(4), {}
    inits["fc_w"] = rng.normal(0, 0.3, (10, C * 16)).astype(np.float32)
    inits["fc_b"] = rng.normal(0, 0.1, 10).astype(np.float32)
    nodes = [_conv(rng, inits, "c0", "x", "a"), helper.make_node("LeakyRelu", ["a"], ["al"], name="lrelu", alpha=0.1),
             helper.make_node("AveragePool", ["al"], ["p"], name="avg", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["z"], name="fc", transB=1),
             helper.make_node("Softmax", ["z"], ["y"], name="softmax", axis=-1)]
    return _model(nodes, inits, ["N", 10])


PATTERNS = {"se_block": se_block, "hardswish": hardswish, "hardswish_clip": hardswish_clip,
            "hardswish_fused": hardswish, "hardswish_clip_fused": lambda: hardswish_clip(11, "Mul"),
            "hardswish_paddle": lambda: hardswish_clip(after=True),
            "hardswish_paddle_fused": lambda: hardswish_clip(after=True), "fpn": fpn, "fpn_linear": lambda: fpn("linear"),
            "shuffle": shuffle, "fanout": fanout, "head": head}


def _all_int8(model, forms=None):
    prepared = prepare(model)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.normal(0, 1, (4, C, 8, 8)).astype(np.float32)} for _ in range(3)]
    tensors = [t for la in prepared.layers for t in (*la.activations, la.output, la.fused_output) if t]
    stats = collect(prepared.proto, tensors, feeds)
    plan = build_plan(prepared, {n: LayerChoice("int8", "minmax", "per_tensor") for n in prepared.layer_names}, stats,
                      forms=forms)
    return prepared, Rewriter(prepared)(plan), feeds


def _ort_all_int8(prepared, feeds):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "m.onnx", Path(tmp) / "q.onnx"
        onnx.save(prepared.proto, src)
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=False,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return onnx.load(dst)


# int8 kernels ONNX Runtime runs for qsearch's all-INT8 model, and Q/DQ nodes it leaves standing
GOLDEN = {
    "se_block": ({"QLinearConv": 4, "QLinearGlobalAveragePool": 1, "QLinearSigmoid": 1, "QLinearMul": 1}, 2),
    # HardSigmoid has no int8 kernel: it runs in float between one DQ and one Q (as in ORT's model)
    "hardswish": ({"QLinearConv": 2, "QLinearMul": 1}, 4),
    # the +3 (Clip folded in) a QLinearAdd, the /6 in float between one DQ and one Q, the product a QLinearMul
    "hardswish_clip": ({"QLinearConv": 2, "QLinearAdd": 1, "QLinearMul": 1}, 4),
    # fused: one float HardSwish between one DQ and one Q, whichever way the source spelled it (after
    # ORT's optimizer the same DQ, HardSigmoid, Mul, Q: its CPU provider inlines HardSwish)
    "hardswish_fused": ({"QLinearConv": 2}, 4),
    "hardswish_clip_fused": ({"QLinearConv": 2}, 4),
    # paddle2onnx's x * Clip(x + 3, 0, 6), then / 6: QLinearAdd, QLinearMul, the /6 in float; fused: one op
    "hardswish_paddle": ({"QLinearConv": 2, "QLinearAdd": 1, "QLinearMul": 1}, 4),
    "hardswish_paddle_fused": ({"QLinearConv": 2}, 4),
    "fpn": ({"QLinearConv": 3, "QLinearConcat": 1}, 2),  # MaxPool and Resize on uint8, no Q/DQ around them
    # ORT keeps linear Resize in float: Q/DQ around it, and no Q added before it (it would not pay)
    "fpn_linear": ({"QLinearConv": 3, "QLinearConcat": 1}, 4),
    "shuffle": ({"QLinearConv": 4, "QLinearConcat": 1}, 2),  # Reshape/Transpose/Split/Slice on uint8
    "fanout": ({"QLinearConv": 4, "QLinearConcat": 1}, 2),  # one Transpose, two Slices: all on uint8
    "head": ({"QLinearConv": 1, "QLinearLeakyRelu": 1, "QLinearAveragePool": 1, "QGemm": 1, "QLinearSoftmax": 1}, 2),
}


@pytest.mark.parametrize("name", list(PATTERNS))
def test_pattern_fuses_at_least_as_well_as_ort(name):
    model = PATTERNS[name]()
    fused = name.endswith("_fused")
    prepared, ours, feeds = _all_int8(model, {"hardswish": "fused"} if fused else None)
    onnx.checker.check_model(ours, full_check=True)
    ort_model = _ort_all_int8(prepared, feeds)
    mine, ort_ = fusion_check(ours), fusion_check(ort_model)
    kernels = {op: n for op, n in mine.ops.items() if op.startswith(("QLinear", "QGemm"))}
    assert (kernels, mine.unfused_qdq) == GOLDEN[name]
    if fused:  # one HardSwish between one DQ and one Q instead of a float gate and a QLinearMul; ORT's
        # CPU provider has no HardSwish kernel and inlines it (HardSigmoid, Mul), whichever way the source spelled it
        assert [n.op_type for n in ours.graph.node].count("HardSwish") == 1
        assert not any(op in mine.ops for op in ("QLinearMul", "QLinearAdd", "Clip", "Div", "Add"))
    else:  # decomposed: every piece ORT has a kernel for runs in int8 (the clip spelling's +3 a QLinearAdd)
        assert mine.int8_kernels >= ort_.int8_kernels and mine.unfused_qdq <= ort_.unfused_qdq
    from onnxruntime import InferenceSession

    def error(m):  # largest output error relative to the output's range
        out = InferenceSession(m.SerializeToString()).run(None, feeds[0])[0]
        assert out.shape == ref.shape
        return float(np.abs(out - ref).max() / np.abs(ref).max())

    ref = InferenceSession(model.SerializeToString()).run(None, feeds[0])[0]
    # small, or no worse than ORT's own all-INT8 model of the same graph (random weights: some compound)
    assert error(ours) < max(0.15, 1.05 * error(ort_model)) + 1e-3
