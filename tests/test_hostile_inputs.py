"""Hostile but plausible inputs, one class per case: each ends in one line naming the file, key or
tensor, exit 2, no traceback, nothing half-written (and no empty --out left behind)."""

import numpy as np
import pytest
import yaml

from qsearch.cli import main

from .conftest import last_error, with_space

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b, *b, *b, *b]\n"


@pytest.mark.parametrize("case,expect", [
    ("alias_bomb", "aliases are not allowed (*a)"),
    ("seed_too_big", "'seed' must be an integer in [0, 2147483647], got 4294967296"),
    ("endless_entry", "yields more than 100000 batches (endless?); set data.calibration.limit"),
    ("empty_batch_entry", "calibration data has an empty batch"),
    ("float_labels", "search labels must be one integer class index per sample, got float64"),
    ("one_hot_labels", "(one-hot? give class indices)"),
    ("labels_out_of_range", "labels must lie in [0, 9] (the output has 10 classes), found 0..10"),
    ("cache_is_a_file", "'cache' there is a file"),
])
def test_hostile_workloads(case, expect, workload, tmp_path, capsys):
    d = workload.parent
    text = workload.read_text()
    out = tmp_path / "out"
    s = np.load(d / "search.npz")
    x, y = s["x"], s["label"]
    if case == "alias_bomb":
        text += BOMB
    elif case == "seed_too_big":
        text = with_space(text, "{seed: 4294967296}")
    elif case in ("endless_entry", "empty_batch_entry"):
        body = ("    while True:\n        yield {'x': np.zeros((1, 3, 8, 8), np.float32)}\n" if case == "endless_entry"
                else "    yield {'x': np.zeros((0, 3, 8, 8), np.float32)}\n")
        (d / f"gen_{case}.py").write_text("import numpy as np\n\ndef data():\n" + body)  # (modules are cached by name)
        text = text.replace("calibration: {npz: calib.npz, labels: label}", f"calibration: {{entry: 'gen_{case}:data'}}")
    elif case in ("float_labels", "one_hot_labels", "labels_out_of_range"):
        lab = {"float_labels": y.astype(np.float64), "one_hot_labels": np.eye(10, dtype=np.int64)[y],
               "labels_out_of_range": np.where(np.arange(len(y)) == 0, 10, y % 10)}[case]
        np.savez(d / "bad.npz", x=x, label=lab)
        text = text.replace("search: {npz: search.npz", "search: {npz: bad.npz")
    elif case == "cache_is_a_file":
        out.mkdir()
        (out / "cache").write_text("not a folder")
    workload.write_text(text)
    for cmd in (["analyze"], ["optimize", "--budget", "2"]):
        assert main([*cmd, "--config", str(workload), "--out", str(out)]) == 2
        assert expect in last_error(capsys)
        assert not list(out.glob("*.yaml")) if out.is_dir() else True
        if case != "cache_is_a_file":
            assert not out.exists()  # a config or data error leaves no empty --out behind


