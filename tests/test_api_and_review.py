"""The Python API (the same stages and dataclasses as the CLI) and plan review: show and diff."""

import re
from dataclasses import replace

import onnx
import pytest
import yaml

import qsearch
from qsearch.cli import main
from qsearch.errors import QsearchError
from qsearch.plan.format import LayerChoice, Plan
from qsearch.plan.io import read_plan

from .conftest import last_error, make_cnn


def test_api_optimize_apply_evaluate(workload, tmp_path):
    out = tmp_path / "run"
    result = qsearch.optimize(workload, budget=4, out=out)
    assert result.status == 0 and isinstance(result.plan, Plan)
    assert result.plan == read_plan(result.plan_path) and result.report_path.is_file()
    model = qsearch.apply(result.plan, workload.parent / "model.onnx")
    assert isinstance(model, onnx.ModelProto)
    assert model.SerializeToString() == result.model_path.read_bytes()  # the API gives what optimize wrote
    ev = qsearch.evaluate(result.model_path, workload, out=tmp_path / "ev")
    assert (ev.search, ev.test) == (result.plan.metrics["plan"]["search"], result.plan.metrics["plan"]["test"])
    profile = qsearch.analyze(workload, out=out)
    assert {x.name for x in profile.layers} == set(result.plan.layers)
    from .test_reliability import check_result

    check_result(out, workload)  # re-applied byte for byte, scores reproduced, budget met


def _naive(workload, tmp_path, capsys) -> Plan:
    path = tmp_path / "naive.yaml"
    assert main(["baseline", "naive", "--config", str(workload), "--out", str(tmp_path / "o"), "-o", str(path)]) == 0
    capsys.readouterr()
    return read_plan(path)


