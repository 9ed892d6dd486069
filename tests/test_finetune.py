"""`qsearch finetune`: the PyTorch mirror computes what the rewritten QDQ model computes (each
layer within one quantization step when fed the reference's inputs), the fine-tuned plan applies
byte for byte to the fine-tuned model, only initializer values change, interrupts and time limits
keep the best checkpoint, and bad input is one line with exit 2 and nothing written."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qsearch.cli import main
from qsearch.plan.build import quantized_tensors
from qsearch.plan.format import LayerChoice

from .conftest import DIGITS, EXACT_WEIGHTS, last_error, make_cnn, open_bench, write_workload

torch = pytest.importorskip("torch", reason="the train extra (torch) is not installed")
pytest.importorskip("qsearch.qat.mirror")


def branchy_cnn() -> onnx.ModelProto:
    """x -> conv1 -> hardswish (torch's form) -> conv2a | conv2b -> Concat -> MaxPool (one shared
    scale) -> conv3 -> relu -> conv4 (kept float in the tests) -> GAP -> fc."""
    rng = np.random.default_rng(3)
    inits = {"w1": rng.normal(0, 0.4, (8, 3, 3, 3)), "b1": rng.normal(0, 0.1, 8),
             "w2a": rng.normal(0, 0.3, (4, 8, 3, 3)), "b2a": rng.normal(0, 0.1, 4),
             "w2b": rng.normal(0, 0.9, (4, 8, 1, 1)), "b2b": rng.normal(0, 0.1, 4),
             "w3": rng.normal(0, 0.3, (8, 8, 3, 3)), "b3": rng.normal(0, 0.1, 8),
             "w4": rng.normal(0, 0.3, (8, 8, 3, 3)), "b4": rng.normal(0, 0.1, 8),
             "wfc": rng.normal(0, 0.3, (10, 8)), "bfc": rng.normal(0, 0.1, 10),
             "three": np.float32(3), "zero": np.float32(0), "six": np.float32(6)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c1", "three"], ["a"], name="hs_add"),
             helper.make_node("Clip", ["a", "zero", "six"], ["cl"], name="hs_clip"),
             helper.make_node("Div", ["cl", "six"], ["g"], name="hs_div"),
             helper.make_node("Mul", ["c1", "g"], ["hs"], name="hs_mul"),
             helper.make_node("Conv", ["hs", "w2a", "b2a"], ["c2a"], name="conv2a", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["hs", "w2b", "b2b"], ["c2b"], name="conv2b"),
             helper.make_node("Concat", ["c2a", "c2b"], ["cat"], name="concat", axis=1),
             helper.make_node("MaxPool", ["cat"], ["mp"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["mp", "w3", "b3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
             helper.make_node("Conv", ["r3", "w4", "b4"], ["c4"], name="conv4", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c4"], ["g4"], name="gap"),
             helper.make_node("Flatten", ["g4"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wfc", "bfc"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "branchy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def reference_session(model: onnx.ModelProto, tensors: list[str]) -> tuple[ort.InferenceSession, dict[str, str]]:
    """The QDQ model run as written (no fusion into int8 kernels): the rewriter's numerics, every
    fake-quantized tensor an output. Returns the session and tensor -> a DequantizeLinear output
    holding it."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    dq_of = {n.input[0]: n.output[0] for n in m.graph.node if n.op_type == "DequantizeLinear"}
    produced = {t for n in m.graph.node for t in n.output}
    # a graph input's DQ writes a new name; a float Conv reads its own copy of a DQ (the same values)
    names = {t: t if t in produced else dq_of[f"{t}_quantized"] for t in tensors}
    for t in names.values():
        m.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]), names