@pytest.mark.parametrize("case,expect", [
    ("plan_alias", "aliases are not allowed"),
    ("percentile_text", "calibration.percentile must be a number in [50, 100], got 'abc'"),
    ("metrics_list", "'metrics' must be a mapping, got [1, 2]"),
    ("provenance_text", "'provenance' must be a mapping, got 'hello'"),
    ("huge_range", "must be [min <= 0, max >= 0] with |values| <= 3.40282e+38"),
    ("bool_range", "must be [min <= 0, max >= 0]"),
    ("output_is_the_model", "is an input of this command"),
    ("output_is_the_plan", "is an input of this command"),
])
def test_hostile_plans(case, expect, workload, tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    model = workload.parent / "model.onnx"
    assert main(["baseline", "naive", "--config", str(workload), "--out", str(tmp_path / "o"), "-o", str(plan)]) == 0
    capsys.readouterr()
    doc = plan.read_text()
    before = model.read_bytes()
    out = tmp_path / "out.onnx"
    if case == "plan_alias":
        plan.write_text(doc + "extra: &e {a: 1}\nmore: *e\n")
    elif case == "percentile_text":
        plan.write_text(doc.replace("percentile: 99.99", "percentile: abc"))
    elif case == "metrics_list":
        plan.write_text(doc.split("metrics:")[0] + "metrics: [1, 2]\n")
    elif case == "provenance_text":
        plan.write_text(doc.split("provenance:")[0] + "provenance: hello\n")
    elif case in ("huge_range", "bool_range"):
        d = yaml.safe_load(doc)
        entry = next(e for e in d["layers"] if "ranges" in e)
        entry["ranges"][next(iter(entry["ranges"]))] = [-1e300, 1e300] if case == "huge_range" else [False, True]
        plan.write_text(yaml.safe_dump(d, sort_keys=False))
    elif case == "output_is_the_model":
        out = model
    elif case == "output_is_the_plan":
        out = plan
    assert "percentile: 99.99" in doc and "metrics:" in doc and "provenance:" in doc
    assert main(["apply", str(plan), str(model), "-o", str(out)]) == 2
    assert expect in last_error(capsys)
    assert model.read_bytes() == before  # the user's source is never overwritten
    if case not in ("output_is_the_model", "output_is_the_plan"):
        assert not out.exists()


def test_baseline_refuses_to_overwrite_the_model(workload, tmp_path, capsys):
    model = workload.parent / "model.onnx"
    before = model.read_bytes()
    assert main(["baseline", "naive", "--config", str(workload), "--out", str(tmp_path / "o"), "-o", str(model)]) == 2
    assert "is an input of this command" in last_error(capsys)
    assert model.read_bytes() == before


def test_samples_below_one_refused_before_any_work(workload, tmp_path, capsys):
    out = tmp_path / "out"
    for n in ("0", "-3"):
        assert main(["analyze", "--config", str(workload), "--out", str(out), "--samples", n]) == 2
        assert f"--samples must be a whole number >= 1, got {n}" in last_error(capsys)
    assert not out.exists()


def test_yaml_bombs_and_odd_keys_are_one_line_errors(tmp_path, capsys):
    """Deep nesting (RecursionError before) and complex keys (unhashable before), in configs and
    plans alike: both go through the one YAML loader."""
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 400 + "]" * 400 + "\n")
    odd = tmp_path / "odd.yaml"
    odd.write_text("? [a, b]\n: 1\n")
    for f in (deep, odd):
        for argv in (["optimize", "--config", str(f), "--out", str(tmp_path / "o")], ["show", str(f)]):
            capsys.readouterr()
            assert main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and str(f) in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "o").exists()


