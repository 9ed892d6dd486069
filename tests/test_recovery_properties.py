"""Property tests for recovery, in the manner of the rewriter's: random small graphs of the kinds
recovery edits (Conv, Gemm and MatMul with and without bias, MatMul+Add pairs that ONNX Runtime
fuses into a Gemm whose C is 1-D or 2-D, shared weights, a second input of int64 ids), every
recovery option the proxy offers on each layer. For each:
- the rewritten model is valid and runs on ONNX Runtime's int8 kernels;
- the all-float plan is bit-identical to the prepared graph;
- the probe (what ranked the option) and the final rewrite agree: the layer's output error in the
  rewritten model is the error the probe measured, both run on this CPU's int8 kernels (the probe
  sees what the machine computes: on a CPU whose u8s8 kernels saturate, int8 weights lose there).

Where ONNX Runtime's u8s8 kernels saturate (x86 without VNNI), int8-weight options are checked for
validity only: the probe's twin and the shipped layer may fuse into different kernels (a MatMul
reading a graph input ran exact in the probe and saturated in the final model), so their errors
differ by the saturation; the weights safe on such a CPU (int7, the default there) agree.

`QSEARCH_FUZZ_EXAMPLES` sets the examples per run (experiments/reliability.md: 500).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qsearch.analysis.proxy import options_for, proxy_sqnr
from qsearch.engine.isa import detect
from qsearch.recovery.equalization import bias_slot
from qsearch.recovery.techniques import uses

from .conftest import open_bench

D, CLASSES = 8, 4
EXAMPLES = int(os.environ.get("QSEARCH_FUZZ_EXAMPLES", "6"))


@st.composite
def recovery_graphs(draw):
    """x (N, D) float, maybe ids (N, 3) int64 through an embedding, maybe img (N, 3, 4, 4) through
    Conv (bias or not) + Relu + Conv (a pair equalization can take); then dense units of every kind."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    inits: dict[str, np.ndarray] = {}
    nodes, inputs = [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])]
    feats = ["x"]
    if draw(st.booleans()):
        inits["emb"] = rng.normal(0, 1, (20, D)).astype(np.float32)
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3]))
        nodes += [helper.make_node("Gather", ["emb", "ids"], ["e"], name="gather"),
                  helper.make_node("ReduceMean", ["e"], ["e_mean"], name="e_mean", axes=[1], keepdims=0)]
        feats.append("e_mean")
    if draw(st.booleans()):
        inputs.append(helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 3, 4, 4]))
        inits["wc1"] = (rng.normal(0, 0.5, (D, 3, 3, 3)) * rng.uniform(0.05, 5, (D, 1, 1, 1))).astype(np.float32)
        inits["wc2"] = rng.normal(0, 0.3, (D, D, 1, 1)).astype(np.float32)
        c1 = ["img", "wc1"] + (["bc1"] if draw(st.booleans()) else [])
        c2 = ["c1r", "wc2"] + (["bc2"] if draw(st.booleans()) else [])
        for b in {"bc1", "bc2"} & {*c1, *c2}:
            inits[b] = rng.normal(0, 0.1, D).astype(np.float32)
        inits["flat_shape"] = np.array([0, -1], np.int64)
        nodes += [helper.make_node("Conv", c1, ["c1"], name="conv1", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["c1"], ["c1r"], name="conv1_relu"),
                  helper.make_node("Conv", c2, ["c2"], name="conv2"),
                  helper.make_node("GlobalAveragePool", ["c2"], ["c2g"], name="gap"),
                  helper.make_node("Reshape", ["c2g", "flat_shape"], ["c2f"], name="flat")]
        feats.append("c2f")
    width = D * len(feats)
    h = "h0"
    nodes.append(helper.make_node("Concat", feats, [h], name="cat", axis=1) if len(feats) > 1
                 else helper.make_node("Identity", ["x"], [h], name="first"))
    if width != D:  # back to D so every later unit is D x D (and weights can be shared)
        inits["w_in"] = rng.normal(0, 0.4, (width, D)).astype(np.float32)
        nodes.append(helper.make_node("MatMul", [h, "w_in"], ["h_in"], name="mm_in"))
        h = "h_in"
    for i in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["matmul", "matmul_add", "matmul_add_2d", "gemm", "gemm_bias", "gemm_bias_2d",
                                     "gemm_t", "shared"]))
        out, w = f"h{i + 1}", "w_shared" if kind == "shared" else f"w{i}"
        if w not in inits:
            inits[w] = rng.normal(0, 0.4, (D, D)).astype(np.float32)
        if kind in ("matmul", "shared"):
            nodes.append(helper.make_node("MatMul", [h, w], [f"{out}_pre"], name=f"u{i}"))
        elif kind.startswith("matmul_add"):
            inits[f"b{i}"] = rng.normal(0, 0.2, (1, D) if kind.endswith("2d") else (D,)).astype(np.float32)
            nodes += [helper.make_node("MatMul", [h, w], [f"{out}_mm"], name=f"u{i}"),
                      helper.make_node("Add", [f"{out}_mm", f"b{i}"], [f"{out}_pre"], name=f"u{i}_add")]
        else:
            ins = [h, w]
            if kind.startswith("gemm_bias"):
                inits[f"b{i}"] = rng.normal(0, 0.2, (1, D) if kind.endswith("2d") else (D,)).astype(np.float32)
                ins.append(f"b{i}")
            nodes.append(helper.make_node("Gemm", ins, [f"{out}_pre"], name=f"u{i}", transB=int(kind == "gemm_t")))
        nodes.append(helper.make_node("Relu", [f"{out}_pre"], [out], name=f"u{i}_relu"))
        h = out
    inits["w_head"] = rng.normal(0, 0.4, (D, CLASSES)).astype(np.float32)
    nodes.append(helper.make_node("MatMul", [h, "w_head"], ["y"], name="head"))
    graph = helper.make_graph(nodes, "recovery_random", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CLASSES])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def workload(tmp: Path, model: onnx.ModelProto, n: int = 48) -> Path:
    """The model with random splits of every input it has, labelled by the FP32 model."""
    onnx.save(model, tmp / "model.onnx")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    shapes = {"x": (n, D), "ids": (n, 3), "img": (n, 3, 4, 4)}
    for split in ("calib", "search", "test"):
        feed = {i.name: (rng.integers(0, 20, shapes[i.name]) if i.name == "ids"
                         else rng.normal(0, 1, shapes[i.name]).astype(np.float32)) for i in model.graph.input}
        np.savez(tmp / f"{split}.npz", label=sess.run(None, feed)[0].argmax(1), **feed)
    (tmp / "workload.yaml").write_text(
        "name: recovery_random\nmodel: model.onnx\ndata:\n  batch_size: 16\n"
        "  calibration: {npz: calib.npz, labels: label}\n  search: {npz: search.npz, labels: label}\n"
        "  test: {npz: test.npz, labels: label}\nmetric: top1\nmax_drop: 0.05\n"
        "search_space: {extends: default, recovery: [bias, cle, smooth], weights: [int8, int7]}\n")
    return tmp / "workload.yaml"


