"""Interrupted searches and several workers on one study, as users run them: real `qsearch
optimize` processes, real signals, real SQLite / journal / PostgreSQL storages."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from .conftest import make_cnn, write_workload

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    return write_workload(tmp_path_factory.mktemp("w"), make_cnn(outlier_layer="conv_b"))


def _optimize(workload: Path, out: Path, budget: int, *extra: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qsearch", "optimize", "--config", str(workload), "--budget", str(budget),
           "--out", str(out), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=None if env is None else {**os.environ, **env})


def _study(storage: str) -> optuna.Study:
    """The search study (the other one holds the analysis jobs: each done exactly once)."""
    names = optuna.get_all_study_names(storage)
    # calibration parts, proxy passes, latency profile, screen, the early verdict
    stages = ("-analysis-calibration", "-analysis-proxy", "-analysis-profile", "-analysis", "-analysis-verdict")
    search = [n for n in names if not n.endswith(stages)]
    assert len(search) == 1 and len(names) == 6
    for stage in stages:
        jobs = optuna.load_study(study_name=search[0] + stage, storage=storage)
        done = [t.user_attrs["job"] for t in jobs.get_trials(states=(TrialState.COMPLETE,))]
        assert sorted(done) == sorted(set(done)) == list(range(len(done)))  # each job once
    return optuna.load_study(study_name=search[0], storage=storage)


def check_result(out: Path, workload: Path, study: optuna.Study | None = None, model: Path | None = None) -> None:
    """What a finished run must mean, however it got there (clean, resumed, interrupted, reused,
    several workers): plan.yaml re-applied gives model.qsearch.onnx byte for byte, the model scores
    what the plan says on test data, the plan meets the budget on search data, and a plan chosen
    from a trial is that completed trial's plan."""
    from qsearch.cli import main
    from qsearch.plan.io import read_plan

    plan = read_plan(out / "plan.yaml")
    again = out.parent / f"{out.name}-reapplied.onnx"
    model = model or workload.parent / "model.onnx"  # (a PyTorch factory's: the exported file)
    assert main(["apply", str(out / "plan.yaml"), str(model), "-o", str(again)]) == 0
    assert again.read_bytes() == (out / "model.qsearch.onnx").read_bytes()
    m = plan.metrics
    assert m["fp32"]["search"] - m["plan"]["search"] <= m["max_drop"] + 1e-12
    from qsearch.commands import run_evaluate

    r = run_evaluate(str(out / "model.qsearch.onnx"), str(workload), out.parent / f"{out.name}-eval")
    assert r.test == m["plan"]["test"] and r.search == m["plan"]["search"]
    trial = plan.provenance.get("trial")
    if study is not None and trial is not None:
        t = study.trials[trial]
        assert t.state == TrialState.COMPLETE
        assert {n: plan.choice(n).label() for n in t.user_attrs["choices"]} == t.user_attrs["choices"]
    elif plan.provenance.get("chosen_from") == "baseline":  # naive INT8 or the greedy fallback won
        labels = {plan.choice(n).label().partition("@")[0] for n in plan.layers}  # (any weight encoding)
        assert labels <= {"int8/minmax/per_tensor", "fp32"} and "int8/minmax/per_tensor" in labels  # not all float
    else:  # no INT8 plan paid: FP32 ships, said in the report
        assert all(not plan.choice(n).quantized for n in plan.layers)
        assert "No INT8 plan within budget beats FP32" in (out / "report.md").read_text()


def _wait_for_running_trial(url: str, proc: subprocess.Popen, complete: int, timeout: float = 120,
                            own: bool = False, after: int = -1) -> int:
    """Poll the study until `complete` trials are done and another one (numbered above `after`) is
    running (`own`: one that `proc` runs); returns its number. The study is loaded once: a slow
    poll on a busy machine would miss the short windows of a running trial."""
    t = time.time()
    study = None
    while time.time() - t < timeout:
        assert proc.poll() is None, proc.communicate()
        try:
            study = study or _study(url)
            trials = study.get_trials(deepcopy=False)
        except Exception:  # the study is being created
            trials = []
        done = sum(tr.state in FINISHED for tr in trials)
        running = [tr.number for tr in trials if tr.state == TrialState.RUNNING and tr.params and tr.number > after
                   and (not own or tr.user_attrs.get("worker", "").endswith(f":{proc.pid}"))]
        if done >= complete and running:
            return running[0]
        time.sleep(0.01)
    raise AssertionError("the search never reached the expected trial")


