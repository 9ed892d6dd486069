import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qsearch.calibration import collect
from qsearch.model.folding import fold_affine
from qsearch.model.load import prepare
from qsearch.plan.build import build_plan, weight_copies
from qsearch.plan.format import LayerChoice
from qsearch.rewrite import Rewriter
from qsearch.scoring import fused_op_counts

from .conftest import EXACT_WEIGHTS, make_cnn


def _run(model, feed):
    """One intra-op thread: with a thread pool, MLAS may split a reduction differently from one
    session to the next, and bit-identity checks would compare rounding, not graphs."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, feed)


def _calibrated(model, seed=0, shape=(4, 3, 8, 8)):
    prepared = prepare(model)
    rng = np.random.default_rng(seed)
    feeds = [{prepared.inputs[0].name: rng.normal(0, 1, shape).astype(np.float32)} for _ in range(3)]
    tensors = [t for la in prepared.layers for t in (*la.activations, la.output, la.fused_output) if t]
    return prepared, collect(prepared.proto, tensors, feeds), feeds


def test_layers_of_the_small_cnn(cnn):
    prepared = prepare(cnn)
    names = [(la.name, la.op_type, la.nodes) for la in prepared.layers]
    assert names == [
        ("conv_a", "Conv", ("conv_a", "relu_a")),
        ("conv_b", "Conv", ("conv_b",)),
        ("add_res", "Add", ("add_res", "relu_s")),
        ("gap", "GlobalAveragePool", ("gap",)),
        ("fc", "Gemm", ("fc",)),
    ]
    assert prepared.layer("conv_b").macs == 8 * 8 * 8 * 8 * 9
    assert prepared.layer("fc").weight_axis == 0  # transB=1: output channels on axis 0


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_all_int8_fuses_into_int8_kernels(cnn, granularity):
    """Golden op counts after ONNX Runtime's optimizer: every layer became an int8 kernel."""
    prepared, stats, feeds = _calibrated(cnn)
    plan = build_plan(prepared, {n: LayerChoice("int8", "minmax", granularity) for n in prepared.layer_names}, stats)
    model = Rewriter(prepared)(plan)
    onnx.checker.check_model(model)
    ops = fused_op_counts(model)
    assert ops.get("QLinearConv") == 2
    assert ops.get("QLinearAdd") == 1
    assert ops.get("QGemm") == 1
    assert ops.get("QLinearGlobalAveragePool") == 1
    # the Reshape runs on uint8; one Q (the input); the QGemm writes float: no DQ at all
    assert ops.get("Reshape") == 1 and ops.get("QuantizeLinear") == 1 and "DequantizeLinear" not in ops
    assert "Conv" not in ops and "Relu" not in ops  # Relu folded into the output Q (zero point 0)
    assert [i.name for i in model.graph.input] == ["x"] and [o.name for o in model.graph.output] == ["y"]
    ref, out = _run(cnn, feeds[0])[0], _run(model, feeds[0])[0]
    assert np.abs(ref - out).max() < 0.1 * np.abs(ref).max()


def test_mixed_plan_quantizes_only_int8_layers(cnn):
    prepared, stats, feeds = _calibrated(cnn)
    plan = build_plan(prepared, {"conv_a": LayerChoice("int8", "entropy", "per_tensor")}, stats)
    assert set(plan.ranges) == {"x", "a_relu"}
    ops = fused_op_counts(Rewriter(prepared)(plan))
    assert ops.get("QLinearConv") == 1 and ops.get("Conv", 0) + ops.get("FusedConv", 0) == 1


def test_all_float_plan_is_bit_identical(cnn):
    prepared, stats, feeds = _calibrated(cnn)
    model = Rewriter(prepared)(build_plan(prepared, {}, stats))
    for a, b in zip(_run(cnn, feeds[0]), _run(model, feeds[0])):
        np.testing.assert_array_equal(a, b)


