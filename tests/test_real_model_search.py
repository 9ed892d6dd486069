"""What real pretrained models broke: compounding error below the metric's resolution, INT8 that
does not pay, nondeterministic metrics. Small models built here, real sessions and studies."""

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from qsearch.analysis.sensitivity import analyze
from qsearch.cli import main
from qsearch.evaluator import Evaluator
from qsearch.plan.format import LayerChoice
from qsearch.plan.io import plan_from_doc, read_plan

from .conftest import make_cnn, new_search, open_bench, write_chain_workload, write_workload


def test_compounding_error_below_resolution_still_meets_budget(tmp_path):
    """30 layers that each cost at most the budget alone, but together break it: the fixed set
    is measured together, and the search (with repair) still returns a plan within budget."""
    ctx = open_bench(write_chain_workload(tmp_path / "w", max_drop="0.005"), tmp_path / "cache")
    allowed, ev = ctx.allowed_drop(), Evaluator(ctx)
    codes = ctx.workload.space.weights[0]  # the encoding exact on this CPU's int8 path, as the search uses
    single = [ev.evaluate(ctx.plan({n: LayerChoice("int8", "minmax", "per_tensor", weights=codes)}), timing=False).drop
              for n in ctx.prepared.layer_names]
    all_int8 = ev.evaluate(ctx.uniform_plan("minmax", "per_tensor"), timing=False).drop
    # each layer alone: within budget (one or two of 512 samples flip); all together: over budget
    assert len(single) == 31 and max(single) <= 2 / 512 < allowed < all_int8
    profile = analyze(ctx, cache_dir=tmp_path / "cache")
    assert profile.meta["evaluations"] <= len(single) + 2  # one screen per layer + one proxy pass
    search = new_search(ctx, profile, tmp_path / "out")
    d = search.decision
    assert d.all_int8_drop > allowed
    assert d.joint_drop is None or d.joint_drop <= ctx.workload.space.fix_below * allowed + 1e-12
    search.run(10)
    search.repair()
    best = search.best()
    assert best is not None and best.drop <= allowed
    assert sum(LayerChoice.parse(c).quantized for c in best.choices.values()) > 0  # not just FP32


def test_plan_is_never_slower_than_fp32_where_int8_does_not_pay(tmp_path, capsys):
    """On a tiny CNN, Q/DQ glue costs more than the int8 kernels save: the profile says so per
    layer, and whatever optimize ships is not slower than FP32 in its own measurement."""
    cfg = write_workload(tmp_path / "w", make_cnn(), n=96, max_drop="0.05",
                         extra="search_space: {calibration: [minmax], granularity: [per_tensor]}\n")
    out = tmp_path / "out"
    assert main(["optimize", "--config", str(cfg), "--out", str(out), "--budget", "6"]) == 0
    prof = yaml.safe_load((out / "sensitivity.yaml").read_text())
    assert any(x["fp32_ms"] - x["int8_ms"] < 0 for x in prof["layers"])  # measured, not assumed
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    m = plan["metrics"]
    assert m["plan"]["latency_ms"] <= m["fp32"]["latency_ms"]
    report = (out / "report.md").read_text()
    assert "Where the time goes" in report and "Q/DQ glue" in report
    if m["plan"]["latency_ms"] == m["fp32"]["latency_ms"]:  # FP32 shipped: said plainly
        assert "No INT8 plan within budget beats FP32" in report


