"""The mixed-precision search: an Optuna study over per-layer choices, guided by sensitivity.

The pieces are separable, the way Optuna's samplers are:
- `choose_fixed`: which layers are fixed to INT8 before the search. Only layers whose INT8 form
  pays (measured latency attribution) and whose summed output noise is small; the candidate set
  is then *scored together* with the user's metric, and shrunk until its joint drop uses at most
  `fix_below` of the budget (single-layer drops below a metric's resolution hide compounding).
- `build_dimensions`: one categorical per remaining layer (its best INT8 options, float).
- `warm_start_plans`: FP32-in-the-searched-layers, "INT8 only where it pays", the best all-INT8
  plan, additive noise-model knapsacks (benefit per unit of output noise within shrinking noise
  budgets calibrated by the all-INT8 measurement), k noisiest layers float.
- `repair`: when no trial meets the budget, revert INT8 layers of the closest trial by measured
  noise per benefit, doubling then bisecting, each step scored; FP32 always meets a budget.
The accuracy budget is an Optuna constraint; hopeless trials are pruned after a slice of the data.
A trial never recalibrates: plan -> rewrite with cached ranges -> session -> score.
"""

from __future__ import annotations

import math
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna

from qsearch import limits
from qsearch.errors import INTERRUPTED, QsearchError
from qsearch.plan import LayerChoice, Plan
from qsearch.scoring import latency_ms, make_session, model_size
from qsearch.sensitivity import SensitivityProfile

# heartbeats and stale-trial retries are what make interrupted runs resumable; they are stable
# enough for us even though Optuna still labels them experimental
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

BITS = {"int8": 8, "fp16": 16, "fp32": 32}


@dataclass(frozen=True)
class Dimensions:
    fixed: dict[str, str]  # layer -> option label, not searched
    searched: dict[str, tuple[str, ...]]  # layer -> option labels, best first, float last


@dataclass(frozen=True)
class TrialResult:
    number: int
    choices: dict[str, str]
    score: float
    drop: float
    cost: float
    latency_ms: float
    size_bytes: int
    bitops: float
    feasible: bool


@dataclass(frozen=True)
class FixDecision:
    """Layers fixed to INT8 before the search, and the measurements that justify it."""

    fixed: tuple[str, ...]
    joint_drop: float | None  # user metric, whole search data: the fixed set alone INT8
    all_int8_drop: float | None  # every candidate INT8 at its best option
    evaluations: int


def benefit(ctx, s) -> float:
    """What a layer saves in INT8, in the objective's units (measured ms for latency)."""
    objective = ctx.workload.space.objective
    if objective == "latency":
        return s.gain_ms
    if objective == "size":
        return 0.75 * s.weight_bytes
    return s.macs * (32 * 32 - 8 * 8) / 1e9


def choose_fixed(ctx, profile: SensitivityProfile, allowed: float, measure: Callable[[dict], float]) -> FixDecision:
    """Fix the quietest paying layers to INT8, but only as a set whose *measured* joint drop uses
    at most `fix_below` of the budget. `measure(choices)` scores a plan on the whole search data."""
    space = ctx.workload.space
    if "int8" not in space.precisions or "float" not in space.precisions:
        return FixDecision((), None, None, 0)
    layers = [_layer(profile, la.name) for la in ctx.candidates()]
    best = {x.name: x.best_option for x in layers}
    all_drop = measure(best)
    evaluations = 1
    share = space.fix_below * allowed
    noisiest = {x.name for x in sorted(layers, key=lambda x: (-x.noise, x.name))[: space.min_searched]}
    cands = sorted((x for x in layers if benefit(ctx, x) > 0 and x.name not in noisiest),
                   key=lambda x: (x.noise, x.name))
    total = sum(x.noise for x in layers)
    # if the drop grows with the output noise power, `share` buys this much of the all-INT8 noise
    limit = total if all_drop <= share else total * max(share, 0.0) / all_drop
    for _ in range(6):
        chosen, acc = [], 0.0
        for x in cands:
            if acc + x.noise > limit:
                break
            acc += x.noise
            chosen.append(x.name)
        if not chosen:
            break
        drop = all_drop if len(chosen) == len(layers) else measure({n: best[n] for n in chosen})
        evaluations += len(chosen) != len(layers)
        if drop <= share:
            return FixDecision(tuple(chosen), drop, all_drop, evaluations)
        limit = acc / 2
    return FixDecision((), None, all_drop, evaluations)


