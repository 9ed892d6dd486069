"""`optimize`, stage by stage: setup -> analysis (SensitivityProfile) -> search (the study) ->
finalize (FinalChoice) -> the result set (plan, model, report). Each stage returns what it
decided; `--timeout` and interrupts say which stage they stopped and what was kept."""

from __future__ import annotations

import csv
import dataclasses
import io
import time
from dataclasses import dataclass
from pathlib import Path

import optuna

from qsearch import limits, timing
from qsearch.analysis import profiling, sensitivity
from qsearch.analysis.sensitivity import SensitivityProfile
from qsearch.commands import check_eval_timeout, check_samples, open_bench
from qsearch.engine.base import Engine
from qsearch.errors import Interrupted, QsearchError
from qsearch.evaluator import Evaluator
from qsearch.files import OutputSet, atomic_write_bytes, atomic_write_text
from qsearch.finalize import FinalChoice, final_stage_seconds, finalize, layer_reasons, trial_plan
from qsearch.limits import CommandTimeout
from qsearch.plan.build import weight_copies
from qsearch.plan.format import Plan
from qsearch.plan.io import read_plan
from qsearch.progress import Progress, log, say
from qsearch.report import html as htmlreport
from qsearch.report.markdown import (
    attribution_table,
    finalists_table,
    forms_line,
    fusion_table,
    layer_table,
    plot_attribution,
    plot_pareto,
    recovery_line,
    rows_markdown,
    speed,
    verdict_line,
    write_report,
)
from qsearch.scoring import fusion_check
from qsearch.search.jobs import StudyQueue, check_study, open_storage
from qsearch.search.seeds import Strategy
from qsearch.search.study import Search, default_study_name
from qsearch.search.trials import SearchResult
from qsearch.workbench import Workbench

RESULT_FILES = ("plan.yaml", "plan.recovery.onnx", "model.qsearch.onnx", "report.md", "report.html", "pareto.png", "attribution.png", "pareto",
                "trials.csv", "closest")


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


class Stage:
    """Which stage a command is in, so a `--timeout` or interrupt message can say what was kept."""

    def __init__(self) -> None:
        self.name, self.kept = "setup", "nothing was written"
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, kept: str) -> None:
        now = time.perf_counter()
        self.seconds[self.name] = now - self.started
        self.name, self.kept, self.started = name, kept, now


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
    bench, profile = _analysis(bench, out, name, storage, req.samples, req.workers, stage)
    evaluator = Evaluator(bench)
    stage("search", "completed trials are kept in the study: re-run the same command to go on")
    search = Search(bench, profile, evaluator, out, storage=storage, study_name=study, sampler=req.sampler,
                    pruner=req.pruner, budget=budget, log=log, strategies=req.strategies)
    early = early_verdict(bench, profile)
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
                _no_plan(res, out, evaluator, result, timeout)
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
            plan = _write_result(res, out, bench, evaluator, profile, result, choice, stage, t_start)
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


def early_verdict(bench: Workbench, profile: SensitivityProfile) -> str:
    """One line when the analysis shows that no plan can beat FP32 by more than the timing noise
    (`timing.TIE`): neither the all-INT8 model's profile nor the layers whose INT8 form pays alone,
    summed, save that much. Only for a latency objective on a CPU target ('" if nothing is decided)."""
    w = bench.workload
    fp32_ms, int8_ms = profile.meta.get("fp32_ms", 0.0), profile.meta.get("int8_ms", 0.0)
    if not w.space.early_verdict or w.space.objective != "latency" or w.target != "cpu" or not fp32_ms > 0:
        return ""
    singles = sum(max(0.0, x.gain_ms) for x in profile.layers)
    bound = max(singles, fp32_ms - int8_ms)
    if bound >= timing.TIE * fp32_ms:
        return ""
    return (f"early verdict: no INT8 plan can beat FP32 here by more than the timing noise: all-INT8 runs "
            f"{int8_ms:.3g} ms against FP32's {fp32_ms:.3g} ms in the per-node profile, and the layers whose INT8 "
            f"form pays alone save {singles:.3g} ms together ({bound / fp32_ms:.1%} at most, under the "
            f"{timing.TIE:.0%} noise); no search was run, the measured profile is in sensitivity.yaml.")


