"""OpenVINO as the engine (`runtime: {engine: openvino}`): the same QDQ model scored and timed on
OpenVINO's CPU plugin, its per-node profile attributed to layers, the plan and its model bound to
the engine, and the bad input around it (unknown engine, engine not installed, a plan naming an
engine that is not installed) one line with exit 2."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from qsearch.cli import main
from qsearch.plan.format import LayerChoice
from qsearch.plan.io import read_plan

from .conftest import EXACT_WEIGHTS, last_error, make_cnn, open_bench, write_workload

pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install \"qsearch[openvino]\")")


def ov_workload(tmp_path, extra: str = "runtime: {engine: openvino}\n"):
    return write_workload(tmp_path / "w", make_cnn(outlier_layer="conv_b"), n=64, extra=extra)


def test_the_session_has_onnx_runtimes_surface_and_its_numbers(tmp_path):
    from qsearch.engine import create

    bench = open_bench(ov_workload(tmp_path), tmp_path / "c")
    assert bench.engine.name == "openvino"
    ov, ort = bench.engine.session(bench.prepared.proto), create("onnxruntime").session(bench.prepared.proto)
    assert [(a.name, a.type) for a in ov.get_inputs()] == [(a.name, a.type) for a in ort.get_inputs()]
    assert [a.name for a in ov.get_outputs()] == [a.name for a in ort.get_outputs()]
    feed = dict(bench.search_data.batches[0])
    np.testing.assert_allclose(ov.run(None, feed)[0], ort.run(None, feed)[0], rtol=1e-4, atol=1e-4)
    assert bench.engine.time(ov, bench.latency_feed, warmup=1, repeat=3).wall_ms > 0


def test_its_profile_says_which_layers_ran_int8(tmp_path):
    from qsearch.analysis import profiling

    bench = open_bench(ov_workload(tmp_path), tmp_path / "c")
    plan = bench.plan({"conv_a": LayerChoice("int8", weights=EXACT_WEIGHTS),
                       "conv_b": LayerChoice("int8", weights=EXACT_WEIGHTS)})
    model = bench.rewriter(plan)
    prof = profiling.profile(bench.prepared, model, bench.latency_feed, bench.engine, runs=3)
    int8 = {layer for layer, kinds in prof.by_layer.items() if kinds.get("int8 kernel", 0) > 0}
    assert {"conv_a", "conv_b"} <= int8 and "fc" not in int8
    fp32 = profiling.profile(bench.prepared, bench.prepared.proto, bench.latency_feed, bench.engine, runs=3)
    assert fp32.by_kind["int8 kernel"] == 0 and fp32.layer_ms("conv_a") > 0
    ran = bench.engine.int8_nodes(model)
    assert any(n.startswith("conv_a") for n in ran) and not any(n.startswith("fc") for n in ran)
    from qsearch.scoring import fusion_check

    assert fusion_check(model, bench.engine).int8_kernels >= 2  # the report's fusion check is the engine's
    assert fusion_check(bench.prepared.proto, bench.engine).int8_kernels == 0


def test_optimize_on_openvino_binds_the_plan_and_its_model_to_the_engine(tmp_path, capsys):
    cfg = ov_workload(tmp_path)
    out = tmp_path / "run"
    assert main(["optimize", "--config", str(cfg), "--budget", "3", "--out", str(out)]) == 0
    plan = read_plan(out / "plan.yaml")
    assert plan.provenance["engine"] == "openvino"
    props = {p.key: p.value for p in onnx.load(out / "model.qsearch.onnx").metadata_props}
    assert props["qsearch.engine"] == "openvino"
    assert main(["evaluate", str(out / "model.qsearch.onnx"), "--config", str(cfg), "--cache", str(out)]) == 0
    plain = write_workload(tmp_path / "plain", make_cnn(outlier_layer="conv_b"), n=64)
    capsys.readouterr()
    assert main(["evaluate", str(out / "model.qsearch.onnx"), "--config", str(plain), "--cache", str(tmp_path / "c2")]) == 0
    assert "searched on openvino" in capsys.readouterr().err  # scored elsewhere: said


@pytest.mark.parametrize("case", ["unknown", "not_installed", "plan_engine_missing"])
def test_engine_bad_input_is_one_line_exit_2(case, tmp_path, monkeypatch, capsys):
    from qsearch import engine as engines

    if case == "plan_engine_missing":
        cfg = ov_workload(tmp_path)
        out = tmp_path / "run"
        assert main(["baseline", "naive", "--config", str(cfg), "-o", str(tmp_path / "p.yaml"), "--cache", str(out)]) == 0
        monkeypatch.setattr(engines, "installed", lambda name: name != "openvino")
        args = ["apply", str(tmp_path / "p.yaml"), str(tmp_path / "w" / "model.onnx"), "-o", str(tmp_path / "m.onnx")]
        want = "qsearch[openvino]"
    else:
        extra = {"unknown": "runtime: {engine: tensorrt}\n", "not_installed": "runtime: {engine: openvino}\n"}[case]
        if case == "not_installed":
            monkeypatch.setattr(engines, "installed", lambda name: name != "openvino")
        cfg = ov_workload(tmp_path, extra)
        args = ["optimize", "--config", str(cfg), "--budget", "2", "--out", str(tmp_path / "run")]
        want = {"unknown": "runtime.engine 'tensorrt' is not one of", "not_installed": "qsearch[openvino]"}[case]
    assert main(args) == 2
    err = last_error(capsys)
    assert want in err, err
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "run" / "plan.yaml").exists()


def test_with_a_latency_hook_openvino_scores_and_the_hook_times(tmp_path, monkeypatch):
    from qsearch.engine.openvino import OvSession

    (tmp_path / "my_hook.py").write_text("def measure(model_path, feeds_path):\n    return 0.002\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    bench = open_bench(ov_workload(tmp_path, "runtime: {engine: openvino, latency: 'my_hook:measure'}\n"),
                       tmp_path / "c")
    assert bench.engine.name == "hook" and bench.engine.scoring.name == "openvino"
    session = bench.engine.session(bench.prepared.proto)
    feed = dict(bench.search_data.batches[0])
    direct = OvSession(bench.engine.scoring.session(bench.prepared.proto).compiled)
    np.testing.assert_array_equal(session.run(None, feed)[0], direct.run(None, feed)[0])
    assert bench.engine.time(session, bench.latency_feed).wall_ms == pytest.approx(2.0)