def build_dimensions(ctx, profile: SensitivityProfile, fixed_int8: tuple[str, ...] = ()) -> Dimensions:
    space = ctx.workload.space
    fp = LayerChoice(ctx.float_precision).label()
    fixed, searched = {}, {}
    for la in ctx.candidates():
        options = _layer(profile, la.name).ranked_options()[: space.options_per_layer]
        if "int8" not in space.precisions:
            fixed[la.name] = fp
        elif "float" not in space.precisions or la.name in fixed_int8:
            fixed[la.name] = options[0]
        else:
            searched[la.name] = (*options, fp)
    return Dimensions(fixed, searched)


def _layer(profile: SensitivityProfile, name: str):
    try:
        return profile.layer(name)
    except StopIteration:
        raise QsearchError(f"sensitivity profile has no entry for layer '{name}' (re-run analyze)") from None


def bitops(ctx, choices: dict[str, str]) -> float:
    """Analytic cost for targets we cannot time: MACs x weight bits x activation bits (GBOPs)."""
    total = 0.0
    for la in ctx.prepared.layers:
        c = LayerChoice.parse(choices.get(la.name, ctx.float_precision))
        b = BITS[c.precision]
        total += la.macs * b * b
    return total / 1e9


def sqlite_url(path: Path) -> str:
    """SQLite URL of a local file; '?', '#' and '%' in the path are escaped so the study lands in
    that file and not in one named by a truncated path."""
    from urllib.parse import quote

    return "sqlite:///" + quote(str(path.resolve()), safe="/")


def _storage(url: str | None, out: Path):
    if url is None:
        out.mkdir(parents=True, exist_ok=True)
        url = sqlite_url(out / "study.db")
    try:
        if url.startswith(("sqlite:", "postgresql", "mysql")):
            for attempt in range(5):
                try:
                    st = optuna.storages.RDBStorage(
                        url, heartbeat_interval=30, grace_period=90,
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


def _check_interrupt(study, trial) -> None:
    if INTERRUPTED.is_set():  # a signal whose KeyboardInterrupt was swallowed: stop between trials
        raise KeyboardInterrupt


def storage_label(url: str) -> str:
    """A storage URL as a shared plan may show it: the file name of a local study, the scheme and
    database of a server (no path, host or password)."""
    local = _storage_file(url)
    if local is not None:
        return local.name
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}:{parts.path.rsplit('/', 1)[-1]}" if parts.scheme else "storage"


def _storage_file(url: str) -> Path | None:
    """The local file behind a SQLite or journal-file storage URL (None for server storages)."""
    if url.startswith("sqlite:///"):
        from urllib.parse import unquote

        p = unquote(url.removeprefix("sqlite:///").split("?")[0])
        return None if p in ("", ":memory:") else Path(p)
    if url.startswith("journal:") or url.endswith((".log", ".journal")):
        return Path(url.removeprefix("journal:"))
    return None