def _analysis(bench: Workbench, out: Path, name: str, storage, samples, workers, stage: Stage
              ) -> tuple[Workbench, SensitivityProfile]:
    """Calibration and analysis as jobs in the study's storage: workers on one study split them, a
    resumed run finds them done (several local processes: --workers)."""
    url = storage if isinstance(storage, str) or storage is None else None
    queue = None if workers > 1 or (storage is not None and url is None) else StudyQueue(url, out, f"{name}-analysis")
    stage("analysis", "finished analysis jobs are kept in the study: re-run the same command to go on"
          if queue is not None else "nothing was written")
    bench = bench.calibrated(None if queue is None else queue.stage("calibration"), Progress("1/3 analyze"), log=log)
    profile = sensitivity.analyze(bench, samples=samples, workers=workers, cache_dir=out / "cache",
                                  progress=Progress("1/3 analyze"), queue=queue, screen_all=False)
    sensitivity.save_profile(profile, out)
    pays = sum(x.gain_ms > 0 for x in profile.layers)
    log(f"analysis: {profile.meta['evaluations']} evaluations on {profile.samples} samples; INT8 pays (measured, "
        f"glue included) for {pays} of {len(profile.layers)} layers; all-INT8 profile {profile.meta['int8_ms']:.2f} ms "
        f"vs FP32 {profile.meta['fp32_ms']:.2f} ms per batch" + (f"; {forms_line(profile)}" if profile.forms else ""))
    return bench.with_forms(profile.forms), profile


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


def _no_plan(res: OutputSet, out: Path, evaluator: Evaluator, search: SearchResult, timeout) -> None:
    """Nothing met the budget: say why in one line, keep the closest plans for review."""
    results = search.trials
    closest = search.closest()
    for r in closest:
        trial_plan(evaluator, search, r).with_info({"search_drop": r.drop, "search_score": r.score}).write(
            res.path(f"closest/plan-trial{r.number:04d}.yaml"))
    drops = ", ".join(f"trial {r.number}: drop {r.drop:.4f}" for r in closest)
    where = f"; their plans are in {out / 'closest'}" if closest else ""
    failed = search.failures
    if not results and failed:
        why = f"every trial failed ({len(failed)}; the first: {failed[0]})"
    elif not results:
        why = "no trial finished (--timeout)" if timeout is not None else "no trial finished"
    elif search.allowed < 0:
        why = (f"not even FP32 meets max_drop {search.allowed:.4g} (the budget is impossible for this "
               f"metric); closest: {drops}{where}")
    else:
        why = (f"no plan within max_drop {search.allowed:.4g} after {len(results)} trials (the repair "
               f"did not finish); closest: {drops or 'none'}{where}")
    log(f"no plan: {why}.")
    res.commit()