def test_fp16_target_casts_only_at_region_borders(cnn):
    prepared, stats, feeds = _calibrated(cnn)
    choices = {"conv_a": LayerChoice("int8"), "conv_b": LayerChoice("fp16"), "add_res": LayerChoice("fp16"),
               "fc": LayerChoice("fp16")}
    model = Rewriter(prepared)(build_plan(prepared, choices, stats, target="fp16"))
    onnx.checker.check_model(model)
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    # into the FP16 region: the int8 conv's dequantized output (read by conv_b and the residual add);
    # out of it: the model output. GAP/Reshape between add and fc stay inside the region.
    assert len(casts) == 2
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    ref, out = _run(cnn, feeds[0])[0], _run(model, feeds[0])[0]
    assert out.dtype == np.float32 and np.abs(ref - out).max() < 0.1 * np.abs(ref).max()


def test_opset11_model_is_upgraded_for_per_channel():
    prepared, stats, feeds = _calibrated(make_cnn(opset=11))
    plan = build_plan(prepared, {n: LayerChoice("int8") for n in prepared.layer_names}, stats)
    model = Rewriter(prepared)(plan)
    assert max(o.version for o in model.opset_import if o.domain == "") >= 13
    assert any(n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute) for n in model.graph.node)
    assert _run(model, feeds[0])[0].shape == (4, 10)


# ----------------------------------------------------------------- property tests (hypothesis)

C = 4


