"""Plans, workload configs and the command line, as users run them (real subprocess-free CLI calls)."""

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml

from qsearch.cli import main
from qsearch.plan.format import LayerChoice, Plan
from qsearch.plan.io import plan_from_doc, read_plan

from .conftest import last_error, make_cnn, with_space, write_workload
from .test_reliability import check_result


@pytest.fixture
def workload(tmp_path):
    return write_workload(tmp_path / "w", make_cnn(outlier_layer="conv_b"))


GOLDEN_PLAN = """\
qsearch_plan: 3
model:
  name: m
  fingerprint: sha256:abc
  file: m.onnx
  preparation: 2
target: cpu
summary:
  layers: 3
  int8: 2
  float: 1
calibration:
  percentile: 99.99
layers:
- layer: node_conv
  name: stem.conv
  op: Conv
  precision: int8
  calibration: entropy
  granularity: per_channel
  ranges:
    x: [-1.0, 2.5]
    c: [0.0, 3.0]
  why: sensitivity rank 3/3
- layer: node_add
  name: Add 1
  op: Add
  precision: int8
  calibration: minmax
  ranges:
    c: [0.0, 3.0]
    s: [-0.5, 4.0]
- layer: node_fc
  name: fc
  op: Gemm
  precision: fp32
  why: sensitivity rank 1/3
shared_ranges:
  p: [0.0, 3.0]
metrics:
  x: 0.5
provenance:
  qsearch: 0.1.0
  study: s1
"""


def _golden_plan() -> Plan:
    from qsearch.plan.format import LayerNote

    return Plan("m", "sha256:abc", model_file="m.onnx",
                layers={"node_conv": LayerChoice("int8", "entropy", "per_channel"),
                        "node_add": LayerChoice("int8", "minmax", "per_tensor"), "node_fc": LayerChoice("fp32")},
                ranges={"x": (-1.0, 2.5), "c": (0.0, 3.0), "s": (-0.5, 4.0), "p": (0.0, 3.0)},
                notes={"node_conv": LayerNote("Conv", "stem.conv", "sensitivity rank 3/3", True, ("x", "c")),
                       "node_add": LayerNote("Add", "Add 1", "", False, ("c", "s")),
                       "node_fc": LayerNote("Gemm", "fc", "sensitivity rank 1/3", True, ("f", "y"))},
                metrics={"x": np.float32(0.5)}, provenance={"study": "s1"})


def test_plan_yaml_golden_and_exact_roundtrip(tmp_path):
    """Every layer in graph order with op, readable name, choice, its ranges and why; weightless
    layers carry no granularity; tensors of no int8 layer under shared_ranges; byte-exact round trip."""
    text = _golden_plan().to_yaml()
    assert text == GOLDEN_PLAN
    path = tmp_path / "p.yaml"
    path.write_text(text)
    again = read_plan(path)
    assert again.to_yaml() == text
    assert list(again.layers) == ["node_conv", "node_add", "node_fc"]  # graph order kept, not re-sorted
    assert again.choice("node_conv").calibration == "entropy" and again.choice("not_listed") == LayerChoice("fp32")
    assert again.ranges == _golden_plan().ranges