def assert_mirror_matches(bench, plan) -> None:
    """Each fake quantizer, fed the reference's own inputs (its upstream layers forced to the
    reference's values), is within one quantization step of the reference's DequantizeLinear;
    the output then matches to float rounding."""
    from qsearch.qat import mirror

    m = mirror.build(bench.rewriter.training_graph(plan), bench.prepared, learn_ranges=False)
    assert m.quantizers, "the plan quantizes activations"
    names = list(m.quantizers)
    sess, ort_name = reference_session(bench.rewriter(plan), names)
    feeds = {k: v for k, v in bench.search_data.batches[0].items() if k in m.inputs}
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    steps = {}

    def force(module, _inputs, output):
        ref = got[ort_name[module.tensor]]
        steps[module.tensor] = float(np.abs(output.detach().numpy() - ref).max() / float(module.scale))
        return torch.from_numpy(ref)

    for q in m.quantizers.values():
        q.register_forward_hook(force)
    with torch.no_grad():
        out = m({k: torch.from_numpy(v) for k, v in feeds.items()})
    assert set(steps) == set(names)
    assert max(steps.values()) <= 1.0 + 1e-3, {t: s for t, s in steps.items() if s > 1.0 + 1e-3}
    ref_out = got[bench.prepared.outputs[0]]
    assert np.abs(out[0].numpy() - ref_out).max() <= 1e-3 * max(1.0, float(np.abs(ref_out).max()))


@pytest.mark.parametrize("form", ["fused", "decomposed"])
def test_mirror_matches_the_qdq_model_on_a_tiny_graph(form, tmp_path):
    cfg = write_workload(tmp_path / "w", branchy_cnn(), n=64)
    bench = open_bench(cfg, tmp_path / "cache")
    choices = {la.name: LayerChoice("int8", "minmax", "per_channel", weights=EXACT_WEIGHTS)
               for la in bench.candidates() if la.name != "conv4"}
    plan = bench.plan(choices, forms={"hardswish": form})
    assert plan.choice("conv4").precision == "fp32" and plan.choice("gap").quantized  # a float layer between INT8 ones
    _, groups = quantized_tensors(bench.prepared, {n for n, c in plan.layers.items() if c.quantized}, plan.forms)
    assert {"cat", "mp"} in groups  # the MaxPool runs on uint8: its sides share one scale
    assert_mirror_matches(bench, plan)


def test_mirror_matches_the_qdq_model_on_the_default_cnn(tmp_path):
    bench = open_bench(DIGITS / "workload.yaml", tmp_path / "cache")
    for granularity in ("per_tensor", "per_channel"):
        assert_mirror_matches(bench, bench.uniform_plan("minmax", granularity))


def test_shared_scales_stay_shared_when_ranges_learn(tmp_path):
    from qsearch.qat import mirror

    cfg = write_workload(tmp_path / "w", branchy_cnn(), n=64)
    bench = open_bench(cfg, tmp_path / "cache")
    plan = bench.uniform_plan("minmax", "per_channel")
    m = mirror.build(bench.rewriter.training_graph(plan), bench.prepared, learn_ranges=True)
    assert m.quantizers["cat"].bounds is m.quantizers["mp"].bounds
    assert m.quantizers["c2a"].bounds is not m.quantizers["c2b"].bounds


def naive_plan(tmp_path, model=None):
    cfg = write_workload(tmp_path / "w", model or make_cnn(outlier_layer="conv_b"), n=64)
    plan = tmp_path / "naive.yaml"
    assert main(["baseline", "naive", "--config", str(cfg), "-o", str(plan), "--cache", str(tmp_path / "c")]) == 0
    return cfg, plan


def test_finetune_end_to_end_applies_byte_for_byte_and_changes_only_initializer_values(tmp_path):
    cfg, plan = naive_plan(tmp_path)
    out = tmp_path / "qat"
    assert main(["finetune", "--config", str(cfg), "--plan", str(plan), "--out", str(out), "--epochs", "3",
                 "--lr", "1e-3"]) == 0
    for f in ("plan.yaml", "model.finetuned.onnx", "model.qsearch.onnx", "report.md", "finetune.png", "finetune.yaml"):
        assert (out / f).is_file(), f
    assert main(["apply", str(out / "plan.yaml"), str(out / "model.finetuned.onnx"), "-o", str(tmp_path / "again.onnx")]) == 0
    assert (tmp_path / "again.onnx").read_bytes() == (out / "model.qsearch.onnx").read_bytes()
    bench = open_bench(cfg, tmp_path / "c")
    before, after = bench.prepared.proto.graph, onnx.load(out / "model.finetuned.onnx").graph
    assert [n.SerializeToString() for n in before.node] == [n.SerializeToString() for n in after.node]
    assert [(i.name, i.data_type, tuple(i.dims)) for i in before.initializer] == \
        [(i.name, i.data_type, tuple(i.dims)) for i in after.initializer]
    changed = {a.name for a, b in zip(before.initializer, after.initializer)
               if not np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))}
    trainable = {t for la in bench.prepared.layers for t in (la.weight, la.bias) if t}
    assert changed and changed <= trainable
    text = (out / "plan.yaml").read_text()
    assert "finetuned_from" in text and "finetune" in text
    report = (out / "report.md").read_text()
    assert "| PTQ (the plan as given) |" in report and "| QAT (fine-tuned, same layers INT8) |" in report


