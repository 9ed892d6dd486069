"""Time limits, consistent output sets, study checks before work, clean shutdown of workers."""

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from qsearch.analysis.sensitivity import analyze
from qsearch.cli import main
from qsearch.files import OutputSet

from .conftest import last_error, make_cnn, new_search, open_bench, write_workload

ROOT = Path(__file__).resolve().parent.parent


def _custom_metric(workload: Path, module: str, body: str) -> None:
    """A custom score function (its own module name: imported modules are cached by name)."""
    (workload.parent / f"{module}.py").write_text(
        "import time\nimport numpy as np\nCALLS = [0]\n\n\ndef score(session):\n    CALLS[0] += 1\n" + body
        + "\n\ndef test(session):\n    return 1.0\n")
    workload.write_text(workload.read_text().replace(
        "metric: top1", f"metric: {{search: '{module}:score', test: '{module}:test'}}"))


def test_a_hung_metric_is_stopped_by_the_per_evaluation_limit(workload, tmp_path, capsys):
    # FP32 is scored twice (baseline, determinism check); every later evaluation hangs
    _custom_metric(workload, "hangs", "    if CALLS[0] > 2:\n        time.sleep(3600)\n    return 1.0")
    t0 = time.monotonic()
    rc = main(["optimize", "--budget", "3", "--eval-timeout", "1", "--config", str(workload),
               "--out", str(tmp_path / "o")])
    assert time.monotonic() - t0 < 60
    # the first evaluation after FP32's is the fixing stage's all-INT8 measurement, outside any
    # trial: the limit stops the command there with a one-line error (exit 2), not a no-plan (1)
    assert rc == 2
    assert "ran past the 1 s per-evaluation limit (--eval-timeout)" in capsys.readouterr().err


def test_timeout_bounds_the_whole_command(workload, tmp_path, capsys):
    _custom_metric(workload, "slow", "    time.sleep(0.2)\n    return 1.0")
    out = tmp_path / "o"
    t0 = time.monotonic()
    assert main(["optimize", "--budget", "500", "--timeout", "20", "--config", str(workload), "--out", str(out)]) == 0
    assert time.monotonic() - t0 < 20 + 2  # the final stage fits in what the search left it
    assert (out / "plan.yaml").is_file()
    t0 = time.monotonic()
    assert main(["optimize", "--budget", "500", "--timeout", "2", "--config", str(workload),
                 "--out", str(tmp_path / "o2")]) == 124
    assert time.monotonic() - t0 < 2 + 2
    assert "--timeout 2 s" in last_error(capsys)
    for bad in ("-1", "0"):
        assert main(["optimize", "--timeout", bad, "--config", str(workload), "--out", str(out)]) == 2
        assert "--timeout must be a positive number of seconds" in last_error(capsys)
    assert main(["analyze", "--eval-timeout", "-5", "--config", str(workload), "--out", str(out)]) == 2
    assert "--eval-timeout must be >= 0" in last_error(capsys)