@st.composite
def random_graphs(draw):
    """Chains and branches of Conv/Relu/Add/Mul/Concat/Reshape with shared initializers,
    squeeze-excite gates, hardswish, pooling + Resize, Split/Slice + Concat, LeakyRelu, Sigmoid,
    then a MatMul or Gemm head (transposed weight or not, with or without bias, maybe Softmax)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    nodes, inits = [], {}
    tensors = ["x"]  # all (N, C, 4, 4)
    shared = rng.normal(0, 0.5, (C, C, 3, 3)).astype(np.float32)
    inits["w_shared"] = shared
    n_ops = draw(st.integers(1, 7))
    for i in range(n_ops):
        op = draw(st.sampled_from(["Conv", "ConvShared", "Relu", "Add", "Mul", "Concat", "SE", "HardSwish",
                                   "PoolResize", "SplitConcat", "SliceConcat", "LeakyRelu", "Sigmoid", "AddConst",
                                   "MulConst", "HardSwishClip"]))
        src = draw(st.sampled_from(tensors))
        out = f"t{i}"
        if op in ("Conv", "ConvShared"):
            w = "w_shared" if op == "ConvShared" else f"w{i}"
            if op == "Conv":
                inits[w] = rng.normal(0, 0.5, (C, C, 3, 3)).astype(np.float32)
            inits[f"b{i}"] = rng.normal(0, 0.1, C).astype(np.float32)
            nodes.append(helper.make_node("Conv", [src, w, f"b{i}"], [out], name=f"n{i}", pads=[1, 1, 1, 1]))
        elif op == "Relu":
            nodes.append(helper.make_node("Relu", [src], [out], name=f"n{i}"))
        elif op in ("Add", "Mul"):
            other = draw(st.sampled_from(tensors))
            if other == src:
                nodes.append(helper.make_node("Relu", [src], [out], name=f"n{i}"))
            else:
                nodes.append(helper.make_node(op, [src, other], [out], name=f"n{i}"))
        elif op == "SE":  # x * sigmoid(GAP(x)), the gate broadcast over H, W
            nodes += [helper.make_node("GlobalAveragePool", [src], [f"{out}_g"], name=f"n{i}_gap"),
                      helper.make_node("Sigmoid", [f"{out}_g"], [f"{out}_s"], name=f"n{i}_sig"),
                      helper.make_node("Mul", [src, f"{out}_s"], [out], name=f"n{i}")]
        elif op in ("AddConst", "MulConst"):  # a scalar or a per-channel constant, either side
            shape = draw(st.sampled_from([(), (C, 1, 1)]))
            inits[f"k{i}"] = rng.normal(0, 2, shape).astype(np.float32)
            ins = [src, f"k{i}"] if draw(st.booleans()) else [f"k{i}", src]
            nodes.append(helper.make_node(op[:3], ins, [out], name=f"n{i}"))
        elif op == "HardSwishClip":  # x * Clip(x + 3, 0, 6) / 6, the /6 before or after the product
            inits.update({"three": np.float32(3), "zero": np.float32(0), "six": np.float32(6)})
            nodes += [helper.make_node("Add", [src, "three"], [f"{out}_a"], name=f"n{i}_add"),
                      helper.make_node("Clip", [f"{out}_a", "zero", "six"], [f"{out}_c"], name=f"n{i}_clip")]
            if draw(st.booleans()):  # opset 11 exporters
                nodes += [helper.make_node("Div", [f"{out}_c", "six"], [f"{out}_g"], name=f"n{i}_div"),
                          helper.make_node("Mul", [src, f"{out}_g"], [out], name=f"n{i}")]
            else:  # paddle2onnx
                nodes += [helper.make_node("Mul", [src, f"{out}_c"], [f"{out}_m"], name=f"n{i}_mul"),
                          helper.make_node("Div", [f"{out}_m", "six"], [out], name=f"n{i}")]
        elif op in ("HardSwish", "LeakyRelu", "Sigmoid"):
            nodes.append(helper.make_node(op, [src], [out], name=f"n{i}"))
        elif op == "PoolResize":  # 4x4 -> 2x2 (max or average) -> 4x4 (nearest or linear)
            pool = draw(st.sampled_from(["MaxPool", "AveragePool"]))
            inits["up_scales"] = np.array([1, 1, 2, 2], np.float32)
            nodes += [helper.make_node(pool, [src], [f"{out}_p"], name=f"n{i}_pool", kernel_shape=[2, 2], strides=[2, 2]),
                      helper.make_node("Resize", [f"{out}_p", "", "up_scales"], [out], name=f"n{i}",
                                       mode=draw(st.sampled_from(["nearest", "linear"])))]
        elif op == "SplitConcat":  # halves swapped
            inits["halves"] = np.array([C // 2, C // 2], np.int64)
            nodes += [helper.make_node("Split", [src, "halves"], [f"{out}_h0", f"{out}_h1"], name=f"n{i}_split", axis=1),
                      helper.make_node("Concat", [f"{out}_h1", f"{out}_h0"], [out], name=f"n{i}", axis=1)]
        elif op == "SliceConcat":
            inits.update({"s0": np.array([0], np.int64), "s1": np.array([C // 2], np.int64),
                          "s2": np.array([C], np.int64), "ax1": np.array([1], np.int64)})
            nodes += [helper.make_node("Slice", [src, "s0", "s1", "ax1"], [f"{out}_a"], name=f"n{i}_sa"),
                      helper.make_node("Slice", [src, "s1", "s2", "ax1"], [f"{out}_b"], name=f"n{i}_sb"),
                      helper.make_node("Concat", [f"{out}_b", f"{out}_a"], [out], name=f"n{i}", axis=1)]
        else:  # Concat then a 1x1 conv back to C channels
            other = draw(st.sampled_from(tensors))
            nodes.append(helper.make_node("Concat", [src, other], [f"{out}_cat"], name=f"n{i}_cat", axis=1))
            inits[f"w{i}"] = rng.normal(0, 0.5, (C, 2 * C, 1, 1)).astype(np.float32)
            nodes.append(helper.make_node("Conv", [f"{out}_cat", f"w{i}"], [out], name=f"n{i}"))
        tensors.append(out)
    last = tensors[-1]
    inits["shape"] = np.array([0, -1], dtype=np.int64)
    nodes.append(helper.make_node("Reshape", [last, "shape"], ["flat"], name="flatten"))
    head = draw(st.sampled_from(["MatMul", "Gemm", "GemmT", "GemmBias"]))
    softmax = draw(st.booleans())
    logits = "z" if softmax else "y"
    if head == "MatMul":
        inits["wm"] = rng.normal(0, 0.3, (C * 16, 5)).astype(np.float32)
        nodes.append(helper.make_node("MatMul", ["flat", "wm"], [logits], name="head"))
    else:
        trans = head == "GemmT"
        inits["wm"] = rng.normal(0, 0.3, (5, C * 16) if trans else (C * 16, 5)).astype(np.float32)
        ins = ["flat", "wm"]
        if head == "GemmBias":
            inits["bm"] = rng.normal(0, 0.1, 5).astype(np.float32)
            ins.append("bm")
        nodes.append(helper.make_node("Gemm", ins, [logits], name="head", transB=int(trans)))
    if softmax:
        nodes.append(helper.make_node("Softmax", [logits], ["y"], name="softmax", axis=-1))
    graph = helper.make_graph(
        nodes, "random",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


OPTIONS = [LayerChoice("fp32")] + [LayerChoice("int8", m, g) for m in ("minmax", "entropy", "percentile", "mse")
                                   for g in ("per_channel", "per_tensor")]


@settings(max_examples=int(os.environ.get("QSEARCH_FUZZ_EXAMPLES", "30")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=random_graphs(), data=st.data())
def test_random_plans_on_random_graphs_give_valid_runnable_models(model, data):
    onnx.checker.check_model(model)
    prepared, stats, feeds = _calibrated(model, shape=(2, C, 4, 4))
    choices = {n: data.draw(st.sampled_from(OPTIONS), label=n) for n in prepared.layer_names}
    forms = data.draw(st.sampled_from([{}, {"hardswish": "decomposed"}, {"hardswish": "fused"}]), label="forms")
    rewriter = Rewriter(prepared)
    out = rewriter(build_plan(prepared, choices, stats, forms=forms))
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == ["y"]
    y = _run(out, feeds[0])[0]
    assert y.shape == (2, 5) and y.dtype == np.float32 and np.isfinite(y).all()
    # the all-float plan reproduces the prepared graph bit for bit: the rewriter never touches a
    # float layer, and keeps even nodes that were dead in the source (sweeping them changed which
    # Conv ONNX Runtime fused an Add into: a few ulps, found at 300 examples). The user's file up
    # to float rounding: preparation folds constant Mul/Add into Convs.
    flt = _run(rewriter(build_plan(prepared, {}, stats, forms=forms)), feeds[0])[0]
    np.testing.assert_array_equal(_run(prepared.proto, feeds[0])[0], flt)
    src = _run(model, feeds[0])[0]
    np.testing.assert_allclose(flt, src, rtol=1e-4, atol=1e-5 * float(np.abs(src).max()))
    if not fold_affine(onnx.ModelProto.FromString(prepare(model, preparation=1).proto.SerializeToString())):
        np.testing.assert_array_equal(src, flt)  # nothing to fold: the source to the bit


def test_quantized_tensors_and_shared_scales_on_a_known_graph(cnn):
    """Direct: conv_b alone quantizes its input and output; gap and fc quantize the pooled tensor
    and the classifier's input, which the Reshape between them joins into one shared scale; fc's
    output stays float (a QGemm writes float)."""
    from qsearch.plan.build import quantized_tensors

    prepared = prepare(cnn)
    tensors, groups = quantized_tensors(prepared, {"conv_b"})
    assert tensors == ["a_relu", "b"] and groups == []
    tensors, groups = quantized_tensors(prepared, {"gap", "fc"})
    assert set(tensors) == {"s_relu", "g", "f"}
    assert {"g", "f"} in [set(g) for g in groups]
    tensors, _ = quantized_tensors(prepared, set())
    assert tensors == []


def _colliding_cnn() -> onnx.ModelProto:
    """The small CNN, with user names exactly where the rewriter would put its own: a float
    constant `s_relu_scale` (what the Q/DQ scale of tensor s_relu would be called) read by a Mul
    on the output path, an int64 constant `b_zero_point`, and activations named `a_relu_quantized`
    and `b_prequant`."""
    from onnx import numpy_helper

    m = make_cnn(seed=3)
    g = m.graph
    for n in g.node:  # conv_b reads a Relu whose output is called like a quantized twin
        for i, t in enumerate(n.input):
            if t == "b":
                n.input[i] = "b_prequant"
        for i, t in enumerate(n.output):
            if t == "b":
                n.output[i] = "b_prequant"
    g.initializer.extend([numpy_helper.from_array(np.array(0.5, np.float32), "s_relu_scale"),
                          numpy_helper.from_array(np.array([0, -1], np.int64), "b_zero_point")])
    fc = next(n for n in g.node if n.name == "fc")
    fc.output[0] = "y_raw"
    g.node.extend([helper.make_node("Mul", ["y_raw", "s_relu_scale"], ["y_half"], name="half"),
                   helper.make_node("Reshape", ["y_half", "b_zero_point"], ["y"], name="flat")])
    extra = helper.make_node("Identity", ["a_relu"], ["a_relu_quantized"], name="a_relu_quantized")
    g.node.insert(2, extra)
    for n in g.node:
        if n.name == "conv_b":
            n.input[0] = "a_relu_quantized"
    onnx.checker.check_model(m)
    return m


def test_generated_names_never_collide_with_the_users():
    """Every name the rewriter makes is fresh against the graph's own: the user's constants keep
    their values, the model loads in ONNX Runtime, an all-float plan is the original to the bit,
    and all-INT8 stays close to it (a replaced 0.5 scale would change the outputs by far more)."""
    from onnx import numpy_helper

    model = _colliding_cnn()
    prepared, stats, feeds = _calibrated(model)
    rw = Rewriter(prepared)
    float_plan = build_plan(prepared, {}, stats)
    for a, b in zip(_run(model, feeds[0]), _run(rw(float_plan), feeds[0])):
        np.testing.assert_array_equal(a, b)
    for granularity in ("per_tensor", "per_channel"):
        plan = build_plan(prepared, {la.name: LayerChoice("int8", "minmax", granularity, weights=EXACT_WEIGHTS)
                                     for la in prepared.layers}, stats)
        q = rw(plan)
        onnx.checker.check_model(q)
        inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
        # (the Mul by 0.5 is itself an INT8 layer: it reads its own uint8 copy of the constant)
        assert float(inits.get("s_relu_scale", 0.5)) == 0.5 and inits["b_zero_point"].tolist() == [0, -1]
        names = [n.name for n in q.graph.node]
        assert len(names) == len(set(names))
        want, got = _run(model, feeds[0])[0], _run(q, feeds[0])[0]
        assert np.abs(got - want).max() <= 0.1 * np.abs(want).max()
    probe, pairs = rw.probe([(la, LayerChoice("int8", "minmax", "per_tensor")) for la in prepared.layers],
                            {t: (float(s.min), float(s.max)) for t, s in stats.tensors.items()})
    outs = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        [t for p in pairs for t in p], feeds[0])
    assert all(np.isfinite(o).all() for o in outs)


GENERATED = ("_scale", "_zero_point", "_quantized", "_prequant", "_dequantized", "_pc_dequantized", "_pt_scale",
             "_QuantizeLinear", "_DequantizeLinear", "_fp16", "_to_fp16", "__probe0_fq", "__probe0_signal")


def _rename_to_generated(model: onnx.ModelProto, data) -> onnx.ModelProto:
    """The same graph with some internal tensors and initializers renamed to what the rewriter,
    probes or FP16 conversion would generate for another tensor (x -> `<other>_scale`...)."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    g = m.graph
    keep = {i.name for i in g.input} | {o.name for o in g.output}
    names = sorted({t for n in g.node for t in n.output if t not in keep} | {i.name for i in g.initializer})
    picked = data.draw(st.lists(st.sampled_from(names), unique=True, max_size=min(6, len(names))), label="renamed")
    taken = set(names) | keep
    mapping = {}
    for t in picked:
        new = data.draw(st.sampled_from(names), label="like") + data.draw(st.sampled_from(GENERATED), label="suffix")
        if new not in taken:
            mapping[t] = new
            taken.add(new)
    for n in g.node:
        n.input[:] = [mapping.get(t, t) for t in n.input]
        n.output[:] = [mapping.get(t, t) for t in n.output]
    for i in g.initializer:
        i.name = mapping.get(i.name, i.name)
    del g.value_info[:]
    return m


