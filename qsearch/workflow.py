"""`optimize`, stage by stage: setup -> analysis (SensitivityProfile) -> search (the study) ->
finalize (FinalChoice) -> the result set (plan, model, report). Each stage returns what it
decided; `--timeout` and interrupts say which stage they stopped and what was kept."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import optuna

from qsearch import limits
from qsearch.analysis import sensitivity
from qsearch.analysis.screen import SEARCH_SHARE
from qsearch.analysis.sensitivity import SensitivityProfile
from qsearch.analysis.verdict import early_verdict
from qsearch.commands import check_eval_timeout, check_samples, open_bench
from qsearch.engine.base import Engine
from qsearch.errors import Interrupted, QsearchError
from qsearch.evaluator import Evaluator
from qsearch.files import OutputSet
from qsearch.finalize import final_stage_seconds, finalize
from qsearch.limits import CommandTimeout, Stage
from qsearch.plan.format import Plan
from qsearch.progress import Progress, log
from qsearch.report.markdown import (
    forms_line,
)
from qsearch.result import RESULT_FILES, no_plan, trials_csv, write_result
from qsearch.search.jobs import StudyQueue, check_study, heartbeat, open_storage
from qsearch.search.seeds import Strategy
from qsearch.search.stopping import trials_to_plan_for
from qsearch.search.study import Search, default_study_name
from qsearch.workbench import Workbench


@dataclass(frozen=True, kw_only=True)
class OptimizeResult:
    """What `optimize` wrote to `out`: the plan (None when no plan met the budget: `status` 1)."""

    status: int  # 0 a plan was written, 1 no plan (the log says why)
    out: Path
    plan: Plan | None
    speedup: float | None = None  # FP32 latency / the plan's, timed side by side
    search_drop: float | None = None
    test_drop: float | None = None
    evaluations: int = 0
    seconds: float = 0.0
    max_drop: float | None = None
    latency_ms: float | None = None  # the shipped plan's, best median of the final interleaved rounds
    fp32_latency_ms: float | None = None
    latency_spread: float | None = None  # (second-best - best) / best of those rounds
    speedup_interval: tuple[float, float] | None = None  # 90% interval of the paired speed-up

    def to_json(self) -> dict:
        """What `qsearch optimize --json` prints (keys documented in the README)."""
        return {"status": "plan" if self.status == 0 else "no_plan", "exit_code": self.status,
                "speedup": self.speedup, "speedup_interval": self.speedup_interval, "search_drop": self.search_drop, "test_drop": self.test_drop,
                "max_drop": self.max_drop, "latency_ms": self.latency_ms, "fp32_latency_ms": self.fp32_latency_ms,
                "latency_spread": self.latency_spread, "evaluations": self.evaluations,
                "seconds": round(self.seconds, 3),
                "recovery": None if self.plan is None else {"equalized_pairs": len(self.plan.sidecar.scales()),
                                                            "smoothed_inputs": len(self.plan.sidecar.of("smooth")),
                                                            "bias_corrected": len(self.plan.sidecar.means())},
                "paths": {"out": str(self.out), **({"plan": str(self.plan_path), "model": str(self.model_path),
                                                     "report": str(self.report_path)} if self.status == 0 else {}),
                          **({"recovery": str(self.out / "plan.recovery.onnx")} if self.plan is not None
                             and self.plan.sidecar else {})}}

    @property
    def plan_path(self) -> Path:
        return self.out / "plan.yaml"

    @property
    def model_path(self) -> Path:
        return self.out / "model.qsearch.onnx"

    @property
    def report_path(self) -> Path:
        return self.out / "report.html"


@dataclass(frozen=True)
class Request:
    """What `optimize` was asked for, past the config and the output folder (see `api.optimize`)."""

    budget: int
    timeout: float | None = None
    storage: str | optuna.storages.BaseStorage | None = None
    study: str | None = None
    samples: int | None = None
    workers: int = 1
    eval_timeout: float | None = None
    sampler: optuna.samplers.BaseSampler | None = None
    pruner: optuna.pruners.BasePruner | None = None
    engine: Engine | None = None
    strategies: tuple[Strategy, ...] | None = None


def run_optimize(config, out: Path, **request) -> OptimizeResult:
    """`request`: the fields of `Request`. Its `timeout` bounds the whole command: the analysis
    and final stage are stopped at it, the search ends early enough to leave the final stage its
    measured share."""
    req = Request(**request)
    budget, timeout = req.budget, req.timeout
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise QsearchError(f"--budget must be a positive whole number of trials, got {budget!r}")
    if timeout is not None and not timeout > 0:  # (NaN is not > 0)
        raise QsearchError(f"--timeout must be a positive number of seconds, got {timeout:g}")
    check_eval_timeout(req.eval_timeout)
    check_samples(req.samples)
    heartbeat()  # QSEARCH_HEARTBEAT_S, refused before any work or folder
    stage = Stage()
    try:
        with limits.limit(timeout, "--timeout", CommandTimeout):
            return _optimize(config, out, req, stage)
    except CommandTimeout as exc:
        if str(exc) != "--timeout":  # already explained
            raise
        raise CommandTimeout(f"--timeout {timeout:g} s reached during the {stage.name}; {stage.kept}") from None
    except KeyboardInterrupt:
        raise Interrupted(stage.kept) from None


def _optimize(config, out: Path, req: Request, stage: Stage) -> OptimizeResult:
    budget, timeout, storage, study = req.budget, req.timeout, req.storage, req.study
    t_start = time.perf_counter()
    deadline = None if timeout is None or timeout > limits.MAX_SECONDS else time.monotonic() + timeout
    if isinstance(storage, str):  # a storage that cannot be opened leaves nothing behind, --out included
        open_storage(storage, out)
    bench = open_bench(config, out, req.eval_timeout, calibrate=False, engine=req.engine)
    name = study or default_study_name(bench)
    # storage URL and study ownership are checked before any calibration or analysis is spent
    if storage is None or isinstance(storage, str):  # (an Optuna storage object is the caller's to vet)
        check_study(storage, out, name, bench.study_key())
    bench, profile, early = _analysis(bench, out, name, storage, req.samples, req.workers, stage, budget)
    evaluator = Evaluator(bench)
    stage("search", "completed trials are kept in the study: re-run the same command to go on")
    search = Search(bench, profile, evaluator, out, storage=storage, study_name=study, sampler=req.sampler,
                    pruner=req.pruner, budget=budget, log=log, strategies=req.strategies)
    if early:  # nothing to search: the final stage still times naive INT8 and the greedy fallback
        log(early)
        search.open().unsearched()
    else:
        search.start()
        _search(bench, profile, search, budget, deadline, timeout, time.perf_counter() - t_start)
    stage("final stage", "the result was not written (the trials are kept in the study: re-run the same "
          "command with a larger --timeout to finish)")
    try:
        # the result is one set (plan, model, report, Pareto plans, trials): staged, then moved into
        # place together, so an interrupt never leaves files of two runs side by side
        with OutputSet(out, RESULT_FILES) as res:
            trials_csv(res.path("trials.csv"), search)
            result = search.result()
            if result.best() is None and not early:
                no_plan(res, out, evaluator, result, timeout)
                return OptimizeResult(status=1, out=out, plan=None, evaluations=evaluator.evaluations,
                                      seconds=time.perf_counter() - t_start)
            log(f"3/3 final stage: the finalists and baselines timed side by side ({len(result.finalists())} "
                "trials, FP32, naive INT8, the greedy fallback)")
            choice = finalize(bench, evaluator, result, log)
            if early and choice.verdict:  # FP32 ships: the report says why no search ran
                choice = dataclasses.replace(choice, verdict=f"{early[0].upper()}{early[1:]} {choice.verdict}")
            if choice.resolution_note.startswith("warning"):
                log(choice.resolution_note)
            stage("report", stage.kept)
            plan = write_result(res, out, bench, evaluator, profile, result, choice, stage, t_start)
    finally:
        search.close()
    fp32, chosen = choice.fp32, choice.chosen
    ratio = choice.speedup
    return OptimizeResult(status=0, out=out, plan=plan,
                          speedup=ratio.value if ratio is not None else fp32.latency_ms / chosen.latency_ms,
                          speedup_interval=None if ratio is None else (ratio.low, ratio.high),
                          search_drop=fp32.search_score - chosen.search_score,
                          test_drop=fp32.test_score - chosen.test_score,
                          evaluations=profile.meta["evaluations"] + evaluator.evaluations,
                          seconds=time.perf_counter() - t_start, max_drop=result.allowed,
                          latency_ms=chosen.latency_ms, fp32_latency_ms=fp32.latency_ms,
                          latency_spread=max(chosen.latency_spread, fp32.latency_spread))


def _analysis(bench: Workbench, out: Path, name: str, storage, samples, workers, stage: Stage, budget: int
              ) -> tuple[Workbench, SensitivityProfile, str]:
    """Calibration, analysis and the early verdict as jobs in the study's storage: workers on one
    study split them, a resumed run finds them done (several local processes: --workers). The
    verdict is one shared job: when it needs a measurement, every worker takes the same decision."""
    url = storage if isinstance(storage, str) or storage is None else None
    queue = None if workers > 1 or (storage is not None and url is None) else StudyQueue(url, out, f"{name}-analysis")
    stage("analysis", "finished analysis jobs are kept in the study: re-run the same command to go on"
          if queue is not None else "nothing was written")
    bench = bench.calibrated(None if queue is None else queue.stage("calibration"), Progress("1/3 analyze"), log=log)
    profile = sensitivity.analyze(bench, samples=samples, workers=workers, cache_dir=out / "cache",
                                  progress=Progress("1/3 analyze"), queue=queue, screen_all=False,
                                  screen_spend=SEARCH_SHARE * bench.search_data.samples
                                  * trials_to_plan_for(budget, bench.workload.space.stop_at_ceiling))
    sensitivity.save_profile(profile, out)
    pays = sum(x.gain_ms > 0 for x in profile.layers)
    log(f"analysis: {profile.meta['evaluations']} evaluations on {profile.samples} samples; INT8 pays (measured, "
        f"glue included) for {pays} of {len(profile.layers)} layers; all-INT8 profile {profile.meta['int8_ms']:.2f} ms "
        f"vs FP32 {profile.meta['fp32_ms']:.2f} ms per batch" + (f"; {forms_line(profile)}" if profile.forms else "")
        + (f"; no per-node profile through the latency hook: {profile.meta['region_calls']} hook calls timed regions "
           "of layers whole" if "region_calls" in profile.meta else ""))
    bench = bench.with_forms(profile.forms)
    if queue is None:
        return bench, profile, early_verdict(bench, profile)
    verdict = queue.stage("verdict").map([{}], lambda _job: (early_verdict(bench, profile),), what="verdict")
    return bench, profile, verdict[0][0]


def _search(bench: Workbench, profile: SensitivityProfile, search: Search, budget: int, deadline, timeout,
            analysis_s: float) -> None:
    d = search.decision
    log(f"study '{search.study_name}' in {search.storage_url}: {len(search.dims.searched)} layers searched, "
        f"{len(search.dims.fixed)} fixed"
        + (f" (their joint drop, measured: {d.joint_drop:.4g}; all layers INT8: {d.all_int8_drop:.4g})"
           if d.joint_drop is not None else
           f" (all layers INT8: drop {d.all_int8_drop:.4g})" if d.all_int8_drop is not None else "")
        + ("" if d.option_set == "analysis" else f"; options: {d.option_set} first (its all-INT8 drop measured lowest)")
        + f"; budget {budget} trials, allowed drop {search.allowed:.4g}")
    bar = Progress("2/3 search")
    planned = profile.meta["evaluations"] + d.evaluations + budget

    def progress(study, trial):
        if trial.state.name == "FAIL":
            log(f"trial {trial.number} failed (recorded, search goes on): {trial.user_attrs.get('error', '')}")
        best = search.best()
        extra = f"best {best.cost:.3f} @ drop {best.drop:.4f} (trial {best.number})" if best else "no plan within budget yet"
        done = profile.meta["evaluations"] + d.evaluations + search.finished()
        bar(search.finished(), budget, "", f"{extra}; evaluations {done}/{planned}")

    reserve = final_stage_seconds(bench)
    search_deadline = None if deadline is None else deadline - reserve
    if search_deadline is not None and search_deadline <= time.monotonic() and not search.results():
        raise CommandTimeout(f"--timeout {timeout:g} s leaves no time for a trial: the analysis took "
                             f"{analysis_s:.0f} s and the final stage needs ~{reserve:.0f} s; "
                             "the analysis is kept, re-run the same command with a larger --timeout")
    search.run(budget, deadline=search_deadline, progress=progress)
    search.repair(progress=log)
