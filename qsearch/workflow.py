"""What each command does, stage by stage; `cli.py` only parses arguments and reports errors."""

from __future__ import annotations

import csv
import io
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import onnx

from qsearch import limits, sensitivity
from qsearch.config import load_workload
from qsearch.errors import Interrupted, QsearchError
from qsearch.files import (
    OutputSet,
    atomic_write_bytes,
    atomic_write_text,
    ensure_writable_dir,
    ensure_writable_file,
)
from qsearch.limits import CommandTimeout
from qsearch.model import load_model, prepare
from qsearch.pipeline import Context
from qsearch.plan import LayerChoice, Plan
from qsearch.report import Row, plot_attribution, plot_pareto, write_report
from qsearch.scoring import FusionCheck, fusion_check, latency_ms, make_session, model_size
from qsearch.search import Search, StudyQueue, check_study, default_study_name, greedy_fallback, storage_label

RESULT_FILES = ("plan.yaml", "model.qsearch.onnx", "report.md", "report.html", "pareto.png", "attribution.png", "pareto",
                "trials.csv", "closest")


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


class Progress:
    """A one-line progress bar with ETA on stderr (plain lines when not a terminal)."""

    def __init__(self, label: str):
        self.label, self.t0, self.last = label, time.perf_counter(), 0.0
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int, what: str = "", extra: str = "") -> None:
        now = time.perf_counter()
        if done not in (0, total) and now - self.last < (0.2 if self.tty else 5.0):
            return
        self.last = now
        el = now - self.t0
        eta = el / done * (total - done) if done else float("nan")
        bar = "#" * int(24 * done / max(total, 1))
        line = f"{self.label} {what} [{bar:<24}] {done}/{total} {el:5.1f}s elapsed, ~{eta:5.1f}s left {extra}"
        if self.tty:
            sys.stderr.write("\r" + line[:150])
            if done == total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def open_context(config: str | None, out: Path, eval_timeout: float | None = None, calibrate: bool = True) -> Context:
    workload = load_workload(config)
    ensure_writable_dir(out, "--out", create=False)  # a bad config or model leaves no empty --out behind
    for sub in ("cache", "pareto", "closest"):
        if (out / sub).exists() and not (out / sub).is_dir():
            raise QsearchError(f"--out {out}: '{sub}' there is a file, but qsearch keeps a folder of that name; "
                               "move it or pick another --out")
    log(f"workload '{workload.name}': {workload.model.name}, metric {workload.metric.name}, "
        f"max_drop {workload.max_drop * 100 if workload.relative else workload.max_drop}{'%' if workload.relative else ''}")
    ctx = Context(workload, cache_dir=out / "cache", log=log, eval_timeout=eval_timeout, calibrate=calibrate)
    ensure_writable_dir(out, "--out")
    return ctx


def _check_samples(samples) -> None:
    if samples is not None and samples < 1:
        raise QsearchError(f"--samples must be >= 1, got {samples}")


def run_analyze(config, out: Path, samples=None, reverse=False, workers=1,
                eval_timeout=None) -> sensitivity.SensitivityProfile:
    _check_samples(samples)
    _check_eval_timeout(eval_timeout)
    ctx = open_context(config, out, eval_timeout)
    profile = sensitivity.analyze(ctx, samples=samples, reverse=reverse, workers=workers, cache_dir=out / "cache",
                                  progress=Progress("analyze"))
    paths = sensitivity.save_profile(profile, out)
    print(profile.table())
    if profile.forms:
        log(forms_line(profile))
    log(f"fp32 {profile.metric} {profile.fp32_score:.4f} on {profile.samples} samples; "
        f"{profile.meta.get('evaluations')} evaluations in {profile.seconds:.1f}s; wrote {', '.join(str(p) for p in paths)}")
    return profile


def forms_line(profile: sensitivity.SensitivityProfile) -> str:
    """How patterns without an int8 kernel run in this model's int8 regions, and the timings that chose it."""
    parts = []
    for pattern, form in sorted(profile.forms.items()):
        ms = profile.meta.get("form_ms", {}).get(pattern, {})
        timed = ", ".join(f"{f} {v:.2f} ms" for f, v in ms.items())
        parts.append(f"{pattern} {form}" + (f" (all-INT8 model: {timed})" if timed else ""))
    return "Forms inside int8 regions, measured: " + "; ".join(parts) + "."