def run(model: onnx.ModelProto, feed: dict, outputs: list[str], optimize: bool = True) -> list[np.ndarray]:
    """Outputs of `model`, the named tensors exposed as graph outputs. Without `optimize`, ONNX
    Runtime runs Q/DQ as the float arithmetic they define (the probe's), not int8 kernels."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    known = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.ValueInfoProto(name=t) for t in outputs if t not in known)
    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(outputs, feed)


def observed(model: onnx.ModelProto, tensor: str) -> str:
    """The value the rest of the graph reads for `tensor`: its Q -> DQ output when one follows (the
    rewriter renames the producer's output `<tensor>_prequant` and dequantizes per consumer)."""
    q = next((n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in (tensor, f"{tensor}_prequant")),
             None)
    if q is None:
        return tensor
    return next(n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])


def compared(bench, layer) -> str:
    """The float tensor whose error the probe measures for `layer`: its output, or for a MatMul
    whose corrected bias goes into its bias Add, that Add's output (the Add moves both by the bias)."""
    if bias_slot(layer) == "add":
        return next(n.output[0] for n in bench.prepared.proto.graph.node if n.name == layer.bias_add)
    return layer.output


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=recovery_graphs())
def test_every_recovery_option_is_valid_runs_and_agrees_with_its_probe(model):
    with tempfile.TemporaryDirectory() as tmp:
        bench = open_bench(workload(Path(tmp), model), Path(tmp) / "cache")
        space, rec = bench.workload.space, bench.recovery
        feed = bench.search_data.batches[0]
        ref = run(bench.prepared.proto, feed, ["y"], optimize=False)[0]
        float_out = run(bench.rewriter(bench.plan({})), feed, ["y"], optimize=False)[0]
        np.testing.assert_array_equal(ref, float_out)  # the all-float plan: the prepared graph, bit for bit
        partnered = {n for p in rec.pairs for n in (p.head, p.tail)}
        smoothable = {n for sm in rec.smoothing.values() for n in sm.group.layers}
        for layer in bench.candidates():
            options = options_for(layer, space.calibration, space.granularity, space.recovery,
                                  layer.name in partnered, layer.name in smoothable, space.weights)
            for option in options:
                event(f"{layer.op_type} recovery={option.recovery} weights={option.weights}")
                check_one(bench, layer, option, feed)