def _write_result(res: OutputSet, out: Path, bench: Workbench, evaluator: Evaluator, profile: SensitivityProfile,
                  search: SearchResult, choice: FinalChoice, stage: Stage, t_start: float) -> Plan:
    """plan.yaml, the model, the Pareto plans, the report; returns the shipped plan."""
    results = search.trials
    naive = bench.uniform_plan("minmax", "per_tensor")
    fp32_row, chosen_row = choice.fp32, choice.chosen
    if choice.verdict:
        log(choice.verdict)
        trial = next((r for r in results if choice.candidate_name == f"qsearch (trial {r.number})"), None)
        choice.candidate.write(res.path("pareto/" + (f"plan-trial{trial.number:04d}.yaml" if trial
                                                     else "plan-baseline.yaml")))
    chosen = choice.plan
    fixing = search.decision.evaluations
    metrics = {
        "metric": bench.workload.metric.name,
        "fp32": {"search": fp32_row.search_score, "test": fp32_row.test_score, "latency_ms": fp32_row.latency_ms,
                 "size_bytes": fp32_row.size_bytes},
        "plan": {"search": chosen_row.search_score, "test": chosen_row.test_score, "latency_ms": chosen_row.latency_ms,
                 "size_bytes": chosen_row.size_bytes},
        "max_drop": search.allowed,
        "test_drop": fp32_row.test_score - chosen_row.test_score,
        "evaluations": {"analysis": profile.meta["evaluations"], "fixing": fixing, "trials": len(results),
                        "final": choice.evaluations, "layers": len(bench.candidates())},
        "seconds": {k: round(v, 3) for k, v in stage.seconds.items()},
    }
    chosen_model = bench.rewriter(chosen)
    fusion = fusion_check(chosen_model)
    naive_fusion = fusion_check(bench.rewriter(naive))
    fusions = [(chosen_row.name, fusion)] + ([] if choice.candidate is chosen or not choice.verdict else
                                             [(choice.candidate_name, fusion_check(bench.rewriter(choice.candidate)))])
    # what ORT really runs, in the plan too: candidate layers INT8, int8 kernels, unfused Q/DQ
    int8 = {la.name for la in bench.candidates() if chosen.choice(la.name).is_int8}
    metrics["fusion"] = {"int8_layers": len(int8), "int8_kernels": fusion.int8_kernels,
                         "unfused_qdq": fusion.unfused_qdq, "borders": search.problem.borders(int8)}
    chosen = chosen.with_info(metrics, storage=search.storage).with_why(
        layer_reasons(chosen, profile, search.dims.fixed, bench.prepared.absorbed(chosen.forms)))
    chosen.write(res.path("plan.yaml"))  # (with its recovery sidecar)
    chosen = read_plan(res.path("plan.yaml"))  # the result is the plan as written
    atomic_write_bytes(res.path("model.qsearch.onnx"), chosen_model.SerializeToString())
    pareto = search.pareto()
    for r in pareto:
        pp = trial_plan(evaluator, search, r).with_info({"search_score": r.score, "search_drop": r.drop, "cost": r.cost})
        pp.with_why(layer_reasons(pp, profile, search.dims.fixed, bench.prepared.absorbed(pp.forms))).write(
            res.path(f"pareto/plan-trial{r.number:04d}.yaml"))
    objective = bench.workload.space.objective
    marks = [] if objective == "bitops" else [
        (r.name, r.latency_ms if objective == "latency" else r.size_bytes, r.search_score) for r in choice.rows]
    plot_pareto(results, search.allowed, bench.baseline.fp32_search, objective, res.path("pareto.png"), marks)
    kinds = {name: {k: round(v, 4) for k, v in profiling.profile(bench.prepared, bench.rewriter(plan),
                                                                  bench.latency_feed, bench.engine).by_kind.items()}
             for name, plan in (("fp32", bench.plan({})), ("naive int8", naive), (choice.candidate_name, choice.candidate))}
    plot_attribution(kinds, res.path("attribution.png"))
    stage("done", stage.kept)
    summary = _summary(bench, profile, search, choice, metrics, fusion, naive_fusion, time.perf_counter() - t_start)
    summary += _plan_lines(bench, chosen)
    tables = [("Layers (graph order): sensitivity, measured INT8 cost, naive vs chosen", layer_table(chosen, naive, profile)),
              ("Where the time goes (ONNX Runtime per-node profile, one batch)", attribution_table(kinds)),
              ("Fused kernels after ONNX Runtime's optimizer", fusion_table([*fusions, ("naive int8", naive_fusion)])),
              ("Finalists that did not ship (timed in the same interleaved rounds)",
               finalists_table(choice.finalists, bench.workload.metric.name, fp32_row))]
    rows = list(choice.rows)
    title, metric = f"qsearch report: {bench.prepared.name}", bench.workload.metric.name
    verdict = verdict_line(fp32_row, chosen_row, search.allowed, metric, bool(choice.verdict),
                           edge=choice.resolution_note.startswith("the search split cannot tell"), ratio=choice.speedup)
    if "OVER THE BUDGET" in verdict or verdict.startswith("The search split cannot tell"):
        log(verdict)  # never only in a table
    page = htmlreport.render(title=title, verdict=verdict, summary=summary, rows=rows, metric=metric,
                             fp32_latency=fp32_row.latency_ms, fp32_size=fp32_row.size_bytes,
                             pareto=res.path("pareto.png"), attribution=res.path("attribution.png"),
                             layers=htmlreport.layer_rows(chosen, naive, profile), details=tables[1:],
                             figures=[("Layer sensitivity (the analysis)", out / "sensitivity.png")])
    write_report(res.dir, title, [f"**{verdict}**", "", *summary], rows, metric, fp32_row.latency_ms,
                 fp32_row.size_bytes, [("Pareto front", res.path("pareto.png")),
                                       ("Where the time goes", res.path("attribution.png")),
                                       ("Layer sensitivity", out / "sensitivity.png")], tables, page)
    res.commit()
    say("\n".join(summary))
    say(rows_markdown(rows, bench.workload.metric.name, fp32_row.latency_ms, fp32_row.size_bytes))
    log(f"wrote {out / 'plan.yaml'}, {out / 'model.qsearch.onnx'}, {out / 'report.md'}, {out / 'report.html'}, "
        f"{len(pareto)} Pareto plans in {out / 'pareto'}")
    return chosen


