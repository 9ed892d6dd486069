"""Where studies live and how workers share work: storage URLs, lock files, the analysis job queue.

A study's storage is any Optuna storage (SQLite file by default, PostgreSQL/MySQL, a journal file,
Redis). Workers on one local file tell live peers from dead ones by lock files. The analysis
(calibration parts, forms, proxy passes, the profile, the screen) runs as *jobs*: enqueued trials of
sibling Optuna studies that Optuna hands to exactly one worker each, so several workers split the
analysis and a resumed run finds finished jobs in storage.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import TrialState

from qsearch.errors import INTERRUPTED, QsearchError


def sqlite_url(path: Path) -> str:
    """SQLite URL of a local file; '?', '#' and '%' in the path are escaped so the study lands in
    that file and not in one named by a truncated path."""
    from urllib.parse import quote

    return "sqlite:///" + quote(str(path.resolve()), safe="/")


def worker_id() -> str:
    """This worker as a trial records it: host and process id (several machines share a study)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def heartbeat() -> tuple[int, int]:
    """(interval, grace period) in seconds of trial heartbeats in database storages: a worker killed
    mid-trial leaves its trial RUNNING until another worker sees its heartbeat `grace` seconds
    old, fails it and retries its plan. `QSEARCH_HEARTBEAT_S` sets the interval (grace: 3x):
    shorter for short trials, longer on a slow network."""
    raw = os.environ.get("QSEARCH_HEARTBEAT_S", "").strip()
    if not raw:
        return 30, 90
    if not raw.isdigit() or not 1 <= int(raw) <= 3600:
        raise QsearchError(f"QSEARCH_HEARTBEAT_S: {raw[:40]!r} is not a whole number of seconds in [1, 3600]")
    return int(raw), 3 * int(raw)


def is_server(url: str) -> bool:
    """A database server several machines share: no file lock tells live workers from dead ones,
    the trials' heartbeats do."""
    return url.startswith(("postgresql", "mysql"))


def settle(study: optuna.Study, retry: Callable[[], None], until: float | None = None) -> int:
    """After this worker's last trial, on a database server (`is_server`): wait while another
    worker's trial is RUNNING. One whose worker died (heartbeat older than the grace period) is
    failed and its plan, re-queued by the storage's retry callback, is run here by `retry()` (one
    trial), so a killed worker loses no trial even when the others finish first. Waits at most the
    grace period plus two intervals, and never past `until` (`time.monotonic()`). Returns the
    trials retried."""
    from optuna.storages import RetryFailedTrialCallback, fail_stale_trials

    interval, grace = heartbeat()
    stop = time.monotonic() + grace + 2 * interval
    stop = stop if until is None else min(stop, until)
    retried = 0
    while time.monotonic() < stop and not INTERRUPTED.is_set():
        fail_stale_trials(study)
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if any(RetryFailedTrialCallback.retried_trial_number(t) is not None for t in waiting):
            retry()  # (the oldest waiting trial first: an enqueued plan may run before the retry)
            retried += 1
            continue
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            break
        time.sleep(min(interval, 1.0))
    return retried