def _rows(ctx, entries) -> list[Row]:
    """Score each (name, plan, evaluations) on search and test data, then time them in interleaved
    rounds keeping each one's best median: a background hiccup cannot make one baseline look slow."""
    built = []
    for name, plan, evaluations in entries:
        proto = ctx.rewriter(plan)
        sess = make_session(proto, ctx.workload.threads)
        n8 = sum(plan.choice(la.name).is_int8 for la in ctx.prepared.layers)
        built.append((name, sess, proto, n8, evaluations, ctx.search_scorer.score(sess), ctx.test_scorer.score(sess)))
    rounds: list[list[float]] = [[] for _ in built]
    for _ in range(5):
        for i, b in enumerate(built):
            rounds[i].append(latency_ms(b[1], ctx.latency_feed, repeat=15))
    return [Row(name, search, test, min(rounds[i]), model_size(proto), n8, ev,
                latency_spread=(max(rounds[i]) - min(rounds[i])) / min(rounds[i]))
            for i, (name, _, proto, n8, ev, search, test) in enumerate(built)]


def layer_reasons(plan: Plan, profile: sensitivity.SensitivityProfile,
                  fixed: Mapping[str, str] | None = None, absorbed: Mapping[str, str] | None = None) -> dict[str, str]:
    """One line per layer for the reviewer: its sensitivity rank (model-output noise, this layer
    alone INT8), what INT8 measured to save or cost with its glue, and whether the search chose it.
    `absorbed`: layers inside a fused pattern (`PreparedModel.absorbed`) -> the layer they follow."""
    ranked = {x.name: i for i, x in enumerate(profile.layers, 1)}
    why = {}
    for name in plan.layers:
        x = next((y for y in profile.layers if y.name == name), None)
        if name in (absorbed or {}):
            why[name] = (f"part of the hardswish gate of layer {absorbed[name]}, which runs as one op (forms: "
                         "hardswish fused, the faster form measured): follows that layer's choice")
            continue
        if x is None:
            why[name] = "not a search candidate (search_space.candidates)"
            continue
        gain = x.gain_ms
        cost = f"INT8 saves {gain:.3f} ms" if gain > 0 else f"INT8 costs {-gain:.3f} ms more"
        how = "fixed INT8 before the search (measured jointly)" if name in (fixed or {}) else "searched"
        why[name] = (f"sensitivity rank {ranked[name]}/{len(ranked)} (output SQNR {x.output_sqnr:.1f} dB"
                     f"{'' if x.screened else ', estimated'}); {cost} (measured, glue included); {how}")
    return why


def layer_table(chosen: Plan, naive: Plan, profile: sensitivity.SensitivityProfile) -> str:
    """One row per layer in graph order: op, MACs, sensitivity rank and SQNR, the measured INT8
    saving (glue included), naive's and the chosen plan's option, and whether it changed."""
    ranked = {x.name: (i, x) for i, x in enumerate(profile.layers, 1)}
    lines = ["| # | layer | name | op | MMACs | sensitivity rank (SQNR dB) | INT8 saves ms | naive | chosen | changed |",
             "|---:|---|---|---|---:|---:|---:|---|---|---|"]
    for k, name in enumerate(chosen.layers, 1):
        note = chosen.notes.get(name)
        rank, x = ranked.get(name, (None, None))
        sens = "" if x is None else f"{rank}/{len(ranked)} ({x.output_sqnr:.1f})"
        saves = "" if x is None else f"{x.gain_ms:+.3f}"
        macs = "" if x is None else f"{x.macs / 1e6:.2f}"
        a, b = naive.choice(name).label(), chosen.choice(name).label()
        lines.append(f"| {k} | {name} | {note.readable if note else ''} | {note.op if note else ''} | {macs} | {sens} | "
                     f"{saves} | {a} | {b} | {'yes' if a != b else ''} |")
    return "\n".join(lines)


def fusion_table(checks: list[tuple[str, FusionCheck]]) -> str:
    lines = ["| plan | int8 kernels | Q/DQ left unfused | int8 kernels by op |", "|---|---:|---:|---|"]
    for name, f in checks:
        by_op = ", ".join(f"{op} {n}" for op, n in f.ops.items() if op.startswith(("QLinear", "QGemm", "MatMulInteger",
                                                                                     "ConvInteger")))
        lines.append(f"| {name} | {f.int8_kernels} | {f.unfused_qdq} | {by_op} |")
    return "\n".join(lines)


