"""The result set of `optimize`: plan.yaml (and its sidecar), the model, the Pareto plans, the
trials, report.md and report.html, staged in an `OutputSet` and written as one; or, with no plan
within budget, the closest plans and the one line that says why."""

from __future__ import annotations

import csv
import io
import shlex
import time
from pathlib import Path

from qsearch import engine as engines
from qsearch.analysis import profiling
from qsearch.analysis.sensitivity import SensitivityProfile
from qsearch.engine.base import profiles_nodes
from qsearch.engine.hook import ARITHMETIC_NOTE
from qsearch.evaluator import Evaluator
from qsearch.files import OutputSet, atomic_write_bytes, atomic_write_text
from qsearch.finalize import FinalChoice, layer_reasons, trial_plan
from qsearch.limits import Stage
from qsearch.plan.build import weight_copies
from qsearch.plan.format import Plan
from qsearch.plan.io import read_plan
from qsearch.plan.widths import plan_widths
from qsearch.progress import log, say
from qsearch.report import html as htmlreport
from qsearch.report.markdown import (
    Row,
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
from qsearch.search.study import Search
from qsearch.search.trials import SearchResult
from qsearch.workbench import Workbench

ALTERNATIVE = "plan.within-test.yaml"  # beside a plan over budget on test: the fastest within on both splits
RESULT_FILES = ("plan.yaml", "plan.recovery.onnx", "model.qsearch.onnx", "report.md", "report.html", "pareto.png",
                "attribution.png", "pareto", "trials.csv", "closest", ALTERNATIVE, "plan.within-test.recovery.onnx")


def _analysis_cost(profile: SensitivityProfile, seconds: float, total_s: float) -> str:
    """The analysis's cost per layer and per option probed (recovery variants included), and its share."""
    layers = max(len(profile.layers), 1)
    options = sum(len(x.proxy_sqnr) for x in profile.layers)
    return (f"Analysis: {seconds / layers:.2f}s and {profile.meta.get('evaluations', 0) / layers:.2f} evaluations "
            f"per layer, {options} options probed ({options / layers:.1f} per layer, recovery variants included) "
            f"in {profile.meta.get('proxy_passes', 0)} proxy passes"
            + (f" on {profile.meta['proxy_samples']} samples" if "proxy_samples" in profile.meta else "")
            + f" ({seconds / max(options, 1) * 1e3:.0f} ms per option); {seconds / max(total_s, 1e-9):.0%} of the run."
            + (f" The screen ran on {profile.meta['screen_samples']} samples per layer (at most half of what the "
               "search's trials cost, counting at most twice the ceiling stop's patience)." if "screen_samples" in profile.meta else ""))


def no_plan(res: OutputSet, out: Path, evaluator: Evaluator, search: SearchResult, timeout) -> None:
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


def _metrics(bench: Workbench, profile: SensitivityProfile, search: SearchResult, choice: FinalChoice,
             stage: Stage) -> dict:
    """What the shipped plan records of its run: scores, latency, size (and GBOPs where an analytic
    cost decided), evaluations and seconds per stage."""
    fp32_row, chosen_row = choice.fp32, choice.chosen
    rows = {"fp32": fp32_row, "plan": chosen_row}
    return {
        "metric": bench.workload.metric.name,
        **{k: {"search": r.search_score, "test": r.test_score, "latency_ms": r.latency_ms, "size_bytes": r.size_bytes,
               **({"gbops": r.bitops} if r.bitops is not None else {})} for k, r in rows.items()},
        "max_drop": search.allowed,
        "test_drop": fp32_row.test_score - chosen_row.test_score,
        "evaluations": {"analysis": profile.meta["evaluations"], "fixing": search.decision.evaluations,
                        "trials": len(search.trials), "final": choice.evaluations, "layers": len(bench.candidates())},
        "seconds": {k: round(v, 3) for k, v in stage.seconds.items()},
    }


def write_result(res: OutputSet, out: Path, bench: Workbench, evaluator: Evaluator, profile: SensitivityProfile,
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
    metrics = _metrics(bench, profile, search, choice, stage)
    chosen_model = bench.rewriter(chosen)
    fusion = fusion_check(chosen_model, bench.engine)
    naive_fusion = fusion_check(bench.rewriter(naive), bench.engine)
    fusions = [(chosen_row.name, fusion)] + ([] if choice.candidate is chosen or not choice.verdict else
                                             [(choice.candidate_name, fusion_check(bench.rewriter(choice.candidate), bench.engine))])
    # what ORT really runs, in the plan too: candidate layers INT8, int8 kernels, unfused Q/DQ
    int8 = {la.name for la in bench.candidates() if chosen.choice(la.name).quantized}
    metrics["fusion"] = {"int8_layers": len(int8), "int8_kernels": fusion.int8_kernels,
                         "unfused_qdq": fusion.unfused_qdq, "borders": search.problem.borders(int8)}
    wide = plan_widths(bench.prepared, chosen)
    if wide.bits:  # int16 layers: how many, and the int8/int16 conversions they cost
        metrics["fusion"]["int16_layers"] = sum(chosen.choice(n).precision == "int16" for n in int8)
        metrics["fusion"]["int8_int16_conversions"] = wide.borders
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
    kinds, where = _attribution(bench, naive, choice)
    plot_attribution(kinds, res.path("attribution.png"))
    stage("done", stage.kept)
    summary = _summary(bench, profile, search, choice, metrics, fusion, naive_fusion, time.perf_counter() - t_start)
    summary += _plan_lines(bench, chosen)
    tables = [("Layers (graph order): sensitivity, measured INT8 cost, naive vs chosen", layer_table(chosen, naive, profile)),
              (f"Where the time goes (ONNX Runtime per-node profile, one batch{where})", attribution_table(kinds)),
              ("Fused kernels after ONNX Runtime's optimizer", fusion_table([*fusions, ("naive int8", naive_fusion)])),
              ("Finalists that did not ship (timed in the same interleaved rounds)",
               finalists_table(choice.finalists, bench.workload.metric.name, fp32_row))]
    rows = list(choice.rows)
    title, metric = f"qsearch report: {bench.prepared.name}", bench.workload.metric.name
    verdict = _verdict(res, choice, fp32_row, chosen_row, search.allowed, metric)
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
    hint = qat_hint(bench, pareto, search.allowed, chosen_row, out)
    if hint:
        log(hint)
    log(f"wrote {out / 'plan.yaml'}, {out / 'model.qsearch.onnx'}, {out / 'report.md'}, {out / 'report.html'}, "
        f"{len(pareto)} Pareto plans in {out / 'pareto'}")
    return chosen


def _fusion_source(bench: Workbench) -> str:
    return f"the compiled model on {bench.workload.engine}" if hasattr(bench.engine, "fusion") else \
        "after ONNX Runtime's optimizer"


NOISE_FLOOR = 0.05  # a trial timing is one measurement: never trust a gap below 5%


def qat_hint(bench: Workbench, pareto, allowed: float, shipped, out: Path) -> str:
    """One line naming the fastest Pareto plan that missed the budget, when it beats the shipped
    plan by more than the timing noise (the final rounds' spread), with the `finetune` command that
    may bring it within budget; '' when there is none."""
    if bench.workload.space.objective != "latency":
        return ""
    margin = max(shipped.latency_spread, NOISE_FLOOR)
    missed = [r for r in pareto if r.drop > allowed and r.latency_ms < shipped.latency_ms * (1 - margin)]
    if not missed:
        return ""
    r = min(missed, key=lambda r: r.latency_ms)
    plan = out / "pareto" / f"plan-trial{r.number:04d}.yaml"
    cmd = shlex.join(["qsearch", "finetune", "--config", str(bench.workload.path), "--plan", str(plan),
                      "--out", str(out / "qat")])
    return (f"trial {r.number}'s plan is {shipped.latency_ms / r.latency_ms:.2f}x the shipped plan's speed (its trial "
            f"timing; shipped ±{shipped.latency_spread:.0%}) but loses {r.drop:.4g} on search (budget "
            f"{allowed:.4g}); quantization-aware training may bring it within budget: {cmd}")


def _attribution(bench: Workbench, naive: Plan, choice: FinalChoice) -> tuple[dict, str]:
    """Per-node time by kind of FP32, naive INT8 and the chosen plan, and where it was measured: a
    latency hook's device gives no per-node profile, so ONNX Runtime on this machine shows it."""
    local = bench.engine if profiles_nodes(bench.engine) else engines.create(threads=bench.workload.threads)
    kinds = {name: {k: round(v, 4) for k, v in profiling.profile(bench.prepared, bench.rewriter(plan),
                                                                  bench.latency_feed, local).by_kind.items()}
             for name, plan in (("fp32", bench.plan({})), ("naive int8", naive), (choice.candidate_name, choice.candidate))}
    return kinds, "" if local is bench.engine else ", on this machine: the hooked device gives none"


def _verdict(res: OutputSet, choice: FinalChoice, fp32_row, chosen_row, allowed: float, metric: str) -> str:
    """The verdict sentence; a test miss's alternative plan written beside it; logged when it warns."""
    verdict = verdict_line(fp32_row, chosen_row, allowed, metric, bool(choice.verdict),
                           edge=choice.resolution_note.startswith("the search split cannot tell"), ratio=choice.speedup,
                           alternative=f"{choice.alternative_name}, in {ALTERNATIVE}" if choice.alternative else "")
    if choice.alternative is not None:
        choice.alternative.write(res.path(ALTERNATIVE))
    if "OVER THE BUDGET" in verdict or verdict.startswith("The search split cannot tell"):
        log(verdict)  # never only in a table
    return verdict


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
        f"per layer ({n_layers} layers). INT8 pays for {pays} layers."
        + (f" The study {search.stopped.text()}." if search.stopped else ""),
        f"Time: total {total_s:.1f}s: " + ", ".join(f"{k} {v:.1f}s" for k, v in sec.items())
        + f" ({per_trial:.2f}s/trial). " + _analysis_cost(profile, sec.get("analysis", 0.0), total_s),
        *(["The machine was busy while timing (wall time well above the thread's CPU time): every plan was "
           "timed again, and plans were compared on thread CPU time, which a busy core does not inflate."]
          if choice.cpu_clock else []),
        *([f"Search drop of the chosen plan: {chosen_row.interval}."] if chosen_row.interval else []),
        *([choice.resolution_note[0].upper() + choice.resolution_note[1:] + "."] if choice.resolution_note else []),
        choice.verdict or (f"Chosen plan: test drop {metrics['test_drop']:.4f} (budget {search.allowed:.4g}), "
                           + (f"{speed(choice.speedup.value)} ({choice.speedup.text()} paired by round), "
                              if choice.speedup is not None else
                              f"{speed(fp32_row.latency_ms / chosen_row.latency_ms)} (timing spread "
                              f"±{max(chosen_row.latency_spread, fp32_row.latency_spread):.0%}), ")
                           + f"{chosen_row.size_bytes / fp32_row.size_bytes:.2f}x the size." + test_miss(fp32_row, chosen_row, search.allowed,
                                                                                  choice.alternative_name
                                                                                  if choice.alternative else None)),
        f"Fusion check ({_fusion_source(bench)}): chosen plan {fusion.line()}, "
        f"{metrics['fusion']['borders']} float/INT8 borders between candidate layers; naive INT8 {naive_fusion.line()}.",
        *([forms_line(profile)] if profile.forms else []),
        *([f"Latency: measured by the hook {bench.workload.latency} ({bench.engine.calls} calls in this process); "
           f"{ARITHMETIC_NOTE.format(engine=bench.workload.engine)}."] if bench.workload.latency else []),
    ]


def test_miss(fp32: Row, chosen: Row, allowed: float, alternative: str | None) -> str:
    """The summary's own words for a plan over budget on test data (never only in the report);
    `alternative`: the fastest plan within budget on both splits, written to ALTERNATIVE."""
    if not fp32.test_score - chosen.test_score > allowed + 1e-12:
        return ""
    return " OVER THE BUDGET ON TEST DATA: " + (
        f"the fastest plan within budget on both splits, {alternative}, is in {ALTERNATIVE}."
        if alternative else "no other plan timed that beats FP32 is within budget on both splits.")


def trials_csv(path: Path, search: Search) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    layers = list(search.dims.searched)  # one column per searched layer: its option in that trial
    w.writerow(["trial", "state", "score", "drop", "cost", "latency_ms", "size_bytes", "bitops", "feasible", "worker", *layers])
    for t in search.study.trials:
        a = t.user_attrs
        plan = a.get("choices") or t.system_attrs.get("fixed_params") or t.params
        w.writerow([t.number, t.state.name, a.get("score", ""), a.get("drop", a.get("drop_estimate", "")),
                    a.get("cost", ""), a.get("latency_ms", ""), a.get("size_bytes", ""), a.get("bitops", ""),
                    "" if "drop" not in a else a["drop"] <= search.allowed + 1e-12, a.get("worker", ""),
                    *(plan.get(n, "") for n in layers)])
    atomic_write_text(path, buf.getvalue())