def test_zero_d_labels_are_refused(tmp_path, capsys):
    from .conftest import make_cnn, write_workload

    cfg = write_workload(tmp_path / "w", make_cnn(), n=32)
    d = np.load(cfg.parent / "search.npz")
    np.savez(cfg.parent / "search.npz", x=d["x"], label=np.int64(3))
    assert main(["optimize", "--budget", "1", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "0-d array" in err and "Traceback" not in err


def test_entry_points_that_exit_are_errors_naming_them(tmp_path, capsys):
    """sys.exit(0) inside a user's data or score function (or at import) must not end qsearch with
    exit 0 and nothing written: one line naming the entry point, exit 2."""
    from .conftest import make_cnn, write_workload

    cfg = write_workload(tmp_path / "w", make_cnn(), n=32)
    (cfg.parent / "quitter.py").write_text("import sys\n\ndef score(session):\n    sys.exit(0)\n\n"
                                          "def data():\n    sys.exit(0)\n")
    (cfg.parent / "quit_on_import.py").write_text("import sys\nsys.exit(0)\n\ndef score(session):\n    return 1.0\n")
    base = cfg.read_text()
    for name, text in (("score", base.replace("metric: top1", "metric: {search: 'quitter:score', test: 'quitter:score'}")),
                       ("import", base.replace("metric: top1", "metric: {search: 'quit_on_import:score', "
                                                                "test: 'quit_on_import:score'}")),
                       ("data", base.replace("calibration: {npz: calib.npz, labels: label}",
                                             "calibration: {entry: 'quitter:data'}"))):
        cfg.write_text(text)
        capsys.readouterr()
        assert main(["optimize", "--budget", "1", "--config", str(cfg), "--out", str(tmp_path / name)]) == 2, name
        err = capsys.readouterr().err
        assert "SystemExit" in err and "Traceback" not in err, (name, err)


def test_no_command_writes_over_a_file_its_workload_reads(tmp_path, capsys):
    """profile -o and baseline -o aimed at the workload's own data, model or config: refused, the
    file untouched."""
    from .conftest import make_cnn, write_workload

    cfg = write_workload(tmp_path / "w", make_cnn(), n=32)
    model = cfg.parent / "model.onnx"
    for victim in (cfg.parent / "search.npz", cfg.parent / "calib.npz", cfg, model):
        before = victim.read_bytes()
        for argv in (["profile", str(model), "--config", str(cfg), "-o", str(victim)],
                     ["baseline", "fp32", "--config", str(cfg), "--cache", str(tmp_path / "c"), "-o", str(victim)]):
            capsys.readouterr()
            assert main(argv) == 2, (argv, victim)
            assert "is an input of this command" in capsys.readouterr().err
            assert victim.read_bytes() == before


def test_refused_commands_leave_no_folders_behind(tmp_path, capsys):
    from .conftest import make_cnn, write_workload

    cfg = write_workload(tmp_path / "w", make_cnn(), n=32)
    out = tmp_path / "never"
    assert main(["optimize", "--budget", "1", "--config", str(cfg), "--out", str(out), "--storage", "bogus://x"]) == 2
    assert not out.exists()
    deep = tmp_path / "new" / "a" / "b" / "x.csv"
    assert main(["profile", str(tmp_path / "missing.onnx"), "--config", str(cfg), "-o", str(deep)]) == 2
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("case,expect", [
    ("ceiling_not_bool", "search_space.stop_at_ceiling must be true or false"),
    ("weights_unknown", "search_space.weights: 'int9' is not one of int8, int7, uint8"),
    ("weights_empty", "search_space.weights must not be empty"),
    ("int8_path_unknown", "QSEARCH_INT8_PATH: 'z80' is not one of"),
    ("heartbeat_text", "QSEARCH_HEARTBEAT_S: 'abc' is not a whole number of seconds in [1, 3600]"),
    ("heartbeat_zero", "QSEARCH_HEARTBEAT_S: '0' is not a whole number"),
    ("heartbeat_huge", "QSEARCH_HEARTBEAT_S: '99999' is not a whole number"),
])
def test_hostile_inputs_of_this_round(case, expect, workload, tmp_path, capsys, monkeypatch):
    """This round's new inputs (the ceiling stop, weight encodings, the CPU's int8 path, heartbeats),
    each refused in one line before any work, with no --out left behind."""
    from qsearch.engine import isa

    text = workload.read_text()
    if case == "ceiling_not_bool":
        text = with_space(text, "{stop_at_ceiling: 1}")
    elif case.startswith("weights"):
        text = with_space(text, "{weights: [int9]}" if case == "weights_unknown" else "{weights: []}")
    elif case == "int8_path_unknown":
        monkeypatch.setenv("QSEARCH_INT8_PATH", "z80")
        isa.detect.cache_clear()
    else:
        monkeypatch.setenv("QSEARCH_HEARTBEAT_S", {"heartbeat_text": "abc", "heartbeat_zero": "0"}.get(case, "99999"))
    workload.write_text(text)
    out = tmp_path / "out"
    try:
        assert main(["optimize", "--config", str(workload), "--budget", "2", "--out", str(out)]) == 2
        assert expect in last_error(capsys)
        assert not out.exists()
    finally:
        isa.detect.cache_clear()


def test_a_plan_naming_an_unknown_int8_path_is_applied_and_said(workload, tmp_path, capsys):
    """provenance.int8_path is only displayed: a hand-edited value is shown as text, never trusted."""
    plan = tmp_path / "plan.yaml"
    assert main(["baseline", "naive", "--config", str(workload), "--out", str(tmp_path / "o"), "-o", str(plan)]) == 0
    capsys.readouterr()
    doc = yaml.safe_load(plan.read_text())
    doc["provenance"]["int8_path"] = [1, 2]
    plan.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert main(["apply", str(plan), str(workload.parent / "model.onnx"), "-o", str(tmp_path / "m.onnx")]) == 0
    assert "names int8 path '[1, 2]', which is none of" in capsys.readouterr().err


def test_a_reader_that_leaves_the_pipe_gets_no_traceback(workload, tmp_path):
    """`qsearch show plan.yaml | head -1`: the pipe closes before qsearch writes; one quiet exit."""
    import os
    import subprocess
    import sys

    plan = tmp_path / "naive.yaml"
    assert main(["baseline", "fp32", "--config", str(workload), "-o", str(plan)]) == 0
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write
    p = subprocess.run([sys.executable, "-m", "qsearch", "show", str(plan)], stdout=w, stderr=subprocess.PIPE,
                       text=True, timeout=120)
    os.close(w)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr


def test_two_configs_with_entry_modules_of_one_name_each_get_their_own(tmp_path):
    """Two workloads in one Python session, each with its own `hook.py` beside its config: the
    second must not be answered by the first's module, cached in sys.modules."""
    from qsearch.data import import_entry

    for k in (1, 2):
        (tmp_path / f"w{k}").mkdir()
        (tmp_path / f"w{k}" / "qsearch_test_entry.py").write_text(f"def f():\n    return {k}\n")
    assert import_entry("qsearch_test_entry:f", "w1", tmp_path / "w1")() == 1
    assert import_entry("qsearch_test_entry:f", "w2", tmp_path / "w2")() == 2
    assert import_entry("qsearch_test_entry:f", "w2", tmp_path / "w2")() == 2  # cached when it is its own