def test_an_interrupt_in_the_final_stage_keeps_the_previous_result_whole(workload, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    assert main(["optimize", "--budget", "3", "--config", str(workload), "--out", str(out)]) == 0
    names = ("plan.yaml", "model.qsearch.onnx", "report.md", "report.html", "trials.csv")
    before = {n: (out / n).read_bytes() for n in names}
    capsys.readouterr()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("qsearch.result.write_report", interrupted)
    assert main(["optimize", "--budget", "6", "--config", str(workload), "--out", str(out)]) == 130
    assert "the result was not written" in last_error(capsys)
    assert {n: (out / n).read_bytes() for n in names} == before  # not one file of the second run
    assert not list(out.glob(".staging-*"))


def test_an_output_set_replaces_the_previous_set_as_a_whole(tmp_path):
    out = tmp_path / "o"
    (out / "pareto").mkdir(parents=True)
    (out / "plan.yaml").write_text("old plan")
    (out / "pareto" / "plan-trial0001.yaml").write_text("old")
    (out / "study.db").write_text("kept: not part of the set")
    with OutputSet(out, ("plan.yaml", "pareto", "closest")) as res:
        res.path("closest/plan-trial0004.yaml").parent.mkdir()
        res.path("closest/plan-trial0004.yaml").write_text("new")
        with pytest.raises(ValueError):
            res.path("study.db")
        res.commit()
    assert sorted(p.name for p in out.iterdir()) == ["closest", "study.db"]
    assert (out / "closest" / "plan-trial0004.yaml").read_text() == "new"
    with OutputSet(out, ("plan.yaml",)) as res:
        res.path("plan.yaml").write_text("never committed")
    assert not (out / "plan.yaml").exists() and not list(out.glob(".staging-*"))


def test_garbled_study_storage_and_foreign_study_refused_before_the_analysis(workload, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "study.db").write_bytes(b"this is not a database" * 100)
    assert main(["optimize", "--budget", "2", "--config", str(workload), "--out", str(out)]) == 2
    assert "study.db" in last_error(capsys)
    assert not (out / "sensitivity.yaml").exists()  # refused before any analysis
    (out / "study.db").unlink()
    (out / "study.db.workers.lock").mkdir()  # a folder where the lock file goes
    assert main(["optimize", "--budget", "2", "--config", str(workload), "--out", str(out)]) == 2
    assert "study.db.workers.lock: cannot create the study's lock file there" in last_error(capsys)
    assert not (out / "sensitivity.yaml").exists()
    out2 = tmp_path / "o2"
    assert main(["optimize", "--budget", "2", "--study", "mine", "--config", str(workload), "--out", str(out2)]) == 0
    (out2 / "sensitivity.yaml").unlink()
    workload.write_text(workload.read_text().replace("max_drop: 0.02", "max_drop: 0.05"))
    capsys.readouterr()
    assert main(["optimize", "--budget", "2", "--study", "mine", "--config", str(workload), "--out", str(out2)]) == 2
    assert "study 'mine' was made for another model, data, metric, budget" in last_error(capsys)
    assert not (out2 / "sensitivity.yaml").exists()


def test_a_run_interrupted_right_after_creating_its_study_still_warm_starts(tmp_path):
    cfg = write_workload(tmp_path / "w", make_cnn(outlier_layer="conv_b"), n=64)
    ctx = open_bench(cfg, tmp_path / "cache")
    profile = analyze(ctx, cache_dir=tmp_path / "cache")
    first = new_search(ctx, profile, tmp_path / "out")  # created the study ... and was interrupted here
    assert first.created and not first.study.trials
    first.close()  # (the process ended)
    resumed = new_search(ctx, profile, tmp_path / "out")
    assert not resumed.created
    resumed.run(8)
    warm = [t for t in resumed.study.trials if t.system_attrs.get("fixed_params")]
    assert warm and resumed.study.user_attrs.get("warm_started")


def _children(pid: int) -> set[int]:
    kids = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.add(int(d))
    return kids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process parents from /proc")
def test_sigterm_during_a_multi_worker_analysis_stops_every_worker(workload, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "qsearch", "analyze", "--workers", "2", "--config", str(workload),
                             "--out", str(tmp_path / "o")], stderr=subprocess.PIPE, text=True, cwd=ROOT)
    kids: set[int] = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(kids) < 2 and proc.poll() is None:
        kids |= _children(proc.pid)
        time.sleep(0.05)
    assert proc.poll() is None and kids, "the analysis finished before its workers could be seen"
    time.sleep(0.5)
    kids |= _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    time.sleep(0.5)
    alive = [k for k in kids if Path(f"/proc/{k}").exists() and "Z" not in Path(f"/proc/{k}/stat").read_text().split()[2]]
    assert not alive


def test_evaluate_on_a_model_that_does_not_fit_the_data(workload, tmp_path, capsys):
    other = make_cnn()
    other.graph.input[0].name = "image"
    for n in other.graph.node:
        n.input[:] = ["image" if t == "x" else t for t in n.input]
    import onnx

    onnx.save(other, tmp_path / "other.onnx")
    assert main(["evaluate", str(tmp_path / "other.onnx"), "--config", str(workload), "--out", str(tmp_path / "o")]) == 2
    assert "other.onnx" in last_error(capsys)


def test_non_finite_activations_named_at_calibration(workload, tmp_path, capsys):
    d = workload.parent
    x = np.full((64, 3, 8, 8), 3e38, np.float32)
    np.savez(d / "huge.npz", x=x, label=np.zeros(64, np.int64))
    workload.write_text(workload.read_text().replace("calibration: {npz: calib.npz", "calibration: {npz: huge.npz"))
    assert main(["analyze", "--config", str(workload), "--out", str(tmp_path / "o")]) == 2
    assert "has non-finite values" in last_error(capsys)