def test_nondeterministic_metric_is_refused_before_analysis(tmp_path, capsys):
    w = tmp_path / "w"
    cfg = write_workload(w, make_cnn(), n=64)
    (w / "noisy_metric.py").write_text("import random\n\ndef score(session):\n    return random.random()\n")
    cfg.write_text(cfg.read_text().replace("metric: top1", "metric: {search: 'noisy_metric:score', test: 'noisy_metric:score'}"))
    assert main(["optimize", "--config", str(cfg), "--out", str(tmp_path / "o"), "--budget", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and "noisy_metric:score" in err[-1] and "not deterministic" in err[-1]


def test_study_is_bound_to_the_config_and_odd_out_paths_work(tmp_path):
    cfg = write_workload(tmp_path / "w", make_cnn(), n=64, max_drop="0.05",
                         extra="search_space: {calibration: [minmax], granularity: [per_tensor], objective: bitops}\n")
    out = tmp_path / "odd?#%out"
    ctx = open_bench(cfg, out / "cache")
    profile = analyze(ctx, cache_dir=out / "cache")
    s1 = new_search(ctx, profile, out)
    s1.run(3)
    assert (out / "study.db").is_file() and not any(p.name.startswith("odd") and p.is_file() for p in tmp_path.iterdir())
    # another budget is another study: the old trials are not reused
    cfg.write_text(cfg.read_text().replace("max_drop: 0.05", "max_drop: 0.01"))
    ctx2 = open_bench(cfg, out / "cache")
    s2 = new_search(ctx2, analyze(ctx2, cache_dir=out / "cache"), out)
    assert s2.study_name != s1.study_name and len(s2.study.trials) == 0
    # the same config resumes the same study, with the fixed set read back instead of re-measured
    s3 = new_search(open_bench(cfg, out / "cache"), profile, out)
    assert s3.study_name == s2.study_name and s3.evaluator.evaluations == 0
    assert np.isfinite(s1.best().cost)


def _hardswish_cnn() -> onnx.ModelProto:
    """conv -> HardSwish -> conv -> x * Clip(x + 3, 0, 6) / 6 -> GAP -> fc: both spellings of hardswish."""
    rng = np.random.default_rng(3)
    inits = {"wa": rng.normal(0, 0.3, (8, 3, 3, 3)), "ba": rng.normal(0, 0.1, 8), "wb": rng.normal(0, 0.3, (8, 8, 3, 3)),
             "bb": rng.normal(0, 0.1, 8), "wfc": rng.normal(0, 0.3, (10, 8)), "bfc": rng.normal(0, 0.1, 10),
             "three": 3.0, "zero": 0.0, "six": 6.0}
    inits = {k: np.asarray(v, np.float32) for k, v in inits.items()}
    inits["shape"] = np.array([0, -1], np.int64)
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("HardSwish", ["a"], ["ah"], name="hswish_a"),
             helper.make_node("Conv", ["ah", "wb", "bb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["b", "three"], ["b3"], name="add3"),
             helper.make_node("Clip", ["b3", "zero", "six"], ["b6"], name="relu6"),
             helper.make_node("Div", ["b6", "six"], ["bg"], name="div6"),
             helper.make_node("Mul", ["b", "bg"], ["bh"], name="hswish_b"),
             helper.make_node("GlobalAveragePool", ["bh"], ["g"], name="gap"),
             helper.make_node("Reshape", ["g", "shape"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wfc", "bfc"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "hswish", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_hardswish_form_is_measured_recorded_and_reproduced(tmp_path):
    """The analysis times the all-INT8 model with hardswish decomposed and fused and keeps the
    faster (a tie goes to fused); plans carry the form, and a plan read back rebuilds the same model."""
    from qsearch.analysis.sensitivity import FORM_TIE
    from qsearch.model.load import PATTERN_FORMS

    cfg = write_workload(tmp_path / "w", _hardswish_cnn(), n=64, max_drop="0.05")
    ctx = open_bench(cfg, tmp_path / "cache")
    assert [(la.name, la.gate) for la in ctx.prepared.layers if la.pattern] == \
        [(la.name, la.gate) for la in ctx.prepared.layers if la.op_type == "Mul"]
    assert len([la for la in ctx.prepared.layers if la.pattern == "hardswish"]) == 2
    assert ctx.prepared.absorbed({"hardswish": "fused"}) == {"add3": "hswish_b"}  # the +3 is a layer of the gate
    profile = analyze(ctx, cache_dir=tmp_path / "cache")
    ms = profile.meta["form_ms"]["hardswish"]
    chosen = profile.forms["hardswish"]
    assert set(ms) == set(PATTERN_FORMS["hardswish"]) and ctx.with_forms(profile.forms).forms == profile.forms
    assert ms[chosen] <= min(ms.values()) * (1 + FORM_TIE)
    assert chosen == "fused" or ms["fused"] > ms["decomposed"] * (1 + FORM_TIE)
    choices = {n: LayerChoice("int8", "minmax", "per_tensor") for n in ctx.prepared.layer_names}
    for form in PATTERN_FORMS["hardswish"]:
        plan = ctx.plan(choices, {"hardswish": form})
        again = plan_from_doc(yaml.safe_load(plan.to_yaml()))
        assert again.forms == {"hardswish": form}
        model = ctx.rewriter(plan)
        assert ctx.rewriter(again).SerializeToString() == model.SerializeToString()
        ops = [n.op_type for n in model.graph.node]
        assert (ops.count("HardSwish") == 2) == (form == "fused")
        assert ("HardSigmoid" in ops) == ("Clip" in ops) == (form == "decomposed")
        # fused: the gate's tensors need no range, and its +3 layer follows the hardswish
        assert ("b6" in plan.ranges) == (form == "decomposed") and plan.choice("add3") == plan.choice("hswish_b")
    assert "add3" not in [la.name for la in ctx.with_forms({"hardswish": "fused"}).candidates()]  # not searched: it follows its hardswish
    from qsearch.report.markdown import forms_line
    from qsearch.report.review import diff, show_text

    dec, fused = (ctx.plan(choices, {"hardswish": f}) for f in ("decomposed", "fused"))
    d = diff(dec, fused)
    assert ("forms.hardswish", "decomposed", "fused") in d.header
    assert [c.layer for c in d.layers if c.option_changed] == []  # same choices; the gate's ranges differ
    assert "forms (measured, inside int8 regions): hardswish fused" in show_text(fused)

    assert forms_line(profile).startswith(f"Forms inside int8 regions, measured: hardswish {chosen} (all-INT8 model: ")
    # the proxy probes a fused pattern as it runs: one HardSwish on quantized x, its output quantized
    import onnxruntime as ort

    from qsearch.calibration import tensor_range
    from qsearch.qparams import activation_qparams

    layer = ctx.prepared.layer("hswish_b")
    ranges = {t: tensor_range(ctx.stats.tensors[t], "minmax", 99.99) for t in ("b", "bh")}
    probe, [(sig, noise)] = ctx.rewriter.probe([(layer, LayerChoice("int8", "minmax", "per_tensor"))], ranges,
                                               {"hardswish": "fused"})
    feed = {"x": ctx.search_data.batches[0]["x"]}
    got_sig, got_noise = ort.InferenceSession(probe.SerializeToString()).run([sig, noise], feed)
    m = onnx.ModelProto.FromString(ctx.prepared.proto.SerializeToString())
    m.graph.output.extend([helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in ("b", "bh")])
    b, bh = ort.InferenceSession(m.SerializeToString()).run(["b", "bh"], feed)

    def fq(v, t):
        scale, zp = activation_qparams(*ranges[t])
        return (np.clip(np.round(v / scale) + int(zp), 0, 255) - int(zp)) * scale

    xq = fq(b, "b")
    twin = fq(xq * np.clip(xq / 6 + 0.5, 0, 1), "bh")
    assert got_sig == pytest.approx(np.sum(bh.astype(np.float64) ** 2), rel=1e-4)
    assert got_noise == pytest.approx(np.sum((twin - bh).astype(np.float64) ** 2), rel=1e-2)
    # the naive baseline command measures the forms too, and records them
    naive = tmp_path / "naive.yaml"
    assert main(["baseline", "naive", "--config", str(cfg), "--out", str(tmp_path / "b"), "-o", str(naive)]) == 0
    assert read_plan(naive).forms.get("hardswish") in PATTERN_FORMS["hardswish"]
    # a plan from before forms existed (no `forms` key) keeps its decomposed layout
    old = yaml.safe_load(ctx.plan(choices, {"hardswish": "decomposed"}).to_yaml())
    old.pop("forms")
    assert ctx.rewriter(plan_from_doc(old)).SerializeToString() == \
        ctx.rewriter(ctx.plan(choices, {"hardswish": "decomposed"})).SerializeToString()