@settings(max_examples=int(os.environ.get("QSEARCH_FUZZ_EXAMPLES", "30")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(model=random_graphs(), data=st.data())
def test_random_plans_on_graphs_named_like_generated_tensors_for_every_target_and_form(model, data):
    """Names chosen to collide with the generated ones, on the CPU and FP16 targets, in every form:
    valid, runnable models; the all-float plan is the prepared graph to the bit, and the source
    up to float rounding."""
    model = _rename_to_generated(model, data)
    onnx.checker.check_model(model)
    prepared, stats, feeds = _calibrated(model, shape=(2, C, 4, 4))
    target = data.draw(st.sampled_from(["cpu", "fp16"]), label="target")
    options = OPTIONS + ([LayerChoice("fp16")] if target == "fp16" else [])
    choices = {n: data.draw(st.sampled_from(options), label=n) for n in prepared.layer_names}
    forms = data.draw(st.sampled_from([{}, {"hardswish": "decomposed"}, {"hardswish": "fused"}]), label="forms")
    rewriter = Rewriter(prepared)
    out = rewriter(build_plan(prepared, choices, stats, target=target, forms=forms))
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == ["y"]
    names = [n.name for n in out.graph.node]
    assert len(names) == len(set(names))
    y = _run(out, feeds[0])[0]
    assert y.shape == (2, 5) and y.dtype == np.float32 and np.isfinite(y).all()
    flt = _run(rewriter(build_plan(prepared, {}, stats, forms=forms)), feeds[0])[0]
    np.testing.assert_array_equal(_run(prepared.proto, feeds[0])[0], flt)
    src = _run(model, feeds[0])[0]  # the prepared graph folds constant Mul/Add into Convs: float rounding apart
    np.testing.assert_allclose(flt, src, rtol=1e-4, atol=1e-5 * float(np.abs(src).max()))


def test_shared_weights_and_biases_are_stored_once():
    """Six convs over one kernel and one zero bias (a constant-Q transform's layout): the INT8 model
    stores the kernel once, no bias at all (a zero bias adds nothing), and is smaller than FP32; a
    shared non-zero bias is stored once per distinct (values, scale)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (16, 16, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros(16, np.float32), "b0"),
             numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "b1")]
    nodes, t = [], "x"
    for i in range(6):
        nodes.append(helper.make_node("Conv", [t, "w", "b0" if i < 3 else "b1"], [f"c{i}"], name=f"conv{i}",
                                      pads=[1, 1, 1, 1]))
        t = f"c{i}"
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 8, 8])],
                              [helper.make_tensor_value_info(t, TensorProto.FLOAT, ["N", 16, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    prepared = prepare(model)
    x = rng.normal(size=(8, 16, 8, 8)).astype(np.float32)
    stats = collect(prepared.proto, [s for la in prepared.layers for s in (*la.activations, la.output)], [{"x": x}])
    for gran in ("per_tensor", "per_channel"):
        plan = build_plan(prepared, {la.name: LayerChoice("int8", "minmax", gran, weights=EXACT_WEIGHTS)
                                     for la in prepared.layers}, stats)
        q = Rewriter(prepared)(plan)
        names = [i.name for i in q.graph.initializer]
        assert sum(n.endswith("_quantized") and n.startswith("w_") for n in names) == 1, names
        assert not any(n.startswith("b0") for n in names)  # the zero bias: gone
        assert sum(n.startswith("b1") and n.endswith("_quantized") for n in names) <= 3  # one per distinct scale
        assert q.ByteSize() < prepared.proto.ByteSize()
        assert weight_copies(prepared, plan) == {}
        ref = ort.InferenceSession(prepared.proto.SerializeToString(), providers=["CPUExecutionProvider"])
        got = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
        a, b = ref.run(None, {"x": x})[0], got.run(None, {"x": x})[0]
        assert np.abs(a - b).max() < 0.1 * np.abs(a).max()  # still the same computation, quantized
    mixed = build_plan(prepared, {la.name: LayerChoice("int8", "minmax", "per_tensor" if i % 2 else "per_channel")
                                  for i, la in enumerate(prepared.layers)}, stats)
    assert weight_copies(prepared, mixed) == {"w": ("per-channel", "per-tensor")}  # the report says why it grew


def test_a_dead_channel_keeps_its_bias(tmp_path):
    """A channel whose weights are all but zero (1e-40 after BatchNorm folding) and whose bias is not:
    its per-channel weight scale once made the int32 bias overflow, and the bias was clipped away
    (PP-OCRv4's recognizer lost -0.65 so). The scale is raised until the bias fits."""
    import onnxruntime as ort

    from .conftest import open_bench, write_workload

    model = make_cnn()
    for init in model.graph.initializer:
        if init.name in ("wa", "ba"):
            a = numpy_helper.to_array(init).copy()
            a[0] = 1e-40 if init.name == "wa" else 0.7
            init.CopyFrom(numpy_helper.from_array(a, init.name))
    bench = open_bench(write_workload(tmp_path / "w", model, n=64), tmp_path / "c")
    qdq = bench.rewriter(bench.plan({"conv_a": LayerChoice("int8", "minmax", "per_channel")}))
    m = onnx.ModelProto.FromString(qdq.SerializeToString())
    m.graph.output.append(onnx.helper.make_tensor_value_info("a_relu", onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    out = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        ["a_relu"], dict(bench.search_data.batches[0]))[0]
    lo, hi = bench.plan({"conv_a": LayerChoice("int8", "minmax", "per_channel")}).ranges["a_relu"]
    assert np.abs(out[:, 0] - 0.7).max() <= (hi - lo) / 255  # within one output step of the float 0.7


@pytest.mark.parametrize("precision, target", [("int8", "cpu"), ("int16", "npu")])
def test_a_dead_channel_without_bias_still_has_a_normal_bias_scale(precision, target, tmp_path):
    """A dead channel (weights 1e-40) whose bias is 0: its bias scale s_x * s_w underflowed float32 to
    0 (a uint16 input's s_x is 256x smaller than a uint8 one's), a scale no runtime should be given
    and a division by zero while quantizing. Every scale the rewriter writes is a normal float32."""
    import warnings

    from .conftest import open_bench, write_workload

    model = make_cnn(opset=21)
    for init in model.graph.initializer:
        if init.name in ("wa", "ba"):
            a = numpy_helper.to_array(init).copy()
            a[0] = 1e-40 if init.name == "wa" else 0.0
            init.CopyFrom(numpy_helper.from_array(a, init.name))
    bench = open_bench(write_workload(tmp_path / "w", model, n=64, extra=f"target: {target}\n"), tmp_path / "c")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero on the way
        qdq = bench.rewriter(bench.plan({"conv_a": LayerChoice(precision, "minmax", "per_channel")}))
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    scales = [inits[n.input[1]] for n in qdq.graph.node if n.op_type == "DequantizeLinear"]
    tiny = np.finfo(np.float32).tiny
    assert scales and all(np.all(s >= tiny) for s in scales)