def check_one(bench, layer, option, feed) -> None:
    """One layer INT8 with `option`, every other layer float: valid, runs on int8 kernels, and (an
    option without equalization, which moves both partners) its error is the probe's."""
    plan = bench.plan({layer.name: option})
    model = bench.rewriter(plan)
    onnx.checker.check_model(model, full_check=True)
    y = run(model, feed, ["y"])[0]
    assert np.isfinite(y).all(), f"{layer.name} {option.label()}: non-finite outputs"
    if uses(option.recovery, "cle") or (detect().saturates and option.weights == "int8"):
        return  # equalization moves both partners; saturating u8s8 kernels: see the module's note
    (sqnr,), _ = proxy_sqnr(bench, [(layer, option)], bench.search_data)
    t = compared(bench, layer)
    samples = bench.search_data.batches
    sig = noise = 0.0
    for batch in samples:
        (f,) = run(bench.prepared.proto, batch, [layer.output], optimize=False)
        (a,), (q,) = run(bench.prepared.proto, batch, [t], optimize=False), run(model, batch, [observed(model, t)])
        sig += float((f.astype(np.float64) ** 2).sum())
        noise += float(((q.astype(np.float64) - a) ** 2).sum())
    probe_noise = sig / 10 ** (sqnr / 10)
    assert abs(noise - probe_noise) <= 1e-3 * sig + 0.02 * probe_noise, \
        (f"{layer.name} {option.label()}: the rewrite's error {noise:.4g}, the probe's {probe_noise:.4g} (signal "
         f"{sig:.4g}) in {[(n.name, n.op_type) for n in bench.prepared.proto.graph.node]}")


def test_optimize_runs_on_ids_plus_features_whose_matmul_add_becomes_a_gemm_with_a_2d_bias(tmp_path):
    """The reported case: int64 ids and a float feature, a MatMul + Add of a (1, N) bias that ONNX
    Runtime fuses into a Gemm with a 2-D C. Its probe once wrote a Gemm with four inputs."""
    from qsearch import optimize

    rng = np.random.default_rng(1)
    inits = {"emb": rng.normal(0, 1, (20, D)).astype(np.float32), "w": rng.normal(0, 0.4, (2 * D, D)).astype(np.float32),
             "b": rng.normal(0, 0.2, (1, D)).astype(np.float32), "w_head": rng.normal(0, 0.4, (D, CLASSES)).astype(np.float32)}
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"], name="gather"),
             helper.make_node("ReduceMean", ["e"], ["e_mean"], name="e_mean", axes=[1], keepdims=0),
             helper.make_node("Concat", ["x", "e_mean"], ["h"], name="cat", axis=1),
             helper.make_node("MatMul", ["h", "w"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w_head"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "ids_and_features", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D]),
        helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CLASSES])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    cfg = workload(tmp_path, model)
    cfg.write_text(cfg.read_text().replace("recovery: [bias, cle, smooth]", "recovery: [bias, cle, smooth], "
                                          "early_verdict: false"))
    bench = open_bench(cfg, tmp_path / "cache")
    gemm = next(la for la in bench.candidates() if la.op_type == "Gemm")  # ORT fused MatMul + Add
    assert bias_slot(gemm) == ""  # its C is (1, N): no place for a corrected bias
    r = optimize(cfg, budget=4, out=tmp_path / "out")
    assert r.status == 0 and (tmp_path / "out" / "model.qsearch.onnx").is_file()
