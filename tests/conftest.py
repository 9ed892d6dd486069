"""Small models built in the tests themselves (onnx.helper): real graphs, real ORT sessions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qsearch.engine.isa import safe_weights

DIGITS = Path(__file__).resolve().parent.parent / "qsearch" / "examples" / "digits"

# The weight encoding whose int8 kernels compute exactly what the QDQ graph says on this machine's
# int8 path: int8 on VNNI/AMX/ARM; int7 where ONNX Runtime's u8s8 kernels saturate (x86 without
# VNNI). Tests that compare int8 kernels with the QDQ reference use it and keep their tolerance;
# `test_rewrite.test_int8_kernels_saturate_only_where_the_path_says` checks the premise itself.
EXACT_WEIGHTS = safe_weights()


def make_cnn(seed: int = 0, outlier_layer: str | None = None, opset: int = 17) -> onnx.ModelProto:
    """x(N,3,8,8) -> conv_a+relu -> conv_b -> add(residual)+relu -> GAP -> flatten -> fc.

    `outlier_layer` gives that conv one output channel with a huge weight, so its output range
    (and per-tensor weight scale) is dominated by one channel: the textbook sensitive layer.
    """
    rng = np.random.default_rng(seed)
    inits = {
        "wa": rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32),
        "ba": rng.normal(0, 0.1, 8).astype(np.float32),
        "wb": rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32),
        "bb": rng.normal(0, 0.1, 8).astype(np.float32),
        "wfc": rng.normal(0, 0.3, (10, 8)).astype(np.float32),
        "bfc": rng.normal(0, 0.1, 10).astype(np.float32),
        "shape": np.array([0, -1], dtype=np.int64),
    }
    if outlier_layer == "conv_b":  # a huge channel the classifier ignores: it only costs resolution
        inits["wb"][0] *= 60.0
        inits["wfc"][:, 0] = 0.0
    if outlier_layer == "conv_a":
        inits["wa"][0] *= 60.0
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["a_relu"], name="relu_a"),
        helper.make_node("Conv", ["a_relu", "wb", "bb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["a_relu", "b"], ["s"], name="add_res"),
        helper.make_node("Relu", ["s"], ["s_relu"], name="relu_s"),
        helper.make_node("GlobalAveragePool", ["s_relu"], ["g"], name="gap"),
        helper.make_node("Reshape", ["g", "shape"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wfc", "bfc"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def write_workload(tmp: Path, model: onnx.ModelProto, n: int = 96, metric: str = "top1", max_drop="0.02",
                   extra: str = "", seed: int = 1, search: bool = True) -> Path:
    """A complete workload folder: model, npz splits labelled by the FP32 model, config. INT8 does
    not pay on models this small (Q/DQ glue outweighs the kernels), so unless `search` is False
    the search space turns the early verdict off: the search machinery is what these tests run."""
    import onnxruntime as ort

    tmp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # centre the logits so the FP32 labels use every class (random weights favour one class)
    probe = rng.normal(0, 1, (256, 3, 8, 8)).astype(np.float32)
    logits = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": probe})[0]
    for init in model.graph.initializer:
        if init.name == "bfc":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) - logits.mean(0), "bfc"))
    onnx.save(model, tmp / "model.onnx")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for split in ("calib", "search", "test"):
        x = rng.normal(0, 1, (n, 3, 8, 8)).astype(np.float32)
        y = sess.run(None, {"x": x})[0].argmax(1)
        np.savez(tmp / f"{split}.npz", x=x, label=y)
    if search and "search_space: {" in extra:
        extra = extra.replace("search_space: {", "search_space: {early_verdict: false, ", 1)
    elif search and "search_space:" not in extra:
        extra += "search_space: {extends: default, early_verdict: false}\n"
    cfg = tmp / "workload.yaml"
    cfg.write_text(
        "name: tiny\nmodel: model.onnx\ndata:\n  batch_size: 32\n"
        "  calibration: {npz: calib.npz, labels: label}\n"
        "  search: {npz: search.npz, labels: label}\n  test: {npz: test.npz, labels: label}\n"
        f"metric: {metric}\nmax_drop: {max_drop}\n" + extra
    )
    return cfg


def with_space(text: str, space: str) -> str:
    """A config's text with its `search_space:` line (the one `write_workload` writes) replaced."""
    import re

    return re.sub(r"^search_space:.*\n", "", text, flags=re.M) + f"search_space: {space}\n"


@pytest.fixture
def cnn() -> onnx.ModelProto:
    return make_cnn()


def write_chain_workload(tmp: Path, layers: int = 30, width: int = 16, spread: float = 0.8, n: int = 512,
                         max_drop: str = "0.01", seed: int = 0) -> Path:
    """A chain of `layers` orthogonal MatMuls and a prototype head: logits = x . prototypes, so
    every layer's INT8 error reaches the output unchanged and the errors of many layers add up.
    Samples are prototypes plus `spread` noise, labelled by the FP32 model; top-1 on `n` samples."""
    import onnxruntime as ort

    tmp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ws = [np.linalg.qr(rng.normal(size=(width, width)))[0].astype(np.float32) for _ in range(layers)]
    protos = rng.normal(size=(10, width)).astype(np.float32)
    head = (np.linalg.inv(np.linalg.multi_dot(ws)) @ protos.T).astype(np.float32)
    nodes, t = [], "x"
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [t, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        t = f"h{i}"
    nodes.append(helper.make_node("MatMul", [t, "head"], ["y"], name="head"))
    inits = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)] + [numpy_helper.from_array(head, "head")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp / "model.onnx")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    def gen(k):
        return (protos[rng.integers(10, size=k)] + spread * rng.normal(size=(k, width))).astype(np.float32)

    np.savez(tmp / "calib.npz", x=gen(128))
    for split in ("search", "test"):
        x = gen(n)
        np.savez(tmp / f"{split}.npz", x=x, label=sess.run(None, {"x": x})[0].argmax(1))
    cfg = tmp / "workload.yaml"
    cfg.write_text("name: chain\nmodel: model.onnx\ndata:\n  batch_size: 128\n  calibration: {npz: calib.npz}\n"
                   "  search: {npz: search.npz, labels: label}\n  test: {npz: test.npz, labels: label}\n"
                   f"metric: top1\nmax_drop: {max_drop}\n"
                   "search_space: {calibration: [minmax], granularity: [per_tensor], objective: bitops}\n")
    return cfg


@pytest.fixture
def workload(tmp_path) -> Path:
    """The small CNN's workload folder (tests that need the outlier variant define their own)."""
    return write_workload(tmp_path / "w", make_cnn())


def last_error(capsys) -> str:
    """The command's last stderr line, after checking it printed no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def open_bench(cfg: Path, cache: Path, **kw):
    """The workbench of a workload config (quiet), as every command opens it."""
    from qsearch.config import load_workload
    from qsearch.workbench import open_workbench

    return open_workbench(load_workload(cfg), cache_dir=cache, log=lambda *a: None, **kw)


def new_search(bench, profile, out: Path, **kw):
    """A study over `profile` on `bench` in the measured forms, scored by a fresh evaluator."""
    from qsearch.evaluator import Evaluator
    from qsearch.search.study import Search

    bench = bench.with_forms(profile.forms)
    return Search(bench, profile, Evaluator(bench), out, **kw).start()