def _sampler(ctx, n_dims: int, budget: int) -> optuna.samplers.BaseSampler:
    space = ctx.workload.space
    startup = max(4, min(10, budget // 5))
    if space.sampler == "tpe":
        return optuna.samplers.TPESampler(multivariate=True, seed=space.seed, n_startup_trials=startup)
    if space.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=space.seed,
                                             population_size=max(8, min(30, budget // 4)))
    if space.sampler == "random":
        return optuna.samplers.RandomSampler(seed=space.seed)
    if space.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=space.seed)
    try:
        return optuna.samplers.GPSampler(seed=space.seed, n_startup_trials=startup)
    except Exception as exc:
        raise QsearchError(f"sampler 'gp' is not usable here ({exc}); pick tpe, nsga2, random or qmc") from None


def check_study(storage: str | None, out: Path, name: str, key: str) -> None:
    """Before any work: the storage URL opens and a study of that name, if it exists, was made
    for this model, data, metric, budget, space and target (else a one-line error)."""
    st = _storage(storage, out)
    lock = _storage_file(storage or sqlite_url(out / "study.db"))
    if lock is not None:  # the lock file goes next to a file storage: prove it can, before any work
        os.close(open_lock_file(lock.with_name(lock.name + ".workers.lock")))
    try:
        summaries = optuna.study.get_all_study_summaries(st, include_best_trial=False)
    except Exception as exc:
        raise QsearchError(f"storage {storage or sqlite_url(out / 'study.db')}: cannot read the studies in it: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    for s in summaries:
        if s.study_name == name:
            _check_owner(name, s.user_attrs.get("study_key"), key)


def _check_owner(name: str, owner, key: str) -> None:
    if owner not in (None, key):
        raise QsearchError(f"study '{name}' was made for another model, data, metric, budget, search "
                           f"space or target (key {str(owner)[:12]}, this run {key[:12]}); pick another --study "
                           "or --out")


def default_study_name(ctx) -> str:
    return f"qsearch-{ctx.prepared.name}-{ctx.study_key()[:12]}"


class Search:
    def __init__(self, ctx, profile: SensitivityProfile, out: Path, storage: str | None = None,
                 study_name: str | None = None, log: Callable[[str], None] = lambda m: None):
        self.ctx, self.profile, self.out, self.log = ctx, profile, out, log
        self.allowed = ctx.allowed_drop()
        self.storage_url = storage or sqlite_url(out / "study.db")
        # the name binds the study to everything that defines its trials: another config, another study
        self.key = ctx.study_key()
        self.study_name = study_name or default_study_name(ctx)
        space = ctx.workload.space
        directions = ["maximize", "minimize"] if space.multi_objective else ["minimize"]
        self.study = self._open(storage, directions)
        _check_owner(self.study_name, self.study.user_attrs.get("study_key"), self.key)
        self.study.set_user_attr("study_key", self.key)
        self.study.set_user_attr("fingerprint", ctx.prepared.fingerprint)
        self.study.set_user_attr("fp32_search", ctx.baseline.fp32_search)
        self.study.set_user_attr("allowed_drop", self.allowed)
        self.study.set_metric_names(["score", space.objective] if space.multi_objective else [space.objective])
        self.scoring_seconds = 0.0
        self.trial_seconds = 0.0
        self.deadline: float | None = None
        self.evaluations = 0  # full evaluations this process spent outside trials (fixing, repair)
        self.decision = self._decision()
        self.dims = build_dimensions(ctx, profile, self.decision.fixed)
        self._lock_fd: int | None = None
        self._alone = False  # no other live worker on this study (known for file storages only)
        lock = _storage_file(self.storage_url)
        if lock is not None:  # a study in a local file: a lock tells live workers from dead ones
            self._lock(lock.with_name(lock.name + ".workers.lock"))  # not ".lock": the journal backend owns that

    def _decision(self) -> FixDecision:
        """The fixed set, measured once per study: kept in the study so a resumed run or another
        worker reuses it instead of measuring again."""
        saved = self.study.user_attrs.get("fix_decision")
        if isinstance(saved, dict):
            return FixDecision(tuple(saved["fixed"]), saved["joint_drop"], saved["all_int8_drop"], 0)
        decision = choose_fixed(self.ctx, self.profile, self.allowed, self.measure)
        self.study.set_user_attr("fix_decision", {"fixed": list(decision.fixed), "joint_drop": decision.joint_drop,
                                                  "all_int8_drop": decision.all_int8_drop,
                                                  "evaluations": decision.evaluations})
        return decision

    def measure(self, choices: dict[str, str]) -> float:
        """Metric drop of a plan (layers not named stay float) on the whole search data."""
        plan = self.ctx.plan({n: LayerChoice.parse(lbl) for n, lbl in choices.items()})
        score = self.ctx.search_scorer.score(make_session(self.ctx.rewriter(plan), self.ctx.workload.threads))
        self.evaluations += 1
        return self.ctx.baseline.fp32_search - score

    def _lock(self, path: Path) -> None:
        """Every worker on a file study holds a shared lock; a worker that can take it
        exclusively knows no other is alive, so RUNNING trials are orphans of a killed process."""
        import fcntl

        fd = open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except OSError:
            alone = False
        self._alone = alone
        if alone:
            self.recover(orphans=True)
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._lock_fd = fd

    def close(self) -> None:
        """Release this worker's hold on the study (a process that exits releases it anyway)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def recover(self, orphans: bool = False) -> int:
        """Re-run trials a previous run lost: interrupted ones (Ctrl-C/SIGTERM: FAIL without a
        recorded error) and, when `orphans`, RUNNING ones left by a killed process (marked FAIL). Each is retried
        once, with the same plan; completed trials are never touched. A trial lost before its plan
        was fully sampled holds nothing to redo. Returns how many are retried."""
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        retried = {t.user_attrs.get("retry_of") for t in trials}
        n = 0
        for t in trials:
            lost = t.state == TrialState.RUNNING and orphans
            if lost:
                self.study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
                self.study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            # a FAIL with no recorded error was interrupted: the signal can land anywhere, even
            # while Optuna records the trial, where no attribute can be added any more
            interrupted = t.state == TrialState.FAIL and "error" not in t.user_attrs
            # the plan: enqueued trials carry it whole; sampled ones only once every layer is drawn
            plan = t.system_attrs.get("fixed_params") or t.params
            if (lost or interrupted) and t.number not in retried \
                    and "retry_of" not in t.user_attrs and set(plan) == set(self.dims.searched):
                self.study.enqueue_trial(dict(plan), user_attrs={"retry_of": t.number})
                n += 1
        return n

    def _open(self, storage: str | None, directions: list[str]) -> optuna.Study:
        st = _storage(storage, self.out)
        sampler = _sampler(self.ctx, 0, 50)
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        try:
            # creating is atomic in every storage: exactly one worker creates, and only it warm-starts
            study = optuna.create_study(storage=st, study_name=self.study_name, directions=directions,
                                        sampler=sampler, load_if_exists=False)
            self.created = True
            return study
        except optuna.exceptions.DuplicatedStudyError:
            self.created = False
        except ValueError as exc:
            raise QsearchError(f"study '{self.study_name}': {exc}") from None
        try:
            return optuna.create_study(storage=st, study_name=self.study_name, directions=directions,
                                       sampler=sampler, load_if_exists=True)
        except ValueError as exc:
            raise QsearchError(f"study '{self.study_name}': {exc}") from None

    # ---------------------------------------------------------------- trials
    def choices(self, params: dict[str, str]) -> dict[str, str]:
        return {**self.dims.fixed, **params}

    def _objective(self, trial: optuna.Trial):
        try:
            with limits.limit(limits.remaining(self.deadline), "stopped at the --timeout deadline"):
                return self._trial(trial)
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            if INTERRUPTED.is_set():  # the signal surfaced as a library's error: still an interruption
                raise KeyboardInterrupt from exc
            # a real failure (ORT, bad plan): recorded, the search goes on, never retried
            trial.set_user_attr("error", f"{type(exc).__name__}: {str(exc)[:300]}")
            raise

    def _trial(self, trial: optuna.Trial):

        t0 = time.perf_counter()
        if INTERRUPTED.is_set():
            raise KeyboardInterrupt
        params = {n: trial.suggest_categorical(n, list(opts)) for n, opts in self.dims.searched.items()}
        choices = self.choices(params)
        plan = self.ctx.plan({n: LayerChoice.parse(lbl) for n, lbl in choices.items()})
        proto = self.ctx.rewriter(plan)
        sess = make_session(proto, self.ctx.workload.threads)
        scorer = self.ctx.search_scorer
        fp32 = self.ctx.baseline.fp32_search
        ts = time.perf_counter()
        if scorer.sliceable and self.ctx.workload.space.prune and scorer.batches >= 3:
            k = max(1, round(scorer.batches * self.ctx.workload.space.prune_fraction))
            head = scorer.partial(sess, 0, k)
            est = fp32 - scorer.finish(head)
            if est > self._prune_margin(head):
                trial.set_user_attr("drop_estimate", est)
                trial.set_constraint("max_drop", est - self.allowed)
                self.scoring_seconds += time.perf_counter() - ts
                self.trial_seconds += time.perf_counter() - t0
                raise optuna.TrialPruned(f"drop {est:.4f} on the first {k} batches")
            score = scorer.finish(head + scorer.partial(sess, k, scorer.batches))
        else:
            score = scorer.score(sess)
        lat = latency_ms(sess, self.ctx.latency_feed)
        self.scoring_seconds += time.perf_counter() - ts
        drop = fp32 - score
        size = model_size(proto)
        bops = bitops(self.ctx, choices)
        cost = {"latency": lat, "size": float(size), "bitops": bops}[self.ctx.workload.space.objective]
        for k, v in (("score", score), ("drop", drop), ("latency_ms", lat), ("size_bytes", size), ("bitops", bops),
                     ("cost", cost), ("constraint", drop - self.allowed)):
            trial.set_user_attr(k, v)
        trial.set_user_attr("choices", choices)
        trial.set_constraint("max_drop", drop - self.allowed)  # the accuracy budget, as Optuna's constraint
        self.trial_seconds += time.perf_counter() - t0
        return (score, cost) if self.ctx.workload.space.multi_objective else cost

    def _prune_margin(self, head: np.ndarray) -> float:
        """Prune only when the slice is clearly over budget: twice the budget plus 3 sigma of a
        binomial accuracy estimate on the slice (for top-1), so borderline plans finish."""
        margin = 2 * self.allowed
        if self.ctx.workload.metric.name == "top1" and head[1] > 0:
            p = max(min(head[0] / head[1], 1 - 1e-3), 1e-3)
            margin += 3 * math.sqrt(p * (1 - p) / head[1])
        return max(margin, 1e-9)

    def warm_start(self) -> int:
        """Enqueue `warm_start_plans` once per study: by the worker that created it or, when that
        run was interrupted before finishing (the study is marked only after the last plan), by the
        next worker that finds itself alone on the study: a resume after an interrupt right after
        the study was created still warm-starts."""
        done = self.study.user_attrs.get("warm_started")
        if not self.ctx.workload.space.warm_start or not self.dims.searched or done \
                or not (self.created or self._alone):
            return 0
        self.created = False
        plans = warm_start_plans(self.ctx, self.profile, self.dims, self.decision, self.allowed)
        for p in plans:
            self.study.enqueue_trial(p, skip_if_exists=True)
        self.study.set_user_attr("warm_started", True)
        return len(plans)

    def run(self, budget: int, deadline: float | None = None, progress: Callable | None = None) -> None:
        """Trials until `budget` are finished in the study or `deadline` (`time.monotonic()`) passes;
        a trial still scoring at the deadline is stopped (recorded as failed)."""
        self.deadline = deadline
        from optuna.study import MaxTrialsCallback
        from optuna.trial import TrialState

        if not self.dims.searched:
            # nothing to search: the profile already decides every layer; score that one plan
            budget = min(budget, 1)
        done = self.finished()
        if done >= budget:
            return
        if self._lock_fd is None:  # server storage: no lock; Optuna's heartbeat retries killed trials
            self.recover()
        self.warm_start()
        stop = MaxTrialsCallback(budget, states=(TrialState.COMPLETE, TrialState.PRUNED))
        callbacks = [stop, _check_interrupt]
        if progress is not None:
            callbacks.append(lambda study, trial: progress(study, trial))
        self.study.sampler = _sampler(self.ctx, len(self.dims.searched), budget)
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        timeout = None if deadline is None else max(deadline - time.monotonic(), 1e-3)
        self.study.optimize(self._objective, n_trials=budget - done, timeout=timeout, callbacks=callbacks,
                            catch=(Exception,), gc_after_trial=False)

    def repair(self, progress: Callable | None = None) -> int:
        """No trial met the budget: revert INT8 layers of the closest trial, most noise per unit of
        benefit first, in doubling steps, then bisect to keep as many INT8 as possible. Each step is
        a scored plan added to the study. FP32 (everything reverted) meets any budget. Returns the
        number of evaluations spent."""
        results = self.results()
        if not results or any(r.feasible for r in results):
            return 0
        start = min(results, key=lambda r: (r.drop, r.cost))
        fp = LayerChoice(self.ctx.float_precision).label()
        int8 = [n for n, lbl in start.choices.items() if LayerChoice.parse(lbl).is_int8]
        order = sorted(int8, key=lambda n: -_layer(self.profile, n).noise / max(benefit(self.ctx, _layer(self.profile, n)),
                                                                              1e-9))
        spent = 0

        def revert(k: int) -> TrialResult:
            nonlocal spent
            spent += 1
            choices = {**start.choices, **{n: fp for n in order[:k]}}
            r = self.record(choices, repair_of=start.number, reverted=k)
            if progress is not None:
                progress(f"repair: {k} of {len(order)} INT8 layers of trial {start.number} reverted, "
                         f"drop {r.drop:.4g} (budget {self.allowed:.4g})")
            return r

        lo, hi, k = 0, None, 1
        while hi is None:
            k = min(k, len(order))
            if revert(k).feasible:
                hi = k
            else:
                lo = k
                if k == len(order):
                    return spent  # even FP32 in every searched layer misses: only an impossible budget
                k *= 2
        while hi - lo > 1 and spent < 12:
            mid = (lo + hi) // 2
            if revert(mid).feasible:
                hi = mid
            else:
                lo = mid
        return spent

    def record(self, choices: dict[str, str], **attrs) -> TrialResult:
        """Score a plan outside the sampler (repair) and add it to the study as a finished trial."""
        from optuna.distributions import CategoricalDistribution
        from optuna.trial import create_trial

        t0 = time.perf_counter()
        plan = self.ctx.plan({n: LayerChoice.parse(lbl) for n, lbl in choices.items()})
        proto = self.ctx.rewriter(plan)
        sess = make_session(proto, self.ctx.workload.threads)
        score = self.ctx.search_scorer.score(sess)
        lat = latency_ms(sess, self.ctx.latency_feed)
        self.evaluations += 1
        drop = self.ctx.baseline.fp32_search - score
        size, bops = model_size(proto), bitops(self.ctx, choices)
        cost = {"latency": lat, "size": float(size), "bitops": bops}[self.ctx.workload.space.objective]
        params = {n: choices[n] for n in self.dims.searched if choices.get(n) in self.dims.searched[n]}
        user = {"score": score, "drop": drop, "latency_ms": lat, "size_bytes": size, "bitops": bops, "cost": cost,
                "constraint": drop - self.allowed, "choices": choices, **attrs}
        trial = create_trial(
            params=params, distributions={n: CategoricalDistribution(list(self.dims.searched[n])) for n in params},
            values=[score, cost] if self.ctx.workload.space.multi_objective else [cost], user_attrs=user,
            system_attrs={"constraints": [drop - self.allowed]},
        )
        self.study.add_trial(trial)
        self.trial_seconds += time.perf_counter() - t0
        number = self.study.get_trials(deepcopy=False)[-1].number
        return TrialResult(number, choices, score, drop, cost, lat, size, bops, drop <= self.allowed + 1e-12)

    def finished(self) -> int:
        from optuna.trial import TrialState

        return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in self.study.trials)

    # ---------------------------------------------------------------- results
    def results(self) -> list[TrialResult]:
        from optuna.trial import TrialState

        out = []
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            a = t.user_attrs
            if "score" not in a:
                continue
            out.append(TrialResult(t.number, dict(a["choices"]), a["score"], a["drop"], a["cost"], a["latency_ms"],
                                   a["size_bytes"], a["bitops"], a["drop"] <= self.allowed + 1e-12))
        return out

    def best(self) -> TrialResult | None:
        feasible = [r for r in self.results() if r.feasible]
        if not feasible:
            return None
        # costs within 2% are within timing noise: among those, prefer the more accurate plan
        floor = min(r.cost for r in feasible)
        near = [r for r in feasible if r.cost <= floor * 1.02]
        return max(near, key=lambda r: (r.score, -r.cost, -r.number))

    def finalists(self, n: int = 3) -> list[TrialResult]:
        """The `n` cheapest feasible trials: each trial's latency was timed once, alone, so the
        cheapest is a noisy argmin; the final choice re-times these side by side."""
        return sorted((r for r in self.results() if r.feasible), key=lambda r: (r.cost, -r.score, r.number))[:n]

    def failures(self) -> list[str]:
        """The recorded errors of failed trials, oldest first."""
        from optuna.trial import TrialState

        return [t.user_attrs["error"] for t in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                if "error" in t.user_attrs]

    def closest(self, n: int = 3) -> list[TrialResult]:
        return sorted(self.results(), key=lambda r: (r.drop, r.cost))[:n]

    def pareto(self) -> list[TrialResult]:
        """Non-dominated trials on (score up, cost down), cheapest first."""
        rs = sorted(self.results(), key=lambda r: (r.cost, -r.score))
        front, best_score = [], -math.inf
        for r in rs:
            if r.score > best_score + 1e-12:
                front.append(r)
                best_score = r.score
        return front

    def plan_for(self, r: TrialResult) -> Plan:
        plan = self.ctx.plan({n: LayerChoice.parse(lbl) for n, lbl in r.choices.items()})
        return plan.with_info(study=self.study_name, trial=r.number)


_LIVENESS: dict[Path, tuple[Path, int]] = {}


def open_lock_file(path: Path) -> int:
    """A lock file next to the study, or a one-line error naming it (a folder or an unwritable
    place where it goes)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise QsearchError(f"{path}: cannot create the study's lock file there ({exc.strerror or exc}); "
                           "remove what is in the way or pick another --out/--storage") from None


def _liveness_file(lock: Path | None) -> Path | None:
    """This process's liveness file next to a file storage, locked exclusively for the process's
    whole life: other workers tell a job of a killed worker from a slow one by trying its lock."""
    if lock is None:
        return None
    if lock not in _LIVENESS:
        import atexit
        import fcntl

        path = lock.with_name(f".{lock.name}.worker-{socket.gethostname()}-{os.getpid()}.alive")
        fd = open_lock_file(path)
        fcntl.flock(fd, fcntl.LOCK_EX)
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
        st = _storage(storage, out)
        self.lock_file = _storage_file(storage or sqlite_url(out / "study.db"))
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
        import fcntl

        try:
            fd = os.open(owner, os.O_RDWR)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
        Path(owner).unlink(missing_ok=True)  # a killed worker's file: nobody needs it any more
        return False

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


def warm_start_plans(ctx, profile: SensitivityProfile, dims: Dimensions, decision: FixDecision,
                     allowed: float) -> list[dict[str, str]]:
    """First trials (over the searched layers), most informative first: "INT8 only where it pays",
    the best all-INT8 plan, additive noise-model plans, FP32 in every searched layer, then the k
    noisiest layers float. The additive model: output noise powers of independent layer errors
    add, and the drop grows with the total noise; the all-INT8 measurement calibrates how much
    noise the budget buys, and layers go INT8 in order of benefit per unit of noise."""
    fp = LayerChoice(ctx.float_precision).label()
    searched = dims.searched
    best = {n: opts[0] for n, opts in searched.items()}
    sens = {n: _layer(profile, n) for n in searched}
    pays = {n: best[n] if benefit(ctx, sens[n]) > 0 else fp for n in searched}
    plans = [pays, best]
    fixed_noise = sum(_layer(profile, n).noise for n in dims.fixed if LayerChoice.parse(dims.fixed[n]).is_int8)
    total = sum(x.noise for x in profile.layers)
    all_drop = decision.all_int8_drop
    for share in (1.0, 0.5, 0.25):
        limit = total if all_drop is None or all_drop <= share * allowed else total * share * allowed / all_drop
        plan, acc = {}, fixed_noise
        for n in sorted(searched, key=lambda n: -benefit(ctx, sens[n]) / max(sens[n].noise, 1e-12)):
            ok = benefit(ctx, sens[n]) > 0 and acc + sens[n].noise <= limit
            plan[n] = best[n] if ok else fp
            acc += sens[n].noise if ok else 0.0
        plans.append(plan)
    plans.append(dict.fromkeys(searched, fp))
    ranked = [x.name for x in profile.layers if x.name in searched]  # noisiest first
    for k in (1, 2, 3, 5, 8):
        if k <= len(ranked):
            plans.append({**pays, **{n: fp for n in ranked[:k]}})
    return [dict(t) for t in dict.fromkeys(tuple(sorted(p.items())) for p in plans)]


def greedy_fallback(ctx, profile: SensitivityProfile, method: str = "minmax", granularity: str = "per_tensor"):
    """The peers' accuracy-control loop: start all-INT8 with one method, revert the most sensitive
    layer to float, re-score, repeat until within budget. Returns (plan, evaluations)."""
    allowed = ctx.allowed_drop()
    fp = LayerChoice(ctx.float_precision)
    order = sorted(ctx.candidates(), key=lambda la: -_layer(profile, la.name).noise)  # noisiest first
    reverted: list[str] = []
    evals = 0
    for k in range(len(order) + 1):
        reverted = [la.name for la in order[:k]]
        plan = ctx.uniform_plan(method, granularity, keep_float=tuple(reverted))
        score = ctx.search_scorer.score(make_session(ctx.rewriter(plan), ctx.workload.threads))
        evals += 1
        if ctx.baseline.fp32_search - score <= allowed:
            return plan, evals
    return ctx.plan({la.name: fp for la in order}), evals