def attribution_table(ctx, plans: list[tuple[str, Plan]]) -> tuple[str, dict]:
    """Per-kind milliseconds (int8 kernels, float ops, Q/DQ glue) of each plan, from ORT's profile."""
    from qsearch import profiling

    kinds = {}
    for name, plan in plans:
        prof = profiling.profile(ctx.prepared, ctx.rewriter(plan), ctx.latency_feed, ctx.workload.threads)
        kinds[name] = {k: round(v, 4) for k, v in prof.by_kind.items()}
    lines = ["| plan | " + " | ".join(f"{k} ms" for k in profiling.KINDS) + " | total ms |",
             "|---|" + "---:|" * (len(profiling.KINDS) + 1)]
    for name, k in kinds.items():
        lines.append(f"| {name} | " + " | ".join(f"{k[x]:.3f}" for x in profiling.KINDS) + f" | {sum(k.values()):.3f} |")
    return "\n".join(lines), kinds


class Stage:
    """Which stage a command is in, so a `--timeout` or interrupt message can say what was kept."""

    def __init__(self) -> None:
        self.name, self.kept = "setup", "nothing was written"

    def __call__(self, name: str, kept: str) -> None:
        self.name, self.kept = name, kept


def final_stage_seconds(ctx) -> float:
    """What the final stage costs, from the FP32 model's measured times: 7 plans scored on search
    and test data and timed in 5 interleaved rounds, the greedy fallback's few evaluations, three
    per-node profiles, the report. Reserved out of `--timeout` so the result can still be written."""
    score = ctx.score_seconds["search"] + ctx.score_seconds["test"]
    batch_s = ctx.baseline.fp32_latency_ms / 1e3
    return 7 * (score + 90 * batch_s + 0.5) + 3 * ctx.score_seconds["search"] + 60 * batch_s + 3.0


def run_optimize(config, out: Path, budget: int, timeout=None, storage=None, study=None, samples=None,
                 workers=1, eval_timeout=None) -> int:
    """`timeout` bounds the whole command: the analysis and final stage are stopped at it, the
    search ends early enough to leave the final stage its measured share."""
    if budget < 1:
        raise QsearchError(f"--budget must be a positive number of trials, got {budget}")
    if timeout is not None and not timeout > 0:
        raise QsearchError(f"--timeout must be a positive number of seconds, got {timeout:g}")
    _check_eval_timeout(eval_timeout)
    _check_samples(samples)
    stage = Stage()
    try:
        with limits.limit(timeout, "--timeout", CommandTimeout):
            return _optimize(config, out, budget, timeout, storage, study, samples, workers, eval_timeout, stage)
    except CommandTimeout as exc:
        if str(exc) != "--timeout":  # already explained
            raise
        raise CommandTimeout(f"--timeout {timeout:g} s reached during the {stage.name}; {stage.kept}") from None
    except KeyboardInterrupt:
        raise Interrupted(stage.kept) from None


def _check_eval_timeout(eval_timeout) -> None:
    if eval_timeout is not None and eval_timeout < 0:
        raise QsearchError(f"--eval-timeout must be >= 0 seconds (0: no limit), got {eval_timeout:g}")