def write_loss(tmp_path, monkeypatch, body: str) -> str:
    (tmp_path / "my_loss.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_loss", None)
    return "my_loss:loss"


def test_an_interrupt_keeps_the_best_checkpoint(tmp_path, monkeypatch):
    cfg, plan = naive_plan(tmp_path)
    loss = write_loss(tmp_path, monkeypatch, """
        import torch
        calls = [0]
        def loss(student, teacher):
            calls[0] += 1
            if calls[0] > 8:  # the initial loss (2 batches), then a few training steps
                raise KeyboardInterrupt
            return sum(torch.mean((s - t) ** 2) for s, t in zip(student, teacher))
    """)
    out = tmp_path / "qat"
    assert main(["finetune", "--config", str(cfg), "--plan", str(plan), "--out", str(out), "--epochs", "5",
                 "--loss", loss]) == 130
    assert main(["apply", str(out / "plan.yaml"), str(out / "model.finetuned.onnx"), "-o", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").read_bytes() == (out / "model.qsearch.onnx").read_bytes()


def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    cfg, plan = naive_plan(tmp_path)
    loss = write_loss(tmp_path, monkeypatch, """
        import torch
        calls = [0]
        def loss(student, teacher):
            calls[0] += 1
            base = sum(torch.mean((s - t) ** 2) for s, t in zip(student, teacher))
            return base * float("nan") if calls[0] > 4 else base
    """)
    out = tmp_path / "qat"
    assert main(["finetune", "--config", str(cfg), "--plan", str(plan), "--out", str(out), "--epochs", "5",
                 "--loss", loss]) == 0
    assert "NaN" in capsys.readouterr().err
    assert "stopped: nan loss" in (out / "report.md").read_text()


def test_timeout_exits_124_with_the_best_checkpoint(tmp_path, monkeypatch):
    cfg, plan = naive_plan(tmp_path)
    loss = write_loss(tmp_path, monkeypatch, """
        import time, torch
        def loss(student, teacher):
            time.sleep(0.3)
            return sum(torch.mean((s - t) ** 2) for s, t in zip(student, teacher))
    """)
    out = tmp_path / "qat"
    assert main(["finetune", "--config", str(cfg), "--plan", str(plan), "--out", str(out), "--epochs", "50",
                 "--loss", loss, "--timeout", "4"]) == 124
    assert (out / "plan.yaml").is_file() and (out / "report.md").is_file()


def unmirrorable_cnn() -> onnx.ModelProto:
    """make_cnn with a ThresholdedRelu (no onnx2torch converter) after conv_a's Relu."""
    m = make_cnn()
    nodes = list(m.graph.node)
    for n in nodes:
        if n.name == "conv_b" or n.name == "add_res":
            n.input[0] = "a_thr"
    nodes.insert(2, helper.make_node("ThresholdedRelu", ["a_relu"], ["a_thr"], name="thr", alpha=0.0))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


@pytest.mark.parametrize("case", ["epochs", "lr", "other_model", "loss_raises", "loss_not_scalar", "unmirrorable",
                                  "missing_extra"])
def test_bad_input_is_one_line_exit_2_nothing_written(case, tmp_path, monkeypatch, capsys):
    cfg, plan = naive_plan(tmp_path, unmirrorable_cnn() if case == "unmirrorable" else None)
    args = ["finetune", "--config", str(cfg), "--plan", str(plan), "--out", str(tmp_path / "qat"), "--epochs", "2"]
    want = {"epochs": "--epochs", "lr": "--lr", "other_model": "plan is for model", "loss_raises": "raised",
            "loss_not_scalar": "not a scalar", "unmirrorable": "ThresholdedRelu", "missing_extra": "qsearch[train]"}[case]
    if case == "epochs":
        args[-1] = "0"
    elif case == "lr":
        args += ["--lr", "nan"]
    elif case == "other_model":
        other = write_workload(tmp_path / "other", make_cnn(seed=5), n=64)
        args[2] = str(other)
    elif case.startswith("loss"):
        body = "def loss(s, t):\n    raise ValueError('boom')\n" if case == "loss_raises" else \
            "def loss(s, t):\n    return s[0]\n"
        args += ["--loss", write_loss(tmp_path, monkeypatch, body)]
    elif case == "missing_extra":
        monkeypatch.setitem(sys.modules, "onnx2torch", None)
    assert main(args) == 2
    err = last_error(capsys)
    assert want in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    if case == "unmirrorable":
        assert "'thr'" in err
    assert not any((tmp_path / "qat" / f).exists() for f in ("plan.yaml", "model.finetuned.onnx", "model.qsearch.onnx"))


def test_optimize_names_the_fastest_plan_that_missed_the_budget_beyond_the_noise(tmp_path):
    """Planted trials: the line names the fastest missed plan only when its gap beats the noise."""
    from qsearch.report.markdown import Row
    from qsearch.result import qat_hint
    from qsearch.search.trials import TrialResult

    bench = open_bench(write_workload(tmp_path / "w", make_cnn(), n=64), tmp_path / "c")

    def trial(n, drop, ms):
        return TrialResult(n, {}, 0.9 - drop, drop, ms, ms, 1000, 1.0, drop <= 0.01)

    shipped = Row("qsearch", 0.9, 0.9, 10.0, 1000, 5, latency_spread=0.08)
    pareto = [trial(1, 0.002, 10.0), trial(2, 0.03, 8.0), trial(3, 0.05, 6.0), trial(4, 0.004, 9.5)]
    line = qat_hint(bench, pareto, 0.01, shipped, tmp_path / "run")
    assert "trial 3's plan" in line and "1.67x" in line and "plan-trial0003.yaml" in line
    assert line.count("qsearch finetune --config") == 1 and str(tmp_path / "run" / "qat") in line
    assert "trial 2's plan" in qat_hint(bench, pareto[:2], 0.01, shipped, tmp_path / "run")  # 20% faster, ±8%
    noisy = Row("qsearch", 0.9, 0.9, 10.0, 1000, 5, latency_spread=0.25)
    assert qat_hint(bench, pareto[:2], 0.01, noisy, tmp_path / "run") == ""  # 20% faster is within ±25%
    assert "trial 3's plan" in qat_hint(bench, pareto[:3], 0.01, noisy, tmp_path / "run")  # 40% is not
    assert qat_hint(bench, [pareto[0], pareto[3]], 0.01, shipped, tmp_path / "run") == ""  # none missed the budget


def test_a_diverging_rate_steps_back_to_the_best_checkpoint(tmp_path, capsys):
    """A learning rate far too high (1.0) makes the loss explode: training goes back to the best
    checkpoint at a tenth of the rate (twice at most), says so, and what it writes is still the best."""
    cfg, plan = naive_plan(tmp_path)
    out = tmp_path / "qat"
    assert main(["finetune", "--config", str(cfg), "--plan", str(plan), "--out", str(out), "--epochs", "6",
                 "--lr", "1.0"]) == 0
    err = capsys.readouterr().err
    assert "learning rate x0.1" in err and err.count("back to epoch") <= 2
    import yaml

    summary = yaml.safe_load((out / "finetune.yaml").read_text())
    best = summary["qat"]["epoch"]
    assert summary["qat"]["search"] == max(e["search"] for e in summary["epochs"])
    assert [e["search"] for e in summary["epochs"] if e["epoch"] == best] == [summary["qat"]["search"]]