def test_a_trial_lost_by_a_killed_worker_is_retried_once_with_its_plan(tmp_path):
    """A planted orphan: a trial left RUNNING (its worker was killed mid-trial). The next worker
    alone on the study marks it failed and runs the same plan once more; finished trials stay."""
    from optuna.trial import TrialState

    cfg = write_workload(tmp_path / "w", make_cnn(outlier_layer="conv_b"), n=64)
    ctx = open_bench(cfg, tmp_path / "cache")
    profile = analyze(ctx, cache_dir=tmp_path / "cache")
    first = new_search(ctx, profile, tmp_path / "out")
    first.run(4)
    finished = {t.number: t.params for t in first.study.trials if t.state == TrialState.COMPLETE}
    with warnings.catch_warnings():  # (Optuna's heartbeat note: ask() outside optimize())
        warnings.simplefilter("ignore", UserWarning)
        lost = first.study.ask()  # a worker takes the next trial ... and is killed while scoring it
    plan = {n: lost.suggest_categorical(n, list(opts)) for n, opts in first.dims.searched.items()}
    first.close()
    resumed = new_search(ctx, profile, tmp_path / "out")
    assert resumed.study.trials[lost.number].state == TrialState.FAIL
    retry = [t for t in resumed.study.trials if t.user_attrs.get("retry_of") == lost.number]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING
    resumed.run(len(finished) + 3)
    retry = [t for t in resumed.study.trials if t.user_attrs.get("retry_of") == lost.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == plan
    assert {t.number: t.params for t in resumed.study.trials if t.number in finished} == finished


def test_time_limits_too_large_for_the_timer_mean_no_limit_and_nan_is_refused(tmp_path, capsys):
    cfg = write_workload(tmp_path / "w", make_cnn(), n=64)
    out = tmp_path / "o"
    assert main(["optimize", "--budget", "2", "--timeout", "inf", "--eval-timeout", "1e10", "--config", str(cfg),
                 "--out", str(out)]) == 0
    for flag in ("--timeout", "--eval-timeout"):
        capsys.readouterr()
        assert main(["optimize", "--budget", "2", flag, "nan", "--config", str(cfg), "--out", str(tmp_path / "n")]) == 2
        err = capsys.readouterr().err
        assert f"{flag} must be" in err and "Traceback" not in err
    import qsearch
    from qsearch.errors import QsearchError

    with pytest.raises(QsearchError, match="--budget must be a positive whole number"):  # before any analysis
        qsearch.optimize(cfg, budget=float("nan"), out=tmp_path / "api")
    assert not (tmp_path / "api").exists()


def test_a_garbled_study_database_is_a_one_line_error(tmp_path, capsys):
    """Pages of study.db overwritten (a disk or copy gone wrong): wherever the storage fails, one
    line naming it, exit 2, no traceback."""
    cfg = write_workload(tmp_path / "w", make_cnn(), n=64)
    out = tmp_path / "o"
    assert main(["optimize", "--budget", "2", "--config", str(cfg), "--out", str(out)]) == 0
    db = out / "study.db"
    good = db.read_bytes()
    for start in (4096, 8192, len(good) // 2):
        db.write_bytes(good[:start] + b"\x5a" * (len(good) - start))
        capsys.readouterr()
        assert main(["optimize", "--budget", "3", "--config", str(cfg), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "Traceback" not in "\n".join(err) and "storage" in err[-1], err[-3:]


def test_progress_off_a_terminal_is_plain_lines_without_nan(capsys):
    from qsearch.progress import Progress

    bar = Progress("optimize")
    for done in (0, 1, 3):
        bar(done, 3, "trials")
    err = capsys.readouterr().err
    assert "\r" not in err and "nan" not in err.lower()
    lines = err.splitlines()
    assert len(lines) == 2 and "trials: 0/3" in lines[0] and "trials: 3/3 (100%)" in lines[1]  # (1/3: throttled)
    live = Progress("2/3 search")  # on a terminal: rich's live display, ended when every step is done
    live.tty = True
    for done in range(4):
        live(done, 3, "trials", "best 1.8x")
    assert live._live is None and "3/3" in capsys.readouterr().err