def _optimize(config, out: Path, budget: int, timeout, storage, study, samples, workers, eval_timeout,
              stage: Stage) -> int:
    t_start = time.perf_counter()
    deadline = None if timeout is None else time.monotonic() + timeout
    ctx = open_context(config, out, eval_timeout, calibrate=False)
    name = study or default_study_name(ctx)
    # storage URL and study ownership are checked before any calibration or analysis is spent
    check_study(storage, out, name, ctx.study_key())
    # calibration and analysis run as jobs in the study's storage: workers on one study split them,
    # a resumed run finds them done (several local processes: --workers)
    queue = None if workers > 1 else StudyQueue(storage, out, f"{name}-analysis")
    stage("analysis", "finished analysis jobs are kept in the study: re-run the same command to go on"
          if queue is not None else "nothing was written")
    ctx.calibrate(None if queue is None else queue.stage("calibration"), Progress("analyze"))
    profile = sensitivity.analyze(ctx, samples=samples, workers=workers, cache_dir=out / "cache",
                                  progress=Progress("analyze"), queue=queue, screen_all=False)
    sensitivity.save_profile(profile, out)
    pays = sum(x.gain_ms > 0 for x in profile.layers)
    log(f"analysis: {profile.meta['evaluations']} evaluations on {profile.samples} samples; INT8 pays (measured, "
        f"glue included) for {pays} of {len(profile.layers)} layers; all-INT8 profile {profile.meta['int8_ms']:.2f} ms "
        f"vs FP32 {profile.meta['fp32_ms']:.2f} ms per batch" + (f"; {forms_line(profile)}" if profile.forms else ""))
    t_analyzed = time.perf_counter()
    stage("search", "completed trials are kept in the study: re-run the same command to go on")
    search = Search(ctx, profile, out, storage=storage, study_name=study, log=log)
    d = search.decision
    log(f"study '{search.study_name}' in {search.storage_url}: {len(search.dims.searched)} layers searched, "
        f"{len(search.dims.fixed)} fixed"
        + (f" (their joint drop, measured: {d.joint_drop:.4g}; all layers INT8: {d.all_int8_drop:.4g})"
           if d.joint_drop is not None else
           f" (all layers INT8: drop {d.all_int8_drop:.4g})" if d.all_int8_drop is not None else "")
        + f"; budget {budget} trials, allowed drop {search.allowed:.4g}")
    bar = Progress("optimize")
    planned = profile.meta["evaluations"] + d.evaluations + budget

    def progress(study, trial):
        if trial.state.name == "FAIL":
            log(f"trial {trial.number} failed (recorded, search goes on): {trial.user_attrs.get('error', '')}")
        best = search.best()
        extra = f"best {best.cost:.3f} @ drop {best.drop:.4f} (trial {best.number})" if best else "no plan within budget yet"
        done = profile.meta["evaluations"] + d.evaluations + search.finished()
        bar(search.finished(), budget, "", f"{extra}; evaluations {done}/{planned}")

    search_deadline = None if deadline is None else deadline - final_stage_seconds(ctx)
    if search_deadline is not None and search_deadline <= time.monotonic() and not search.results():
        raise CommandTimeout(f"--timeout {timeout:g} s leaves no time for a trial: the analysis took "
                             f"{t_analyzed - t_start:.0f} s and the final stage needs ~{final_stage_seconds(ctx):.0f} s; "
                             "the analysis is kept, re-run the same command with a larger --timeout")
    search.run(budget, deadline=search_deadline, progress=progress)
    repaired = search.repair(progress=log)
    t_searched = time.perf_counter()
    stage("final stage", "the result was not written (the trials are kept in the study: re-run the same "
          "command with a larger --timeout to finish)")
    # the result is one set (plan, model, report, Pareto plans, trials): staged, then moved into
    # place together, so an interrupt never leaves files of two runs side by side
    with OutputSet(out, RESULT_FILES) as res:
        results = search.results()
        trials_csv(res.path("trials.csv"), search)
        best = search.best()
        if best is None:
            closest = search.closest()
            for r in closest:
                search.plan_for(r).with_info({"search_drop": r.drop, "search_score": r.score}).write(
                    res.path(f"closest/plan-trial{r.number:04d}.yaml"))
            drops = ", ".join(f"trial {r.number}: drop {r.drop:.4f}" for r in closest)
            where = f"; their plans are in {out / 'closest'}" if closest else ""
            failed = search.failures()
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
            return 1
        # the chosen plan and the baselines, all scored the same way, test data once
        fp32_plan = ctx.plan({})
        naive = ctx.uniform_plan("minmax", "per_tensor")
        hybrid, hybrid_evals = greedy_fallback(ctx, profile)
        # the finalists (cheapest feasible trials) and the baselines are timed side by side in
        # interleaved rounds; the fastest within budget on search data is chosen. A simpler plan that
        # is as good wins: qsearch never ships a plan slower than naive INT8 when naive meets the budget.
        finalists = search.finalists()
        entries = [("fp32", fp32_plan, None), ("naive int8 (minmax, per-tensor)", naive, 1),
                   ("hybrid (greedy fallback)", hybrid, hybrid_evals)]
        entries += [(f"qsearch (trial {r.number})", search.plan_for(r), len(results)) for r in finalists]
        timed = _rows(ctx, entries)
        fp32_row = timed[0]
        within = [i for i in range(1, len(timed)) if fp32_row.search_score - timed[i].search_score <= search.allowed + 1e-12]
        pick = min(within, key=lambda i: (timed[i].latency_ms, -timed[i].search_score))
        chosen = entries[pick][1]
        chosen_row = timed[pick]
        if pick >= 3:
            best = finalists[pick - 3]
        else:  # a baseline: say so in the row's name
            chosen_row = Row(f"qsearch: {chosen_row.name} (fastest within budget)", chosen_row.search_score,
                             chosen_row.test_score, chosen_row.latency_ms, chosen_row.size_bytes, chosen_row.int8_layers,
                             len(results), latency_spread=chosen_row.latency_spread)
            chosen = chosen.with_info(study=search.study_name, trial=None, chosen_from="baseline")
        rows = [*timed[:3], chosen_row]
        candidate, candidate_name = chosen, chosen_row.name
        verdict = ""
        if ctx.workload.target == "cpu" and chosen_row.latency_ms >= fp32_row.latency_ms:
            # the contract: never slower than FP32. Say so plainly and ship FP32, keeping the INT8 plan for review.
            candidate.write(res.path("pareto/" + (f"plan-trial{best.number:04d}.yaml" if pick >= 3 else "plan-baseline.yaml")))
            verdict = (f"No INT8 plan within budget beats FP32 here: the best ({candidate_name}) runs at "
                       f"{fp32_row.latency_ms / chosen_row.latency_ms:.2f}x FP32 speed, so plan.yaml keeps every layer FP32 "
                       f"(the INT8 plan is in pareto/; see the latency attribution for where the time goes).")
            log(verdict)
            chosen = fp32_plan.with_info(study=search.study_name, trial=None)
            chosen_row = Row("qsearch: FP32 (no INT8 plan pays)", fp32_row.search_score, fp32_row.test_score,
                             fp32_row.latency_ms, fp32_row.size_bytes, 0, len(results), latency_spread=fp32_row.latency_spread)
            rows[-1] = chosen_row
        metrics = {
            "metric": ctx.workload.metric.name,
            "fp32": {"search": fp32_row.search_score, "test": fp32_row.test_score, "latency_ms": fp32_row.latency_ms,
                     "size_bytes": fp32_row.size_bytes},
            "plan": {"search": chosen_row.search_score, "test": chosen_row.test_score, "latency_ms": chosen_row.latency_ms,
                     "size_bytes": chosen_row.size_bytes},
            "max_drop": search.allowed,
            "test_drop": fp32_row.test_score - chosen_row.test_score,
            "evaluations": {"analysis": profile.meta["evaluations"], "fixing": d.evaluations, "trials": len(results),
                            "repair": repaired, "layers": len(ctx.candidates())},
            "seconds": {"analysis": t_analyzed - t_start, "search": t_searched - t_analyzed},
        }
        chosen_model = ctx.rewriter(chosen)
        fusion = fusion_check(chosen_model)
        naive_fusion = fusion_check(ctx.rewriter(naive))
        fusions = [(chosen_row.name, fusion)] + ([] if candidate is chosen or not verdict else
                                                 [(candidate_name, fusion_check(ctx.rewriter(candidate)))])
        # what ORT really runs, in the plan too: candidate layers INT8, int8 kernels, unfused Q/DQ
        metrics["fusion"] = {"int8_layers": sum(chosen.choice(la.name).is_int8 for la in ctx.candidates()),
                             "int8_kernels": fusion.int8_kernels, "unfused_qdq": fusion.unfused_qdq}
        chosen = chosen.with_info(metrics, storage=storage_label(search.storage_url)).with_why(
            layer_reasons(chosen, profile, search.dims.fixed, ctx.prepared.absorbed(chosen.forms)))
        chosen.write(res.path("plan.yaml"))
        atomic_write_bytes(res.path("model.qsearch.onnx"), chosen_model.SerializeToString())
        pareto = search.pareto()
        for r in pareto:
            pp = search.plan_for(r).with_info({"search_score": r.score, "search_drop": r.drop, "cost": r.cost})
            pp.with_why(layer_reasons(pp, profile, search.dims.fixed, ctx.prepared.absorbed(pp.forms))).write(res.path(f"pareto/plan-trial{r.number:04d}.yaml"))
        objective = ctx.workload.space.objective
        marks = [] if objective == "bitops" else [
            (r.name, r.latency_ms if objective == "latency" else r.size_bytes, r.search_score) for r in rows]
        plot_pareto(results, search.allowed, ctx.baseline.fp32_search, objective, res.path("pareto.png"), marks)
        attribution, kinds = attribution_table(ctx, [("fp32", fp32_plan), ("naive int8", naive),
                                                     (candidate_name, candidate)])
        plot_attribution(kinds, res.path("attribution.png"))
        t_end = time.perf_counter()
        per_trial = search.trial_seconds / max(len(search.study.trials), 1)
        overhead = 1 - search.scoring_seconds / max(search.trial_seconds, 1e-9)
        n_layers = len(ctx.candidates())
        total_evals = profile.meta["evaluations"] + d.evaluations + len(results)
        summary = [
            f"Model `{ctx.prepared.name}` ({ctx.prepared.fingerprint}), metric {ctx.workload.metric.name}, "
            f"allowed drop {search.allowed:.4g} on search data; target {ctx.workload.target}.",
            f"{len(search.study.trials)} trials ({len(results)} complete, {repaired} of them repair steps), "
            f"{len(search.dims.searched)} layers searched, {len(search.dims.fixed)} fixed "
            f"(measured joint drop {d.joint_drop if d.joint_drop is not None else 'n/a'}). "
            f"Model evaluations: {total_evals} = analysis {profile.meta['evaluations']} "
            f"(on {profile.samples} samples) + fixing {d.evaluations} + trials {len(results)}; "
            f"{total_evals / max(n_layers, 1):.1f} per layer ({n_layers} layers). INT8 pays for {pays} layers.",
            f"Time: total {t_end - t_start:.1f}s: analysis {t_analyzed - t_start:.1f}s, search "
            f"{t_searched - t_analyzed:.1f}s ({per_trial:.2f}s/trial, {overhead:.0%} of it not scoring), "
            f"report {t_end - t_searched:.1f}s.",
            verdict or (f"Chosen plan: test drop {metrics['test_drop']:.4f} (budget {search.allowed:.4g}), "
                        f"{fp32_row.latency_ms / chosen_row.latency_ms:.2f}x faster than FP32 "
                        f"(timing spread ±{max(chosen_row.latency_spread, fp32_row.latency_spread):.0%}), "
                        f"{chosen_row.size_bytes / fp32_row.size_bytes:.2f}x the size."),
            f"Fusion check (after ONNX Runtime's optimizer): chosen plan {fusion.line()}; "
            f"naive INT8 {naive_fusion.line()}.",
            *([forms_line(profile)] if profile.forms else []),
        ]
        tables = [("Layers (graph order): sensitivity, measured INT8 cost, naive vs chosen", layer_table(chosen, naive, profile)),
                  ("Where the time goes (ONNX Runtime per-node profile, one batch)", attribution),
                  ("Fused kernels after ONNX Runtime's optimizer", fusion_table([*fusions, ("naive int8", naive_fusion)]))]
        write_report(res.dir, f"qsearch report: {ctx.prepared.name}", summary, rows, ctx.workload.metric.name,
                     fp32_row.latency_ms, fp32_row.size_bytes,
                     [("Pareto front", res.path("pareto.png")), ("Where the time goes", res.path("attribution.png")),
                      ("Layer sensitivity", out / "sensitivity.png")], tables)
        res.commit()
        print("\n".join(summary))
        from qsearch.report import rows_markdown

        print(rows_markdown(rows, ctx.workload.metric.name, fp32_row.latency_ms, fp32_row.size_bytes))
        log(f"wrote {out / 'plan.yaml'}, {out / 'model.qsearch.onnx'}, {out / 'report.md'}, {out / 'report.html'}, "
            f"{len(pareto)} Pareto plans in {out / 'pareto'}")
        return 0


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