def _snapshot(study: optuna.Study) -> dict[int, tuple]:
    return {t.number: (t.state, t.values, t.params) for t in study.trials if t.state in FINISHED}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_killed_search_resumes_keeping_every_finished_trial(sig, workload, tmp_path):
    out = tmp_path / "run"
    budget = 30
    proc = _optimize(workload, out, budget)
    _wait_for_running_trial(f"sqlite:///{out / 'study.db'}", proc, complete=3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:  # Ctrl-C and a scheduler's SIGTERM: clean exit, one line, no traceback
        assert proc.returncode == 130, err
        assert "interrupted" in err and "Traceback" not in err
    url = f"sqlite:///{out / 'study.db'}"
    before = _snapshot(_study(url))
    lost = [t for t in _study(url).trials if t.state in (TrialState.RUNNING, TrialState.FAIL)]
    assert len(lost) <= 1  # the trial in flight when the signal came (if it had not just finished)
    assert not (out / "plan.yaml").exists()  # nothing half-written: the plan comes only at the end

    proc = _optimize(workload, out, budget)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    study = _study(url)
    after = _snapshot(study)
    assert all(after[n] == v for n, v in before.items())  # every finished trial kept as it was
    assert len(after) == budget
    n_layers = max(len(t.params) for t in study.trials if t.state in FINISHED)
    for t in lost:
        assert study.trials[t.number].state == TrialState.FAIL
        retry = [r for r in study.trials if r.user_attrs.get("retry_of") == t.number]
        # the interrupted plan ran again, once; a trial killed before its sampler had drawn every
        # layer has no plan to redo (an enqueued warm-start trial always has one)
        plan = t.system_attrs.get("fixed_params") or t.params
        assert len(retry) == (1 if len(plan) == n_layers else 0)
        assert all(r.state in FINISHED and r.params == plan for r in retry)
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    check_result(out, workload, study)


def _check_shared(study: optuna.Study, budget: int, workers: int) -> None:
    finished = [t for t in study.trials if t.state in FINISHED]
    # each worker stops once the study holds `budget` finished trials; trials already running finish
    assert budget <= len(finished) <= budget + workers - 1
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING, TrialState.FAIL)]
    assert len({t.number for t in study.trials}) == len(study.trials)
    # the enqueued warm-start plans ran once each, not once per worker
    warm = [tuple(sorted(t.params.items())) for t in study.trials if t.system_attrs.get("fixed_params")]
    assert len(warm) == len(set(warm))


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_two_workers_share_one_study(kind, workload, tmp_path):
    budget, workers = 12, 2
    out = tmp_path / "shared"
    extra = [] if kind == "sqlite" else ["--storage", f"journal:{tmp_path / 'study.journal'}"]
    procs = [_optimize(workload, out, budget, *extra) for _ in range(workers)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    url = f"sqlite:///{out / 'study.db'}" if kind == "sqlite" else None
    if url:
        study = _study(url)
    else:
        from optuna.storages.journal import JournalFileBackend

        st = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "study.journal")))
        study = _study(st)
    _check_shared(study, budget, workers)
    check_result(out, workload, study)


def _postgres_bin() -> Path | None:
    dirs = [*sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)]
    if shutil.which("initdb"):
        dirs.append(Path(shutil.which("initdb")).parent)
    for d in dirs:
        if all((d / tool).exists() for tool in ("initdb", "pg_ctl", "createdb")):
            return d
    return None


