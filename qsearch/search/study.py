"""The Optuna study: trials over the searched layers, under the accuracy budget as a constraint.

`Search` takes Optuna's own objects: any sampler (default from the search space: TPE, NSGA-II,
random, QMC, GP), any pruner (default `stopping.BudgetPruner`, which stops a trial whose first slice of the
search data is clearly over budget) and any storage (a URL or an Optuna storage object). What to
try first, what to fix and how to repair come from `strategy`; every score comes from `Evaluator`.
A trial never recalibrates: plan -> rewrite with cached ranges -> session -> score.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import optuna
from optuna.trial import TrialState

from qsearch import limits
from qsearch.analysis.sensitivity import SensitivityProfile
from qsearch.errors import INTERRUPTED, QsearchError
from qsearch.evaluator import Evaluation, Evaluator
from qsearch.search import jobs, racing, strategy
from qsearch.search.framing import problem_for
from qsearch.search.problem import Dimensions, FixDecision
from qsearch.search.samplers import default_sampler
from qsearch.search.seeds import STRATEGIES, Start, Strategy
from qsearch.search.stopping import BudgetPruner, CeilingStop, patience_for
from qsearch.search.trials import SearchResult, TrialResult
from qsearch.workbench import Workbench

# heartbeats and stale-trial retries are what make interrupted runs resumable; they are stable
# enough for us even though Optuna still labels them experimental
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def default_study_name(bench: Workbench) -> str:
    return f"qsearch-{bench.prepared.name}-{bench.study_key()[:12]}"


class Search:
    """One worker's view of the study. Construction only stores; the workflow then calls the
    steps that do work, in order: `open` (storage, study, owner check, the worker lock),
    `fix` (the fixed set: model evaluations, kept in the study), `recover` (orphaned trials),
    `run`, `repair`, `result`."""

    def __init__(self, bench: Workbench, profile: SensitivityProfile, evaluator: Evaluator, out: Path, *,
                 storage: str | optuna.storages.BaseStorage | None = None, study_name: str | None = None,
                 sampler: optuna.samplers.BaseSampler | None = None, pruner: optuna.pruners.BasePruner | None = None,
                 budget: int = 50, log: Callable[[str], None] = lambda m: None,
                 strategies: tuple[Strategy, ...] | None = None):
        self.bench, self.profile, self.evaluator, self.out, self.log = bench, profile, evaluator, out, log
        self.space = bench.workload.space
        self.storage, self.sampler, self.user_pruner, self.budget = storage, sampler, pruner, budget
        self.strategies = STRATEGIES if strategies is None else tuple(strategies)
        self.study_name = study_name or default_study_name(bench)
        url = storage if isinstance(storage, str) else None
        self.storage_url = url or (jobs.sqlite_url(out / "study.db") if storage is None else type(storage).__name__)
        self.trial_seconds = 0.0
        self.deadline: float | None = None
        self._alone = False  # no other live worker on this study (known for file storages only)
        self._lock_fd: int | None = None
        self._lock_path: Path | None = None
        self.created = False
        self.ceiling: CeilingStop | None = None  # set by `run` when the study may stop at its ceiling

    def open(self) -> Search:
        """Open (or create) the study, bound to everything that defines its trials; a study in a
        local file also takes this worker's lock."""
        bench = self.bench
        self.problem = problem_for(bench, self.profile)
        self.allowed = self.problem.allowed
        self.key = bench.study_key()  # binds the study to everything that defines its trials
        self.pruner = self.user_pruner or BudgetPruner(self.allowed, binomial=bench.workload.metric.name == "top1")
        self.study = self._open(self.storage, self.sampler or default_sampler(bench, self.budget))
        jobs.check_owner(self.study_name, self.study.user_attrs.get("study_key"), self.key)
        for k, v in (("study_key", self.key), ("fingerprint", bench.prepared.fingerprint),
                     ("fp32_search", bench.baseline.fp32_search), ("allowed_drop", self.allowed)):
            self.study.set_user_attr(k, v)
        self.study.set_metric_names(["score", self.space.objective] if self.space.multi_objective
                                    else [self.space.objective])
        lock = jobs.storage_file(self.storage_url) if self.storage is None or isinstance(self.storage, str) else None
        if lock is not None:  # a study in a local file: a lock tells live workers from dead ones
            self._lock_path = lock.with_name(lock.name + ".workers.lock")
            self._lock_fd, self._alone = jobs.hold_worker_lock(self._lock_path)
        return self

    def fix(self) -> Search:
        """The fixed set (measured once per study) and the dimensions the sampler searches."""
        self.decision = self._decision()
        self.problem = strategy.with_option_set(self.problem, self.decision.option_set)
        self.dims: Dimensions = strategy.build_dimensions(self.problem, self.decision.fixed)
        return self

    def unsearched(self) -> Search:
        """No search (the early verdict): nothing fixed, every candidate searchable, no trial."""
        self.decision = FixDecision((), None, None, 0)
        self.dims = strategy.build_dimensions(self.problem, ())
        return self

    def start(self) -> Search:
        """`open`, `fix`, and (alone on a file study) the orphaned trials of a killed run re-queued."""
        self.open().fix()
        # alone when the study was opened, and still: fixing takes evaluations, during which another
        # worker may have started trials that are RUNNING, not orphaned
        if self._alone and self._lock_fd is not None and jobs.still_alone(self._lock_path):
            self.recover(orphans=True)
        else:
            self._alone = False
        return self

    def close(self) -> None:
        """Release this worker's hold on the study (a process that exits releases it anyway)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _open(self, storage, sampler) -> optuna.Study:
        st = storage if isinstance(storage, optuna.storages.BaseStorage) else jobs.open_storage(storage, self.out)
        directions = ["maximize", "minimize"] if self.space.multi_objective else ["minimize"]
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        kw = {"storage": st, "study_name": self.study_name, "directions": directions, "sampler": sampler,
              "pruner": self.pruner}
        try:
            # creating is atomic in every storage: exactly one worker creates, and only it warm-starts
            study = optuna.create_study(**kw, load_if_exists=False)
            self.created = True
            return study
        except optuna.exceptions.DuplicatedStudyError:
            self.created = False
        except ValueError as exc:
            raise QsearchError(f"study '{self.study_name}': {exc}") from None
        try:
            return optuna.create_study(**kw, load_if_exists=True)
        except ValueError as exc:
            raise QsearchError(f"study '{self.study_name}': {exc}") from None

    def _decision(self) -> FixDecision:
        """The fixed set, measured once per study: kept in the study so a resumed run or another
        worker reuses it instead of measuring again."""
        saved = self.study.user_attrs.get("fix_decision")
        if isinstance(saved, dict):
            return FixDecision(tuple(saved["fixed"]), saved["joint_drop"], saved["all_int8_drop"], 0,
                               saved.get("option_set", "analysis"))
        decision = strategy.choose_fixed(self.problem, self.evaluator.drop)
        self.study.set_user_attr("fix_decision", {"fixed": list(decision.fixed), "joint_drop": decision.joint_drop,
                                                  "all_int8_drop": decision.all_int8_drop,
                                                  "evaluations": decision.evaluations,
                                                  "option_set": decision.option_set})
        return decision

    def recover(self, orphans: bool = False) -> int:
        """Re-run trials a previous run lost: interrupted ones (Ctrl-C/SIGTERM: FAIL without a
        recorded error) and, when `orphans`, RUNNING ones left by a killed process (marked FAIL).
        Each is retried once, with the same plan; completed trials are never touched. A trial lost
        before its plan was fully sampled holds nothing to redo. Returns how many are retried."""
        trials = self.study.get_trials(deepcopy=False)
        retried = {t.user_attrs.get("retry_of") for t in trials}
        n = 0
        for t in trials:
            lost = t.state == TrialState.RUNNING and orphans
            if lost:
                self.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
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

    # ---------------------------------------------------------------- trials
    def choices(self, params: Mapping[str, str]) -> dict[str, str]:
        return {**self.dims.fixed, **params}

    def _objective(self, trial: optuna.Trial):
        try:
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
        trial.set_user_attr("worker", jobs.worker_id())  # which machine and process ran it
        params = {n: trial.suggest_categorical(n, list(opts)) for n, opts in self.dims.searched.items()}
        choices = self.choices(params)

        def check(est: float, batches: int, head) -> None:
            """Optuna's pruner API decides on the slice's drop estimate."""
            trial.set_user_attr("slice_parts", [float(head[0]), float(head[1])])
            trial.set_user_attr("drop_estimate", est)
            if len(self.study.directions) == 1:
                trial.report(est, batches)
                prune = trial.should_prune()
            else:  # Optuna's report() is single-objective only: the pruner reads the estimate instead
                frozen = next(t for t in self.study.get_trials(deepcopy=False) if t.number == trial.number)
                prune = self.pruner.prune(self.study, frozen)
            if prune:
                trial.set_constraint("max_drop", est - self.allowed)
                self.trial_seconds += time.perf_counter() - t0
                raise optuna.TrialPruned(f"drop {est:.4f} on the first {batches} batches")

        # the --timeout deadline stops the scoring, never a write to the study's storage: a timer that
        # fired inside SQLite's commit left the run stalled past the command's own deadline
        with limits.limit(limits.remaining(self.deadline), "stopped at the --timeout deadline"):
            plan = self.evaluator.plan(choices)
            ev = self.evaluator.evaluate(plan, check=check if self.space.prune else None,
                                         prune_fraction=self.space.prune_fraction)
            if self.space.objective == "latency":  # a record is timed again against the incumbent
                done = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                ev = racing.confirmed(self.evaluator, plan, ev, done, self.allowed, self.log)
        cost = ev.cost(self.space.objective)
        for k, v in self._attrs(ev, cost).items():
            trial.set_user_attr(k, v)
        trial.set_user_attr("choices", choices)
        trial.set_constraint("max_drop", ev.drop - self.allowed)  # the accuracy budget, as Optuna's constraint
        self.trial_seconds += time.perf_counter() - t0
        return (ev.score, cost) if self.space.multi_objective else cost

    def _attrs(self, ev: Evaluation, cost: float) -> dict:
        return {"score": ev.score, "drop": ev.drop, "latency_ms": ev.latency_ms, "cpu_ms": ev.cpu_ms,
                "relative_ms": ev.relative_ms,
                "size_bytes": ev.size_bytes, "bitops": ev.bitops, "cost": cost, "constraint": ev.drop - self.allowed}

    def warm_start(self, budget: int = 50) -> int:
        """Once per study (by the worker that created it or, when that run was interrupted before
        finishing, by the next worker alone on it): the strategies (`seeds.STRATEGIES`) in order,
        sharing half the budget of evaluations, every plan they measure a trial of the study;
        the plans they propose are enqueued for the sampler to start from. Returns how many."""
        done = self.study.user_attrs.get("warm_started")
        if not self.space.warm_start or not self.dims.searched or done or not (self.created or self._alone):
            return 0
        self.created = False
        cap, used, queued = max(2, budget // 2), 0, 0
        for seed in self.strategies:
            name = getattr(seed, "__name__", type(seed).__name__)
            count = [0]

            def measure(choices: Mapping[str, str], name=name, count=count) -> float:
                if self.finished() >= budget:  # other workers' trials filled the study meanwhile
                    raise _BudgetReached
                count[0] += 1
                return self.record(dict(choices), strategy=name).drop

            best = self.best()
            start = Start(dict(self.dims.fixed), self.dims, self.decision, cap - used,
                          None if best is None else best.choices)
            try:
                plans = seed(self.problem, measure, start)
            except _BudgetReached:
                break
            used += count[0]
            for p in plans:
                self.study.enqueue_trial(p, skip_if_exists=True)
            queued += len(plans)
            if count[0] or plans:
                self.log(f"strategy {name}: {count[0]} plans measured, {len(plans)} proposed"
                         + (f"; best within budget so far: trial {self.best().number}" if self.best() else ""))
        self.study.set_user_attr("warm_started", True)
        return queued

    def run(self, budget: int, deadline: float | None = None, progress: Callable | None = None) -> None:
        """Trials until `budget` are finished in the study or `deadline` (`time.monotonic()`) passes;
        a trial still scoring at the deadline is stopped (recorded as failed)."""
        from optuna.study import MaxTrialsCallback

        self.deadline = deadline
        if not self.dims.searched:
            budget = min(budget, 1)  # nothing to search: the profile decides every layer; score that plan
        done = self.finished()
        if done >= budget:
            return
        if self._lock_fd is None:  # server storage: no lock; Optuna's heartbeat retries killed trials
            self.recover()
        self.warm_start(budget)
        callbacks = [MaxTrialsCallback(budget, states=(TrialState.COMPLETE, TrialState.PRUNED)), _check_interrupt]
        if self.space.stop_at_ceiling:
            race = racing.trials_race(self.evaluator, self.log) if self.space.objective == "latency" else None
            self.ceiling = CeilingStop(self.dims.searched, self.problem.float_label, self.allowed, patience_for(budget),
                                       race)
            callbacks.append(self.ceiling)
        if progress is not None:
            callbacks.append(lambda study, trial: progress(study, trial))
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        timeout = None if deadline is None else max(deadline - time.monotonic(), 1e-3)
        # the warm start's plans and other workers' trials may have filled the budget meanwhile: Optuna
        # checks the budget only after a trial, so a full study would still get one more from here
        left = budget - self.finished()
        if left > 0:
            self.study.optimize(self._objective, n_trials=left, timeout=timeout, callbacks=callbacks,
                                catch=(Exception,), gc_after_trial=False)
        if jobs.is_server(self.storage_url):  # another worker's trial may be lost with its worker
            jobs.settle(self.study, lambda: self.study.optimize(self._objective, n_trials=1, catch=(Exception,),
                                                                 callbacks=[_check_interrupt]), deadline)

    def repair(self, progress: Callable | None = None) -> int:
        """No trial met the budget: `strategy.repair` from the closest trial, each step a scored
        plan added to the study. Returns the number of evaluations spent."""
        results = self.results()
        if not results or any(r.feasible for r in results):
            return 0
        start = min(results, key=lambda r: (r.drop, r.cost))
        int8 = sum(lbl != self.problem.float_label for lbl in start.choices.values())

        def measure(choices: Mapping[str, str]) -> float:
            r = self.record(dict(choices), repair_of=start.number)
            if progress is not None:
                reverted = sum(start.choices[n] != choices[n] for n in choices)
                progress(f"repair: {reverted} of {int8} INT8 layers of trial {start.number} reverted, "
                         f"drop {r.drop:.4g} (budget {self.allowed:.4g})")
            return r.drop

        return strategy.repair(self.problem, start.choices, measure)

    def record(self, choices: dict[str, str], **attrs) -> TrialResult:
        """Score a plan outside the sampler and add it to the study as a finished trial."""
        from optuna.distributions import CategoricalDistribution
        from optuna.trial import create_trial

        t0 = time.perf_counter()
        ev = self.evaluator.evaluate(self.evaluator.plan(choices))
        cost = ev.cost(self.space.objective)
        params = {n: choices[n] for n in self.dims.searched if choices.get(n) in self.dims.searched[n]}
        trial = create_trial(
            params=params, distributions={n: CategoricalDistribution(list(self.dims.searched[n])) for n in params},
            values=[ev.score, cost] if self.space.multi_objective else [cost],
            user_attrs={**self._attrs(ev, cost), "choices": choices, **attrs},
            system_attrs={"constraints": [ev.drop - self.allowed]},
        )
        self.study.add_trial(trial)
        self.trial_seconds += time.perf_counter() - t0
        number = self.study.get_trials(deepcopy=False)[-1].number
        return TrialResult(number, choices, ev.score, ev.drop, cost, ev.latency_ms, ev.size_bytes, ev.bitops,
                           ev.drop <= self.allowed + 1e-12)

    def finished(self) -> int:
        return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in self.study.trials)

    # ---------------------------------------------------------------- results
    def results(self) -> list[TrialResult]:
        out = []
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            a = t.user_attrs
            if "score" in a:
                out.append(TrialResult(t.number, dict(a["choices"]), a["score"], a["drop"], a["cost"],
                                       a["latency_ms"], a["size_bytes"], a["bitops"], a["drop"] <= self.allowed + 1e-12))
        return out

    def best(self) -> TrialResult | None:
        return self.result().best()

    def result(self) -> SearchResult:
        """The study as the later stages read it: a frozen record."""
        # a queued plan the study never ran (it stopped at its ceiling or budget) is not a trial
        trials = [t for t in self.study.get_trials(deepcopy=False) if t.state != TrialState.WAITING]
        return SearchResult(self.study_name, jobs.storage_label(self.storage_url), self.allowed, self.problem,
                            self.dims, self.decision, tuple(self.results()), tuple(self.failures()), len(trials),
                            sum("repair_of" in t.user_attrs for t in trials), self.trial_seconds,
                            None if self.ceiling is None else self.ceiling.stopped)

    def failures(self) -> list[str]:
        """The recorded errors of failed trials, oldest first."""
        return [t.user_attrs["error"] for t in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                if "error" in t.user_attrs]


class _BudgetReached(Exception):
    """The study holds its budget of finished trials: a strategy measuring more would overshoot it."""


def _check_interrupt(study, trial) -> None:
    if INTERRUPTED.is_set():  # a signal whose KeyboardInterrupt was swallowed: stop between trials
        raise KeyboardInterrupt