def apply_plan(plan: Plan | str, model_path: str, output: str | None = None) -> onnx.ModelProto:
    """The plan's QDQ model for `model_path`, checked; written atomically to `output` if given."""
    plan_path = str(plan) if not isinstance(plan, Plan) else "plan"
    if output is not None:
        ensure_writable_file(output, "-o", (plan_path, model_path))
    if not isinstance(plan, Plan):
        plan = Plan.read(plan_path)
    prepared = prepare(load_model(model_path), name=Path(model_path).stem, source=model_path)
    plan.validate(prepared, plan_path)
    from qsearch.rewrite import Rewriter

    t0 = time.perf_counter()
    model = Rewriter(prepared)(plan)
    dt = time.perf_counter() - t0
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise QsearchError(f"{plan_path}: rewritten model fails the ONNX checker: {str(exc).splitlines()[0]}") from None
    if output is not None:
        atomic_write_bytes(output, model.SerializeToString())
        n8 = sum(plan.choice(la.name).is_int8 for la in prepared.layers)
        log(f"wrote {output}: {n8}/{len(prepared.layers)} layers INT8, rewrite {dt * 1e3:.0f} ms")
    return model


def show_plan(plan: Plan | str, model_path: str | None = None) -> str:
    from qsearch.review import show_text

    plan_path = str(plan) if not isinstance(plan, Plan) else "plan"
    if not isinstance(plan, Plan):
        plan = Plan.read(plan_path)
    if model_path is not None:
        prepared = prepare(load_model(model_path), name=Path(model_path).stem, source=model_path)
        plan.validate(prepared, plan_path)
        plan = plan.completed(prepared)
    return show_text(plan)