def _unavailable(why: str) -> None:
    """Skip where PostgreSQL cannot run, except in CI (`QSEARCH_REQUIRE_POSTGRES=1`): there it fails."""
    if os.environ.get("QSEARCH_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"QSEARCH_REQUIRE_POSTGRES=1 but {why}")
    pytest.skip(why)


def test_two_workers_on_postgresql_one_killed_mid_trial(tmp_path):
    """A real PostgreSQL server on loopback (started here, as the `postgres` user when we are root),
    two `optimize` workers on one study, one killed while it runs a trial: the other finishes, the
    killed trial is failed by its stale heartbeat and its plan run again once, nothing is lost or
    duplicated."""
    bindir = _postgres_bin()
    if bindir is None:
        _unavailable("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    try:
        import psycopg  # noqa: F401  (the PostgreSQL driver SQLAlchemy uses)
    except ImportError:
        _unavailable("psycopg is not installed")
    # more samples than the other tests: trials long enough (~0.3 s) to be killed inside one
    workload = write_workload(tmp_path / "w", make_cnn(outlier_layer="conv_b"), n=1024)
    with _postgres(bindir, tmp_path) as url:
        budget, env = 24, {"QSEARCH_HEARTBEAT_S": "1"}  # stale after 3 s, while the other still runs trials
        procs = [_optimize(workload, tmp_path / f"out{i}", budget, "--storage", url, env=env) for i in range(2)]
        _kill_inside_a_trial(url, procs[0])
        _, err = procs[1].communicate(timeout=300)
        assert procs[1].returncode == 0, err
        study = _study(url)
        killed = [t for t in study.trials if t.user_attrs.get("worker", "").endswith(f":{procs[0].pid}")
                  and t.state == TrialState.FAIL]
        assert len(killed) == 1, " ".join(f"{t.number}:{t.state.name[:4]}:{t.user_attrs.get('worker', '-')}" for t in study.trials) + f" killed {procs[0].pid}"
        retries = [t for t in study.trials
                   if optuna.storages.RetryFailedTrialCallback.retried_trial_number(t) == killed[0].number]
        # run again once, with what it had drawn (a trial killed while its sampler drew draws the rest anew)
        assert len(retries) == 1 and retries[0].state in FINISHED
        assert killed[0].params.items() <= retries[0].params.items()
        finished = [t for t in study.trials if t.state in FINISHED]
        assert budget <= len(finished) <= budget + 1
        assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        assert len({t.number for t in study.trials}) == len(study.trials)
        warm = [tuple(sorted(t.params.items())) for t in study.trials if t.system_attrs.get("fixed_params")
                and optuna.storages.RetryFailedTrialCallback.retried_trial_number(t) is None]
        assert len(warm) == len(set(warm))  # each warm-start plan ran once, not once per worker
        check_result(tmp_path / "out1", workload, study)


def _kill_inside_a_trial(url: str, proc: subprocess.Popen, tries: int = 20) -> None:
    """SIGKILL `proc` while one of its trials runs. A trial seen running may finish before a signal
    lands (a pruned one lasts milliseconds), so the worker is frozen first (SIGSTOP), the trial's
    state read again, and the worker killed only if the trial is still running; else it resumes."""
    seen = -1
    for _ in range(tries):
        seen = _wait_for_running_trial(url, proc, complete=3, own=True, after=seen)
        proc.send_signal(signal.SIGSTOP)
        state = _study(url).trials[seen].state
        if state == TrialState.RUNNING:
            proc.kill()
            proc.communicate(timeout=60)
            return
        proc.send_signal(signal.SIGCONT)
    raise AssertionError(f"no trial of worker {proc.pid} was still running when frozen, in {tries} tries")


@contextlib.contextmanager
def _postgres(bindir: Path, tmp_path: Path):
    """A PostgreSQL server on a free loopback port with an empty database; yields its URL."""
    as_user: list = []
    data = tmp_path / "pg"
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        if shutil.which("runuser") is None:
            _unavailable("running as root without runuser to start PostgreSQL as another user")
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            _unavailable("running as root and there is no 'postgres' user to start the server as")
        as_user = ["runuser", "-u", "postgres", "--"]
        data = Path(tempfile.mkdtemp(prefix="qsearch-pg-"))
        os.chown(data, pw.pw_uid, pw.pw_gid)
    subprocess.run([*as_user, bindir / "initdb", "-D", data, "-U", "qsearch", "--auth=trust"], check=True,
                   capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*as_user, bindir / "pg_ctl", "-D", data, "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1",
                    "-l", data / "pg.log", "-w", "start"], check=True, capture_output=True)
    try:
        subprocess.run([bindir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "qsearch", "studies"],
                       check=True, capture_output=True)
        yield f"postgresql://qsearch@127.0.0.1:{port}/studies"
    finally:
        subprocess.run([*as_user, bindir / "pg_ctl", "-D", data, "-m", "fast", "stop"], capture_output=True)
        if as_user:
            shutil.rmtree(data, ignore_errors=True)