def open_storage(url: str | None, out: Path):
    if url is None:
        out.mkdir(parents=True, exist_ok=True)
        url = sqlite_url(out / "study.db")
    try:
        if url.startswith(("sqlite:", "postgresql", "mysql")):
            interval, grace = heartbeat()
            for attempt in range(5):
                try:
                    st = optuna.storages.RDBStorage(
                        url, heartbeat_interval=interval, grace_period=grace,
                        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
                    )
                    if url.startswith("sqlite:"):
                        _serialize_sqlite(st.engine)
                    return st
                except Exception as exc:  # workers starting together race to create the schema: retry
                    if attempt == 4 or not any(m in str(exc) for m in ("already exists", "UNIQUE constraint",
                                                                       "database is locked")):
                        raise
                    time.sleep(0.2 * (attempt + 1))
        if url.startswith("journal:") or url.endswith((".log", ".journal")):
            path = url.removeprefix("journal:")
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(path))
        if url.startswith("redis://"):
            from optuna.storages.journal import JournalRedisBackend

            return optuna.storages.JournalStorage(JournalRedisBackend(url))
    except ImportError:
        driver = {"postgresql": "psycopg[binary]", "mysql": "pymysql", "redis": "redis"}.get(url.split(":")[0].split("+")[0])
        raise QsearchError(f"storage '{url}' needs a database driver that is not installed"
                           + (f": pip install '{driver}'" if driver else "")) from None
    except QsearchError:
        raise
    except Exception as exc:
        raise QsearchError(f"storage '{url}' cannot be opened: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    raise QsearchError(f"storage '{url}' is not a supported Optuna storage URL (sqlite:///, postgresql://, "
                       "mysql://, journal:FILE, redis://)")



def _serialize_sqlite(engine) -> None:
    """Make every SQLite transaction take the write lock up front (BEGIN IMMEDIATE).

    Optuna hands a waiting (enqueued) trial to a worker by reading its state and then updating
    it; on SQLite, which ignores SELECT ... FOR UPDATE, two workers can both read WAITING and both
    run the same trial. Immediate transactions serialize that read-then-write (the SQLAlchemy
    recipe for pysqlite isolation)."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # let the "begin" hook below issue BEGIN itself

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the hooks would still begin lazily



def storage_label(url: str) -> str:
    """A storage URL as a shared plan may show it: the file name of a local study, the scheme and
    database of a server (no path, host or password)."""
    local = storage_file(url)
    if local is not None:
        return local.name
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}:{parts.path.rsplit('/', 1)[-1]}" if parts.scheme else "storage"



def storage_file(url: str) -> Path | None:
    """The local file behind a SQLite or journal-file storage URL (None for server storages)."""
    if url.startswith("sqlite:///"):
        from urllib.parse import unquote

        p = unquote(url.removeprefix("sqlite:///").split("?")[0])
        return None if p in ("", ":memory:") else Path(p)
    if url.startswith("journal:") or url.endswith((".log", ".journal")):
        return Path(url.removeprefix("journal:"))
    return None



def check_study(storage: str | None, out: Path, name: str, key: str) -> None:
    """Before any work: the storage URL opens and a study of that name, if it exists, was made
    for this model, data, metric, budget, space and target (else a one-line error)."""
    st = open_storage(storage, out)
    lock = storage_file(storage or sqlite_url(out / "study.db"))
    if lock is not None:  # the lock file goes next to a file storage: prove it can, before any work
        os.close(open_lock_file(lock.with_name(lock.name + ".workers.lock")))
    try:
        summaries = optuna.study.get_all_study_summaries(st, include_best_trial=False)
    except Exception as exc:
        raise QsearchError(f"storage {storage or sqlite_url(out / 'study.db')}: cannot read the studies in it: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    for s in summaries:
        if s.study_name == name:
            check_owner(name, s.user_attrs.get("study_key"), key)


def check_owner(name: str, owner, key: str) -> None:
    if owner not in (None, key):
        raise QsearchError(f"study '{name}' was made for another model, data, metric, budget, search "
                           f"space or target (key {str(owner)[:12]}, this run {key[:12]}); pick another --study "
                           "or --out")



_LIVENESS: dict[Path, tuple[Path, int]] = {}


def open_lock_file(path: Path) -> int:
    """A lock file next to the study, or a one-line error naming it (a folder or an unwritable
    place where it goes)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise QsearchError(f"{path}: cannot create the study's lock file there ({exc.strerror or exc}); "
                           "remove what is in the way or pick another --out/--storage") from None


def hold_worker_lock(path: Path) -> tuple[int, bool]:
    """Every worker on a file study holds a shared lock on `path` (the study's `.workers.lock`) and
    its own liveness file next to the study (`_liveness_file`), both for its whole life. A worker
    that finds no other live one knows RUNNING trials are orphans of a killed process. Returns
    (the held file descriptor, whether this worker is alone)."""
    import fcntl

    fd = open_lock_file(path)
    fcntl.flock(fd, fcntl.LOCK_SH)  # never converted: see `still_alone`
    return fd, still_alone(path)


def still_alone(path: Path) -> bool:
    """Whether no other worker on the study of `path` (its `.workers.lock`) is alive: every other
    liveness file next to the study can be locked, so its process is gone. (Upgrading a shared
    flock instead is unsafe: Linux drops the shared lock when the upgrade fails, so a live worker
    could lose its hold and be taken for dead, its running trial failed under it.)"""
    study = path.with_name(path.name.removesuffix(".workers.lock"))
    me = _liveness_file(study)
    return not any(other != me and _alive(other) for other in study.parent.glob(f".{study.name}.worker-*.alive"))


def _alive(path: Path) -> bool:
    """Whether the process owning liveness file `path` still runs (it holds the file locked); a
    dead one's file is removed."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    path.unlink(missing_ok=True)
    return False


def _liveness_file(lock: Path | None) -> Path | None:
    """This process's liveness file next to a file storage, locked exclusively for the process's
    whole life: other workers tell a job of a killed worker from a slow one by trying its lock."""
    if lock is None:
        return None
    if lock not in _LIVENESS:
        import atexit
        import fcntl

        path = lock.with_name(f".{lock.name}.worker-{socket.gethostname()}-{os.getpid()}.alive")
        # locked under a temporary name, then renamed: no other worker ever sees it unlocked
        tmp = path.with_name(path.name + ".new")
        fd = open_lock_file(tmp)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.replace(tmp, path)
        _LIVENESS[lock] = (path, fd)
        atexit.register(lambda: path.unlink(missing_ok=True))
    return _LIVENESS[lock][0]


class StudyQueue:
    """Analysis jobs as enqueued trials of an Optuna study in the run's storage: Optuna hands each
    waiting trial to exactly one worker (atomically; see `_serialize_sqlite`), results stay in the
    storage, so several workers split the analysis and a resumed run redoes nothing."""

    def __init__(self, storage: str | None, out: Path, name: str):
        self.study_name = name
        self._where = (storage, out)
        st = open_storage(storage, out)
        self.lock_file = storage_file(storage or sqlite_url(out / "study.db"))
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        try:
            self.study = optuna.create_study(storage=st, study_name=name, load_if_exists=False)
            self.created = True
        except optuna.exceptions.DuplicatedStudyError:
            self.study = optuna.load_study(storage=st, study_name=name)
            self.created = False

    def stage(self, suffix: str) -> StudyQueue:
        """A sibling queue in the same storage for another stage of jobs (one study per stage:
        a stage's jobs can depend on the results of the one before)."""
        return StudyQueue(*self._where, f"{self.study_name}-{suffix}")

    def _done(self) -> dict[int, tuple]:
        from optuna.trial import TrialState

        return {t.user_attrs["job"]: tuple(t.user_attrs["result"])
                for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "result" in t.user_attrs}

    def _take_waiting(self, run: Callable) -> bool:
        """Run one waiting job if there is one (Optuna hands it to this worker alone)."""
        from optuna.trial import TrialState

        if not self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return False
        with warnings.catch_warnings():  # heartbeats are for optimize(); ask() works without them
            warnings.simplefilter("ignore", UserWarning)
            trial = self.study.ask()
        i = trial.user_attrs.get("job")
        if i is None:  # another worker took the last one between the look and the ask
            self.study.tell(trial, state=TrialState.FAIL)
            return False
        trial.suggest_int("job", i, i)
        run(trial, i)
        return True

    def map(self, jobs: list[dict], fn: Callable[[dict], tuple], progress: Callable | None = None,
            wait_s: float = 600.0, what: str = "screen") -> list[tuple]:
        return self._map(jobs, fn, progress, wait_s, what)

    def _owner_alive(self, owner: str | None) -> bool:
        """Whether the worker that took a job still runs: it holds its liveness file locked for
        as long as it lives (file storages; elsewhere the job is trusted until `wait_s`)."""
        if owner is None or self.lock_file is None:
            return True
        return _alive(Path(owner))

    def _map(self, jobs, fn, progress, wait_s, what) -> list[tuple]:
        from optuna.trial import TrialState

        if self.created:
            for i in range(len(jobs)):
                self.study.enqueue_trial({"job": i}, user_attrs={"job": i})
        done = self._done()
        if progress is not None:
            progress(len(done), len(jobs), what)

        me = _liveness_file(self.lock_file)

        def run(trial, i: int) -> None:
            if me is not None:
                trial.set_user_attr("owner", str(me))
            try:
                if INTERRUPTED.is_set():
                    raise KeyboardInterrupt
                r = fn(jobs[i])
            except BaseException:  # interrupted or failed: the job goes back to whoever runs next
                self.study.tell(trial, state=TrialState.FAIL)
                raise
            trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
            trial.set_user_attr("result", list(r))
            self.study.tell(trial, 0.0)
            done[i] = tuple(r)
            if progress is not None:
                progress(len(done), len(jobs), what)

        deadline = time.monotonic() + wait_s
        while True:
            if self._take_waiting(run):  # (the creating worker may still be enqueuing)
                continue
            states: dict[int, set] = {}
            for t in self.study.get_trials(deepcopy=False):
                state = t.state
                if state == TrialState.RUNNING and not self._owner_alive(t.user_attrs.get("owner")):
                    state = TrialState.FAIL  # its worker was killed
                states.setdefault(t.user_attrs.get("job"), set()).add(state)
            done.update(self._done())
            missing = [i for i in range(len(jobs)) if i not in done]
            if not missing:
                break
            # a job is lost when its only trials failed (an interrupted or killed worker) or after
            # `wait_s`; then this worker runs it
            held = {TrialState.RUNNING, TrialState.WAITING}
            lost = [i for i in missing if time.monotonic() > deadline or (states.get(i) and not states[i] & held)]
            if not lost:
                time.sleep(0.5)
                continue
            for i in lost:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    trial = self.study.ask({"job": optuna.distributions.IntDistribution(i, i)})
                trial.set_user_attr("job", i)
                run(trial, i)
        return [done[i] for i in range(len(jobs))]