def run_evaluate(model_path: str, config: str | None, out: Path, eval_timeout=None) -> dict:
    _check_eval_timeout(eval_timeout)
    ctx = open_context(config, out, eval_timeout)
    model = load_model(model_path)
    try:
        sess = make_session(model, ctx.workload.threads)
    except Exception as exc:
        raise QsearchError(f"{model_path}: ONNX Runtime cannot load the model: {str(exc).splitlines()[0]}") from None
    # the model must take the workload's data: same input names and element types
    want = {i.name: i.dtype for i in ctx.prepared.inputs}
    have = {i.name: i.type for i in sess.get_inputs()}
    if set(want) != set(have):
        raise QsearchError(f"{model_path}: its inputs {sorted(have)} do not match the workload's data "
                           f"{sorted(want)} ({ctx.workload.path})")
    try:
        r = {
            "model": model_path,
            "metric": ctx.workload.metric.name,
            "search": ctx.search_scorer.score(sess),
            "test": ctx.test_scorer.score(sess),
            "latency_ms": latency_ms(sess, ctx.latency_feed, repeat=30),
            "size_bytes": model_size(model),
            "fp32_test": ctx.fp32_test,
            "fp32_latency_ms": ctx.baseline.fp32_latency_ms,
        }
    except (QsearchError, limits.EvaluationTimeout):
        raise
    except Exception as exc:  # ORT refused the data (shape, type) or the metric the outputs
        raise QsearchError(f"{model_path}: scoring on the workload's data failed: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    print(f"{model_path}: {r['metric']} search {r['search']:.4f}, test {r['test']:.4f} (fp32 {r['fp32_test']:.4f}); "
          f"latency {r['latency_ms']:.3f} ms ({r['fp32_latency_ms'] / r['latency_ms']:.2f}x vs fp32); "
          f"size {r['size_bytes'] / 1024:.1f} KiB")
    return r