def _rows(text: str) -> list[list[str]]:
    """The table rows `show` prints (after the header and its '--' rule)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() and set(line.replace(" ", "")) == {"-"})
    return [line.split() for line in lines[start + 1:] if line.strip()]


def test_show_lists_every_layer_in_graph_order(workload, tmp_path, capsys):
    plan = _naive(workload, tmp_path, capsys)
    assert main(["show", str(tmp_path / "naive.yaml")]) == 0
    rows = _rows(capsys.readouterr().out)
    assert [r[1] for r in rows] == list(plan.layers) == ["conv_a", "conv_b", "add_res", "gap", "fc"]
    assert all("int8" in r for r in rows)
    # a partial (schema-1 style) plan is listed in full once the model is given
    partial = replace(plan, defaults=LayerChoice("int8", "minmax", "per_tensor"), layers={"fc": LayerChoice("fp32")},
                      notes={})
    partial.write(tmp_path / "partial.yaml")
    assert main(["show", str(tmp_path / "partial.yaml"), "--model", str(workload.parent / "model.onnx")]) == 0
    rows = _rows(capsys.readouterr().out)
    assert [(r[1], "int8" in r) for r in rows] == [("conv_a", True), ("conv_b", True), ("add_res", True),
                                                   ("gap", True), ("fc", False)]
    assert "fp32" in rows[-1]


def test_diff_names_each_changed_layer(workload, tmp_path, capsys):
    plan = _naive(workload, tmp_path, capsys)
    a = str(tmp_path / "naive.yaml")
    assert main(["diff", a, a]) == 0
    assert "the same choices and ranges" in capsys.readouterr().out
    doc = yaml.safe_load((tmp_path / "naive.yaml").read_text())
    for e in doc["layers"]:
        if e["layer"] == "fc":
            e["precision"] = "fp32"
            del e["calibration"], e["granularity"], e["ranges"]
        if e["layer"] == "conv_b":
            t = next(iter(e["ranges"]))
            e["ranges"][t] = [e["ranges"][t][0], e["ranges"][t][1] * 2]
            for other in doc["layers"]:  # one tensor, one range: every layer listing it changes too
                if t in other.get("ranges", {}):
                    other["ranges"][t] = list(e["ranges"][t])
    b = tmp_path / "b.yaml"
    b.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert main(["diff", a, str(b)]) == 1
    out = capsys.readouterr().out
    assert "1 layer(s) changed option (0 to INT8, 1 to float" in out
    fc = next(line for line in out.splitlines() if line.startswith("fc "))
    assert "int8/minmax/per_tensor" in fc and "fp32" in fc
    assert any(line.startswith("conv_b ") and "(same)" in line and "->" in line for line in out.splitlines())
    d = qsearch.diff(a, b)
    assert [c.layer for c in d.layers if c.option_changed] == ["fc"] and not d.same
    other = tmp_path / "other.yaml"
    replace(plan, fingerprint="sha256:0000").write(other)
    assert main(["diff", a, str(other)]) == 2
    assert "a per-layer diff needs plans of one model" in last_error(capsys)


def test_readable_layer_names_from_exporter_metadata(tmp_path):
    """torch's dynamo exporter records each node's module path; plans show it beside the node name."""
    from qsearch.model.load import prepare
    from qsearch.plan.format import layer_notes

    m = make_cnn()
    for node in m.graph.node:
        if node.name == "conv_b":
            node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['', 'blocks', 'blocks.0.conv', 'conv2d_1']")
            node.metadata_props.add(key="pkg.torch.onnx.class_hierarchy",
                                    value="['m.Net', 'torch.nn.modules.container.Sequential', "
                                          "'torch.nn.modules.conv.Conv2d', 'aten.conv2d.default']")
        if node.name == "add_res":
            node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['', 'blocks', 'add_15']")
            node.metadata_props.add(key="pkg.torch.onnx.class_hierarchy", value="['m.Net', 'm.Block', 'aten.add.Tensor']")
    notes = layer_notes(prepare(m))
    assert notes["conv_b"].readable == "blocks.0.conv" and notes["add_res"].readable == "blocks/add_15"
    assert notes["conv_a"].readable == "Conv 1" and notes["fc"].readable == "Gemm 1"  # no metadata: op and index


@pytest.mark.parametrize("command", ["analyze", "optimize", "apply", "evaluate", "show", "diff", "profile", "baseline"])
def test_every_command_has_a_description_argument_help_and_an_example(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert f"example: qsearch {command}" in text
    usage, _, rest = text.partition("\n\n")
    description, _, options = rest.partition("\n\n")
    assert len(description.split()) >= 8  # a sentence, not a label
    # every positional and option line carries help text (argparse puts it on the same or the next line)
    lines = [line for line in options.splitlines() if line.strip() and not line.endswith(":")]
    entries = [k for k, line in enumerate(lines) if re.match(r"^  \S", line)]
    for k in entries:
        own = lines[k].strip().split("  ", 1)
        assert len(own) == 2 or (k + 1 < len(lines) and lines[k + 1].startswith(" " * 6)), lines[k]


@pytest.mark.parametrize("bad", [
    {"ranges": {"x": (-1e300, 1e300)}}, {"ranges": {"x": (2.0, 1.0)}}, {"ranges": {"x": (float("nan"), 1.0)}},
    {"ranges": {"x": (-1.0, float("inf"))}}, {"target": "npu9000"}, {"forms": {"hardswish": "melted"}},
    {"layers": {"conv_a": "int8"}}, {"percentile": 120.0},
])
def test_plans_built_in_python_are_checked_like_plans_read_from_yaml(bad):
    with pytest.raises(QsearchError, match="plan: "):
        Plan("m", "sha256:0", **bad)


def test_an_unknown_precision_is_refused_not_run_as_float():
    for kw in ({"precision": "int4"}, {"calibration": "magic"}, {"granularity": "per_row"}):
        with pytest.raises(QsearchError, match="layer choice: "):
            LayerChoice(**kw)


@pytest.mark.parametrize("value", ["0.93", [1, 2], {"a": 1}, None, True, float("nan"), float("inf"), 0, -1])
def test_show_reads_every_displayed_figure_with_suspicion(workload, tmp_path, capsys, value):
    """A hand-edited metrics block (a string, a list, NaN, a zero latency...) in every figure `show`
    displays: it prints what holds and leaves out the rest, never a traceback."""
    _naive(workload, tmp_path, capsys)
    path = tmp_path / "naive.yaml"
    doc = yaml.safe_load(path.read_text())
    good = {"metric": "top1", "plan": {"test": 0.9, "latency_ms": 1.0, "size_bytes": 50},
            "fp32": {"test": 0.95, "latency_ms": 2.0, "size_bytes": 100}}
    path.write_text(yaml.safe_dump({**doc, "metrics": good}, sort_keys=False))
    assert main(["show", str(path)]) == 0
    assert "top1: test 0.9000 (FP32 0.9500), latency 1.000 ms (2.00x FP32), size 0.50x" in capsys.readouterr().out
    for side in ("plan", "fp32"):
        for key in ("test", "latency_ms", "size_bytes"):
            edited = {**doc, "metrics": {**good, side: {**good[side], key: value}}}
            path.write_text(yaml.safe_dump(edited, sort_keys=False))
            assert main(["show", str(path)]) == 0, (side, key)
            out = capsys.readouterr().out
            assert "conv_a" in out and ("nan" not in out.lower() or "nan" in str(value).lower())
    path.write_text(yaml.safe_dump({**doc, "metrics": {"plan": "fast", "fp32": [1], "metric": {"x": 1}}}))
    assert main(["show", str(path)]) == 0 and "conv_a" in capsys.readouterr().out


def test_the_api_reads_a_plans_figures_typed(workload, tmp_path, capsys):
    _naive(workload, tmp_path, capsys)
    path = tmp_path / "naive.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["metrics"] = {"metric": "top1", "plan": {"test": "0.9", "latency_ms": float("nan"), "size_bytes": 50},
                      "fp32": {"test": 0.95, "latency_ms": 2, "size_bytes": True}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    f = read_plan(path).figures
    assert (f.metric, f.test, f.fp32_test, f.latency_ms, f.fp32_latency_ms, f.size_bytes, f.fp32_size_bytes) == \
        ("top1", None, 0.95, None, 2.0, 50.0, None)
    assert f.text() == ""  # nothing both sides hold: nothing shown