def test_plan_with_two_ranges_for_one_tensor_is_refused(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(GOLDEN_PLAN.replace("    c: [0.0, 3.0]\n    s:", "    c: [0.0, 9.0]\n    s:"))
    with pytest.raises(Exception, match=r"tensor 'c' has range \[0.0, 9.0\] here but \[0.0, 3.0\] in layer 'node_conv'"):
        read_plan(path)


def test_schema1_plan_still_applies_to_the_same_model(workload, tmp_path):
    """A plan written by qsearch's first schema (overrides of `defaults`, one flat range table)
    loads, migrates, and applies to exactly the model its schema-2 form gives."""
    new = tmp_path / "naive.yaml"
    assert main(["baseline", "naive", "--config", str(workload), "--out", str(tmp_path / "o"), "-o", str(new)]) == 0
    plan = read_plan(new)
    old = {"qsearch_plan": 1, "model": {"name": plan.model_name, "fingerprint": plan.fingerprint}, "target": "cpu",
           "defaults": {"precision": "int8", "calibration": "minmax", "granularity": "per_tensor"},
           "layers": {"fc": {"precision": "fp32"}}, "calibration": {"percentile": 99.99},
           "activation_ranges": {t: list(r) for t, r in plan.ranges.items()},
           "metrics": {}, "provenance": {"qsearch": "0.1.0", "storage": "sqlite:////home/someone/study.db",
                          "int8_path": plan.provenance["int8_path"]}}  # models carry the path (metadata)
    (tmp_path / "v1.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    v1 = read_plan(tmp_path / "v1.yaml")
    assert v1.choice("conv_a") == LayerChoice("int8", "minmax", "per_tensor") and v1.choice("fc").precision == "fp32"
    model = str(workload.parent / "model.onnx")
    assert main(["apply", str(tmp_path / "v1.yaml"), model, "-o", str(tmp_path / "v1.onnx")]) == 0
    v2 = tmp_path / "v2.yaml"
    from dataclasses import replace

    # schema 1 knew only int8-coded weights (the naive plan may use 7-bit ones on this CPU's int8 path)
    int8_coded = {n: replace(c, weights="int8") if c.quantized else c for n, c in plan.layers.items()}
    replace(plan, layers={**int8_coded, "fc": LayerChoice("fp32")}).write(v2)
    assert main(["apply", str(v2), model, "-o", str(tmp_path / "v2.onnx")]) == 0
    assert (tmp_path / "v1.onnx").read_bytes() == (tmp_path / "v2.onnx").read_bytes()
    # the same model from both: diff says they are the same (exit 0), not "0 layers changed" with exit 1
    assert main(["diff", str(tmp_path / "v1.yaml"), str(v2)]) == 0
    # written again, a migrated plan is schema 2 (its defaults kept: it lists only its overrides)
    text = v1.to_yaml()
    assert text.startswith("qsearch_plan: 3\n") and "defaults:" in text and plan_from_doc(yaml.safe_load(text)) == v1


def test_baseline_apply_evaluate_roundtrip(workload, tmp_path, capsys):
    out = tmp_path / "out"
    plan = tmp_path / "naive.yaml"
    assert main(["baseline", "naive", "--config", str(workload), "--out", str(out), "-o", str(plan),
                 "--granularity", "per_channel"]) == 0
    model_int8 = tmp_path / "m.int8.onnx"
    assert main(["apply", str(plan), str(workload.parent / "model.onnx"), "-o", str(model_int8)]) == 0
    m = onnx.load(model_int8)
    onnx.checker.check_model(m)
    assert sum(n.op_type == "QuantizeLinear" for n in m.graph.node) >= 3
    # apply is deterministic and needs no data: same plan, same bytes
    again = tmp_path / "again.onnx"
    main(["apply", str(plan), str(workload.parent / "model.onnx"), "-o", str(again)])
    assert again.read_bytes() == model_int8.read_bytes()
    assert main(["evaluate", str(model_int8), "--config", str(workload), "--out", str(out)]) == 0
    assert "top1 search" in capsys.readouterr().out


def _bad(tmp_path, workload, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("case,expect", [
    ("missing_model", "model file not found"),
    ("corrupt_model", "not a readable ONNX model"),
    ("foreign_plan", "plan is for model"),
    ("unknown_layer", "layer 'nope' does not exist"),
    ("bad_value", "layers.conv_a.calibration is 'kl'"),
    ("future_plan", "schema version 99"),
])
def test_apply_bad_inputs(case, expect, workload, tmp_path, capsys):
    model = workload.parent / "model.onnx"
    plan = tmp_path / "plan.yaml"
    main(["baseline", "naive", "--config", str(workload), "--out", str(tmp_path / "o"), "-o", str(plan)])
    capsys.readouterr()
    doc = plan.read_text()
    if case == "missing_model":
        model = tmp_path / "nope.onnx"
    elif case == "corrupt_model":
        model = tmp_path / "bad.onnx"
        model.write_bytes(b"\x08\x07garbage" * 10)
    elif case == "foreign_plan":
        model = tmp_path / "other.onnx"
        onnx.save(make_cnn(seed=5), model)
    elif case == "unknown_layer":
        plan.write_text(doc.replace("layers:\n", "layers:\n- {layer: nope, precision: fp32}\n"))
    elif case == "bad_value":
        head, tail = doc.split("- layer: conv_a\n", 1)
        plan.write_text(head + "- layer: conv_a\n" + tail.replace("calibration: minmax", "calibration: kl", 1))
    elif case == "future_plan":
        plan.write_text(doc.replace("qsearch_plan: 3", "qsearch_plan: 99"))
    out = tmp_path / "out.onnx"
    assert main(["apply", str(plan), str(model), "-o", str(out)]) == 2
    assert expect in last_error(capsys)
    assert not out.exists() and not list(tmp_path.glob(".out.onnx*"))


@pytest.mark.parametrize("edit,expect", [
    (lambda t: t.replace("metric: top1", "metric: top1\nbogus_key: 3"), ":9: unknown key 'bogus_key'"),
    (lambda t: t.replace("max_drop: 0.02", "max_drop: [oops"), "YAML error"),
    (lambda t: t.replace("max_drop: 0.02", "max_drop: -1"), "max_drop must be a number >= 0"),
    (lambda t: with_space(t, "{candidates: {include: ['conv_(']}}"), "is not a valid regular expression"),
    (lambda t: with_space(t, "{candidates: {include: ['^nomatch$']}}"), "match no layer"),
    (lambda t: t.replace("search: {npz: search.npz", "search: {npz: nan.npz"), "NaN/Inf"),
    (lambda t: t.replace("search: {npz: search.npz", "search: {npz: wrongshape.npz"), "the model expects"),
    (lambda t: t.replace("search: {npz: search.npz", "search: {npz: empty.npz"), "zero samples"),
    (lambda t: t.replace("calibration: {npz: calib.npz, labels: label}", "calibration: {entry: 'nomod:data'}"),
     "cannot import 'nomod'"),
])
def test_workload_bad_inputs(edit, expect, workload, tmp_path, capsys):
    d = workload.parent
    x = np.load(d / "search.npz")["x"]
    np.savez(d / "nan.npz", x=np.where(x > 2.5, np.nan, x).astype(np.float32), label=np.zeros(len(x), np.int64))
    np.savez(d / "wrongshape.npz", x=x[:, :, :4], label=np.zeros(len(x), np.int64))
    np.savez(d / "empty.npz", x=x[:0], label=np.zeros(0, np.int64))
    workload.write_text(edit(workload.read_text()))
    out = tmp_path / "out"
    assert main(["analyze", "--config", str(workload), "--out", str(out), "--samples", "32"]) == 2
    assert expect in last_error(capsys)
    assert not (out / "sensitivity.yaml").exists()


def test_custom_score_that_returns_garbage(workload, tmp_path, capsys):
    (workload.parent / "myscore.py").write_text("def bad(session):\n    return 'high'\n")
    workload.write_text(workload.read_text().replace("metric: top1", "metric: {search: 'myscore:bad', test: 'myscore:bad'}"))
    assert main(["analyze", "--config", str(workload), "--out", str(tmp_path / "o")]) == 2
    assert "returned 'high', not a finite number" in last_error(capsys)


def test_optimize_end_to_end(workload, tmp_path, capsys):
    """The main job through the CLI on a small model: plan within budget on test data, reports,
    a resumable study, and a plan that re-applies to the same model."""
    out = tmp_path / "run"
    args = ["optimize", "--config", str(workload), "--budget", "8", "--out", str(out)]
    assert main(args) == 0
    for f in ("plan.yaml", "model.qsearch.onnx", "report.md", "report.html", "pareto.png", "sensitivity.png",
              "study.db", "trials.csv"):
        assert (out / f).is_file(), f
    import csv

    rows = list(csv.reader((out / "trials.csv").read_text().splitlines()))
    assert rows[0][9] == "worker"  # host:pid of the process that ran the trial (several machines share a study)
    assert all(r[9].endswith(f":{os.getpid()}") for r in rows[1:] if r[1] == "COMPLETE" and r[9])
    layers = rows[0][10:]  # one column per searched layer
    assert layers and all(len(r) == len(rows[0]) for r in rows)
    assert all(v.startswith(("int8/", "fp32")) for r in rows[1:] if r[1] == "COMPLETE" for v in r[10:])
    plan = read_plan(out / "plan.yaml")
    assert plan.metrics["test_drop"] <= plan.metrics["max_drop"] + 0.05  # small test set: search budget + noise
    assert plan.metrics["plan"]["search"] >= plan.metrics["fp32"]["search"] - plan.metrics["max_drop"]
    assert "naive int8" in (out / "report.md").read_text()
    sess = ort.InferenceSession(str(out / "model.qsearch.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["y"]
    # resume: the same study with a larger budget keeps its trials and adds the rest
    import optuna

    assert main(["optimize", "--config", str(workload), "--budget", "11", "--out", str(out)]) == 0
    study = optuna.load_study(study_name=plan.provenance["study"], storage=f"sqlite:///{out / 'study.db'}")
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 11
    # what optuna-dashboard shows, through Optuna's own API: the objective's name and the budget as
    # each trial's constraint (feasible when <= 0)
    assert study.metric_names == ["latency"] and study.user_attrs["allowed_drop"] == plan.metrics["max_drop"]
    for t in (t for t in finished if t.state.name == "COMPLETE"):
        values = list(t.constraints.values()) if isinstance(t.constraints, dict) else list(t.constraints)
        assert values == [pytest.approx(t.user_attrs["drop"] - plan.metrics["max_drop"])]
    check_result(out, workload, study)
    # reused: the same command again adds no trial and ends with a result of the same meaning
    assert main(["optimize", "--config", str(workload), "--budget", "11", "--out", str(out)]) == 0
    study = optuna.load_study(study_name=plan.provenance["study"], storage=f"sqlite:///{out / 'study.db'}")
    assert [t.number for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")] == [t.number for t in finished]
    check_result(out, workload, study)
    assert main(["optimize", "--config", str(workload), "--budget", "-3", "--out", str(out)]) == 2
    assert "--budget must be a positive" in last_error(capsys)


def _custom_op_model():
    m = make_cnn()
    m.graph.node[1].domain, m.graph.node[1].op_type = "com.acme", "Frobnicate"
    m.opset_import.append(onnx.helper.make_opsetid("com.acme", 1))
    return m


@pytest.mark.parametrize("case,expect", [
    ("truncated_model", "trunc.onnx: not a readable ONNX model"),
    ("custom_op_model", "custom.onnx: ONNX Runtime cannot load the model: "),
    ("unsupported_op_type", "op_types: 'ConvTranspose' is not one of"),
    ("wrong_input_name", "wrongname.npz: search data has arrays ['image'] but the model's inputs are ['x']"),
    ("wrong_dtype", "wrongdtype.npz: search input 'x' has dtype int32, the model expects float32"),
    ("pickled_objects", "obj.npz: cannot read search data"),
    ("entry_raises", "data entry point 'raiser:data' raised RuntimeError: db down"),
    ("out_is_under_a_file", "not a writable folder"),
    ("missing_config", "nope.yaml: config not found"),
])
def test_more_bad_workload_inputs(case, expect, workload, tmp_path, capsys):
    d = workload.parent
    text = workload.read_text()
    out = tmp_path / "out"
    x = np.load(d / "search.npz")["x"]
    if case == "truncated_model":
        b = (d / "model.onnx").read_bytes()
        (d / "trunc.onnx").write_bytes(b[: len(b) // 2])
        text = text.replace("model: model.onnx", "model: trunc.onnx")
    elif case == "custom_op_model":
        onnx.save(_custom_op_model(), d / "custom.onnx")
        text = text.replace("model: model.onnx", "model: custom.onnx")
    elif case == "unsupported_op_type":
        text = with_space(text, "{candidates: {op_types: [ConvTranspose]}}")
    elif case in ("wrong_input_name", "wrong_dtype", "pickled_objects"):
        name = {"wrong_input_name": "wrongname", "wrong_dtype": "wrongdtype", "pickled_objects": "obj"}[case]
        arrays = {"wrong_input_name": {"image": x}, "wrong_dtype": {"x": x.astype(np.int32)},
                  "pickled_objects": {"x": np.array([object()] * 3, dtype=object)}}[case]
        np.savez(d / f"{name}.npz", label=np.zeros(len(arrays[next(iter(arrays))]), np.int64), **arrays)
        text = text.replace("search: {npz: search.npz", f"search: {{npz: {name}.npz")
    elif case == "entry_raises":
        (d / "raiser.py").write_text("def data():\n    raise RuntimeError('db down')\n")
        text = text.replace("calibration: {npz: calib.npz, labels: label}", "calibration: {entry: 'raiser:data'}")
    elif case == "out_is_under_a_file":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "sub"
    workload.write_text(text)
    config = str(tmp_path / "nope.yaml") if case == "missing_config" else str(workload)
    for cmd in (["analyze"], ["optimize", "--budget", "2"]):
        assert main([*cmd, "--config", config, "--out", str(out)]) == 2
        assert expect in last_error(capsys)
        assert not list(out.glob("*.yaml")) if out.is_dir() else True  # nothing half-written


@pytest.mark.parametrize("case,expect", [
    ("plan_yaml_syntax", ":3: YAML error"),
    ("plan_mistyped_key", ":7: unknown key 'targte'"),
    ("output_not_writable", "cannot write there"),
    ("plan_unknown_pattern", "forms.gelu: unknown pattern (known: hardswish)"),
    ("plan_unknown_form", "forms.hardswish is 'lut', expected one of decomposed, fused"),
    ("plan_forms_not_a_mapping", "'forms' must be a mapping of pattern -> form"),
    ("plan_forms_false", "'forms' must be a mapping of pattern -> form"),
])
def test_more_bad_plan_inputs(case, expect, workload, tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    assert main(["baseline", "naive", "--config", str(workload), "--out", str(tmp_path / "o"), "-o", str(plan)]) == 0
    capsys.readouterr()
    out = tmp_path / "out.onnx"
    if case == "plan_yaml_syntax":
        plan.write_text("qsearch_plan: 1\nmodel: {name: x\n")
    elif case == "plan_mistyped_key":
        plan.write_text(plan.read_text().replace("target:", "targte:"))
    elif case.startswith("plan_"):
        forms = {"plan_unknown_pattern": "{gelu: fused}", "plan_unknown_form": "{hardswish: lut}",
                 "plan_forms_not_a_mapping": "[fused]", "plan_forms_false": "false"}[case]
        plan.write_text(plan.read_text().replace("\nlayers:", f"\nforms: {forms}\nlayers:", 1))
    else:
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "out.onnx"
    assert main(["apply", str(plan), str(workload.parent / "model.onnx"), "-o", str(out)]) == 2
    assert expect in last_error(capsys)
    assert not out.exists()


def test_profile_any_model_by_kind_op_and_layer(workload, tmp_path, capsys):
    """`qsearch profile` on the FP32 model and on a naive INT8 model written by apply: where the
    time goes, attributed to the workload's layers, with no calibration."""
    model = workload.parent / "model.onnx"
    plan, int8 = tmp_path / "naive.yaml", tmp_path / "naive.onnx"
    assert main(["baseline", "naive", "--config", str(workload), "--out", str(tmp_path / "o"), "-o", str(plan)]) == 0
    assert main(["apply", str(plan), str(model), "-o", str(int8)]) == 0
    capsys.readouterr()
    assert main(["profile", str(model), "--config", str(workload)]) == 0
    fp32 = capsys.readouterr().out
    assert "0 int8 kernels" in fp32 and ("| Conv |" in fp32 or "| FusedConv |" in fp32)
    csv_path = tmp_path / "layers.csv"
    assert main(["profile", str(int8), "--config", str(workload), "-o", str(csv_path)]) == 0
    text = capsys.readouterr().out
    kinds = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in text.splitlines()
             if line.startswith(("| int8 kernel", "| Q/DQ glue", "| float op"))}
    assert kinds["int8 kernel"] > 0 and kinds["Q/DQ glue"] > 0
    rows = csv_path.read_text().splitlines()
    assert rows[0].startswith("layer,int8 kernel,float op,Q/DQ glue,total_ms")
    assert {"conv_a", "conv_b", "fc"} <= {r.split(",")[0] for r in rows[1:]}
    other = tmp_path / "other.onnx"
    m = onnx.load(model)
    m.graph.input[0].name = "image"
    for n in m.graph.node:
        n.input[:] = ["image" if t == "x" else t for t in n.input]
    onnx.save(m, other)
    assert main(["profile", str(other), "--config", str(workload)]) == 2
    assert "do not match the workload's data" in last_error(capsys)
    assert main(["profile", str(model), "--config", str(workload), "-o", str(model)]) == 2
    assert "is an input of this command" in last_error(capsys)


def test_the_readme_config_example_works_verbatim(tmp_path, capsys):
    """The README's workload example, copied as is next to a model and npz files that hold labels
    in every split (as users' files do)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Workload config", 1)[1]
    example = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    d = tmp_path / "w"
    write_workload(d, make_cnn(), n=128)
    (d / "workload.yaml").write_text(example)
    assert main(["optimize", "--budget", "2", "--config", str(d / "workload.yaml"), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "plan.yaml").is_file()


def test_a_misspelled_tensor_or_a_foreign_form_is_refused_naming_the_closest(workload, tmp_path, capsys):
    """A range for a tensor the model lacks (a typo) would be ignored without a word; forms for a
    pattern the model lacks would be claimed for nothing. Both are refused where the model is known."""
    out = tmp_path / "run"
    assert main(["optimize", "--config", str(workload), "--out", str(out), "--budget", "2"]) == 0
    doc = yaml.safe_load((out / "plan.yaml").read_text())
    doc.setdefault("shared_ranges", {})["a_rleu"] = [-1.0, 1.0]
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump(doc, sort_keys=False))
    model = workload.parent / "model.onnx"
    for argv in (["apply", str(bad), str(model), "-o", str(tmp_path / "m.onnx")], ["show", str(bad), "--model", str(model)]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "tensor 'a_rleu'" in err and "did you mean 'a_relu'" in err
    assert not (tmp_path / "m.onnx").exists()
    del doc["shared_ranges"]["a_rleu"]
    doc["forms"] = {"hardswish": "fused"}
    bad.write_text(yaml.safe_dump(doc, sort_keys=False))
    capsys.readouterr()
    assert main(["apply", str(bad), str(model), "-o", str(tmp_path / "m.onnx")]) == 2
    assert "has no hardswish pattern" in capsys.readouterr().err


def test_json_output_is_one_object_and_quiet_is_silent(workload, tmp_path, capsys):
    import json

    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["optimize", "--config", str(workload), "--out", str(out), "--budget", "2", "--json", "--quiet"]) == 0
    cap = capsys.readouterr()
    r = json.loads(cap.out)  # the whole of stdout is one JSON object
    assert cap.err == ""
    assert r["status"] == "plan" and r["exit_code"] == 0 and r["evaluations"] > 0
    assert r["speedup"] == pytest.approx(r["fp32_latency_ms"] / r["latency_ms"])
    plan = yaml.safe_load(Path(r["paths"]["plan"]).read_text())
    assert r["test_drop"] == pytest.approx(plan["metrics"]["test_drop"]) and r["max_drop"] == plan["metrics"]["max_drop"]
    rec = plan.get("recovery")  # the recovery counts agree with the plan's sidecar (none on this model: no pairs)
    assert r["recovery"]["equalized_pairs"] == 0 and (rec is None) == ("recovery" not in r["paths"])
    assert main(["evaluate", r["paths"]["model"], "--config", str(workload), "--cache", str(out), "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["test"] == pytest.approx(plan["metrics"]["plan"]["test"])
    assert main(["analyze", "--config", str(workload), "--out", str(out), "--json", "--quiet"]) == 0
    a = json.loads(capsys.readouterr().out)
    assert a["layers"] >= 1 and len(a["most_sensitive"]) >= 1