def run_baseline(kind: str, config: str | None, out: Path, output: str, method: str, granularity: str,
                 eval_timeout=None) -> None:
    _check_eval_timeout(eval_timeout)
    ensure_writable_file(output, "-o", (config,))
    ctx = open_context(config, out, eval_timeout)
    ensure_writable_file(output, "-o", (ctx.workload.model,))
    if kind == "naive":  # in the forms `optimize` would measure for it (hardswish fused or not)
        ctx.forms, _ = sensitivity.choose_forms(ctx, {la.name: LayerChoice("int8", method, granularity)
                                                      for la in ctx.candidates()})
        plan = ctx.uniform_plan(method, granularity)
    elif kind in ("fp32", "fp16"):
        if kind == "fp16" and ctx.workload.target != "fp16":
            raise QsearchError(f"{ctx.workload.path}: baseline fp16 needs 'target: fp16' (target is {ctx.workload.target})")
        plan = ctx.plan({})
    else:  # hybrid: the greedy fallback, which needs the sensitivity profile
        profile = sensitivity.analyze(ctx, cache_dir=out / "cache", progress=Progress("analyze"))
        plan, _ = greedy_fallback(ctx, profile, method, granularity)
        plan = plan.with_why(layer_reasons(plan, profile, absorbed=ctx.prepared.absorbed(plan.forms)))
    ev = ctx.evaluate(plan, "test")
    plan = plan.with_info({"test": ev.score, "latency_ms": ev.latency_ms, "size_bytes": ev.size_bytes,
                           "fp32_test": ctx.fp32_test}, baseline=kind)
    plan.write(output)
    log(f"wrote {output}: {kind} plan, test {ctx.workload.metric.name} {ev.score:.4f} "
        f"(fp32 {ctx.fp32_test:.4f}), latency {ev.latency_ms:.3f} ms")