def _plan_lines(bench: Workbench, chosen: Plan) -> list[str]:
    """What the shipped plan holds beyond its choices: recovery, weights stored twice."""
    lines = [recovery_line(chosen, len(bench.recovery.pairs) if bench.recovery else 0)]
    copies = weight_copies(bench.prepared, chosen)
    if copies:  # consumers of a shared weight disagree on its quantization: each form is stored
        w, f = next(iter(copies.items()))
        lines.append(f"Size: {len(copies)} shared weight(s) are stored in more than one quantized form because "
                     f"their layers chose differently (e.g. '{w}': {', '.join(f)}).")
    return lines


def _summary(bench: Workbench, profile: SensitivityProfile, search: SearchResult, choice: FinalChoice, metrics: dict,
             fusion, naive_fusion, total_s: float) -> list[str]:
    results = search.trials
    d = search.decision
    fp32_row, chosen_row = choice.fp32, choice.chosen
    n_layers = len(bench.candidates())
    ev = metrics["evaluations"]
    total_evals = ev["analysis"] + ev["fixing"] + ev["trials"] + ev["final"]
    sec = metrics["seconds"]
    n_trials = search.n_trials
    per_trial = search.trial_seconds / max(n_trials, 1)
    pays = sum(x.gain_ms > 0 for x in profile.layers)
    repaired = search.repaired
    return [
        f"Model `{bench.prepared.name}` ({bench.prepared.fingerprint}), metric {bench.workload.metric.name}, "
        f"allowed drop {search.allowed:.4g} on search data; target {bench.workload.target}."
        + (f" Float graph: {bench.prepared.folded} constant Mul/Add folded into their Convs (the same function; FP32 "
           "below is this graph)." if bench.prepared.folded else ""),
        f"{n_trials} trials ({len(results)} complete, {repaired} of them repair steps), "
        f"{len(search.dims.searched)} layers searched, {len(search.dims.fixed)} fixed "
        f"(measured joint drop {f'{d.joint_drop:.4g}' if d.joint_drop is not None else 'n/a'}). "
        f"Model evaluations: {total_evals} = analysis {ev['analysis']} (on {profile.samples} samples) + fixing "
        f"{ev['fixing']} + trials {ev['trials']} + final stage {ev['final']}; {total_evals / max(n_layers, 1):.1f} "
        f"per layer ({n_layers} layers). INT8 pays for {pays} layers.",
        f"Time: total {total_s:.1f}s: " + ", ".join(f"{k} {v:.1f}s" for k, v in sec.items())
        + f" ({per_trial:.2f}s/trial).",
        *(["The machine was busy while timing (wall time well above the thread's CPU time): every plan was "
           "timed again, and plans were compared on thread CPU time, which a busy core does not inflate."]
          if choice.cpu_clock else []),
        *([f"Search drop of the chosen plan: {chosen_row.interval}."] if chosen_row.interval else []),
        *([choice.resolution_note[0].upper() + choice.resolution_note[1:] + "."] if choice.resolution_note else []),
        choice.verdict or (f"Chosen plan: test drop {metrics['test_drop']:.4f} (budget {search.allowed:.4g}), "
                           f"{speed(fp32_row.latency_ms / chosen_row.latency_ms)} "
                           f"(timing spread ±{max(chosen_row.latency_spread, fp32_row.latency_spread):.0%}), "
                           f"{chosen_row.size_bytes / fp32_row.size_bytes:.2f}x the size."),
        f"Fusion check (after ONNX Runtime's optimizer): chosen plan {fusion.line()}, "
        f"{metrics['fusion']['borders']} float/INT8 borders between candidate layers; naive INT8 {naive_fusion.line()}.",
        *([forms_line(profile)] if profile.forms else []),
    ]


def trials_csv(path: Path, search: Search) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    layers = list(search.dims.searched)  # one column per searched layer: its option in that trial
    w.writerow(["trial", "state", "score", "drop", "cost", "latency_ms", "size_bytes", "bitops", "feasible", *layers])
    for t in search.study.trials:
        a = t.user_attrs
        plan = a.get("choices") or t.system_attrs.get("fixed_params") or t.params
        w.writerow([t.number, t.state.name, a.get("score", ""), a.get("drop", a.get("drop_estimate", "")),
                    a.get("cost", ""), a.get("latency_ms", ""), a.get("size_bytes", ""), a.get("bitops", ""),
                    "" if "drop" not in a else a["drop"] <= search.allowed + 1e-12,
                    *(plan.get(n, "") for n in layers)])
    atomic_write_text(path, buf.getvalue())