def run_profile(model_path: str, config: str | None, top: int = 15, output: str | None = None):
    """Where the time goes in any ONNX model (the user's own, a qsearch or ORT QDQ model) on the
    workload's latency batch: ORT's per-node profile by kind, by op type and by layer of the
    workload's model. Needs no calibration and no scoring."""
    from qsearch import data, profiling
    from qsearch.pipeline import latency_feed

    if top < 1:
        raise QsearchError(f"--top must be >= 1, got {top}")
    workload = load_workload(config)
    if output is not None:
        ensure_writable_file(output, "-o", (model_path, config, workload.model))
    prepared = prepare(load_model(workload.model), name=workload.name, source=str(workload.model))
    model = load_model(model_path)
    try:
        sess = make_session(model, workload.threads)
    except Exception as exc:
        raise QsearchError(f"{model_path}: ONNX Runtime cannot load the model: {str(exc).splitlines()[0]}") from None
    want = {i.name for i in prepared.inputs}
    have = {i.name for i in sess.get_inputs()}
    if want != have:
        raise QsearchError(f"{model_path}: its inputs {sorted(have)} do not match the workload's data {sorted(want)} "
                           f"({workload.path})")
    search = data.load(workload.search, prepared.inputs, workload.batch_size, workload.base)
    feed = latency_feed(search.batches[0], prepared, workload.latency_batch)
    try:
        prof = profiling.profile(prepared, model, feed, workload.threads, runs=10)
    except Exception as exc:
        raise QsearchError(f"{model_path}: profiling on the workload's data failed: {str(exc).splitlines()[0]}") from None
    fusion = fusion_check(model)
    batch = len(next(iter(feed.values())))
    total = max(prof.total_ms, 1e-12)
    lines = [f"{model_path}: {prof.total_ms:.3f} ms per batch of {batch} in ONNX Runtime's kernels "
             f"(CPU, {workload.threads} thread(s), mean of 10 runs); {fusion.line()}", "",
             "| kind | ms | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.3f} | {v / total:.0%} |" for k, v in prof.by_kind.items()]
    lines += ["", "| op type | ms | share |", "|---|---:|---:|"]
    ops = sorted(prof.by_op.items(), key=lambda kv: -kv[1])
    lines += [f"| {op} | {ms:.3f} | {ms / total:.0%} |" for op, ms in ops[:top]]
    layers = sorted(prof.by_layer.items(), key=lambda kv: -sum(kv[1].values()))
    lines += ["", f"| layer of `{workload.name}` | " + " | ".join(f"{k} ms" for k in profiling.KINDS) + " | total ms |",
              "|---|" + "---:|" * (len(profiling.KINDS) + 1)]
    lines += [f"| {name} | " + " | ".join(f"{k[x]:.3f}" for x in profiling.KINDS) + f" | {sum(k.values()):.3f} |"
              for name, k in layers[:top]]
    print("\n".join(lines))
    if output is not None:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["layer", *profiling.KINDS, "total_ms"])
        for name, k in layers:
            w.writerow([name, *(round(k[x], 6) for x in profiling.KINDS), round(sum(k.values()), 6)])
        atomic_write_text(output, buf.getvalue())
        log(f"wrote {output}: {len(layers)} layers")
    return prof
