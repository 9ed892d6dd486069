"""The final stage: the search's finalists and the baselines scored on search and test data, timed
side by side in interleaved rounds, and the choice of the plan to ship.

A simpler plan that is as good wins: qsearch never ships a plan slower than naive INT8 when naive
meets the budget, and never one slower than FP32 (then FP32 ships, said plainly).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass

import numpy as np

from qsearch import timing
from qsearch.analysis.sensitivity import SensitivityProfile
from qsearch.choice import (
    BUSY_RATIO,
    busy,
    cheapest_clear,
    clock,
    decide,
    fp32_instead,
    pays,
    prefer_clear,
    resolution_note,
    round_spread,
    speedup,
    why_lost,
)
from qsearch.evaluator import Evaluator, bitops
from qsearch.plan.format import LayerChoice, Plan
from qsearch.recovery import rounding
from qsearch.report.markdown import Row
from qsearch.resolution import clearly_over
from qsearch.scoring import model_size
from qsearch.search import strategy
from qsearch.search.problem import Problem
from qsearch.search.trials import SearchResult, TrialResult
from qsearch.workbench import Workbench

RESCUE_FACTOR = 2.0  # learned rounding tries a cheaper trial over budget by at most this factor
ROUNDED_LAYERS = 24  # the most sensitive INT8 layers it fits
TIMING_S = 0.35  # seconds of runs per plan per timing round (`timing.MIN_RUNS` to 15 runs)


@dataclass(frozen=True)
class Entry:
    """A plan to put in the final table: its row name, its search score where already measured
    (trials, baselines built by measuring), and the evaluations that produced it."""

    name: str
    plan: Plan
    evaluations: int | None
    trial: TrialResult | None = None  # the study's trial, for a searched plan
    search: float | None = None

@dataclass(frozen=True)
class FinalChoice:
    rows: tuple[Row, ...]  # FP32, naive, hybrid, then the shipped plan's row (named for what it is)
    plan: Plan  # what ships in plan.yaml
    candidate: Plan  # the fastest INT8 plan within budget (differs from `plan` when FP32 ships)
    candidate_name: str
    trial: TrialResult | None  # the shipped searched trial (None: a baseline or FP32 ships)
    verdict: str  # non-empty when FP32 ships because no INT8 plan pays
    evaluations: int  # spent by this stage (baselines and the test split)
    cpu_clock: bool = False  # the machine was busy: plans were compared on thread CPU time
    resolution_note: str = ""  # a warning when the budget is finer than the search split resolves
    finalists: tuple[Row, ...] = ()  # the search's finalists that did not ship, each with why
    alternative: Plan | None = None  # the shipped plan is over budget on test: the fastest within on both splits
    alternative_name: str = ""
    speedup: timing.Ratio | None = None  # FP32's time over the shipped plan's, paired by round

    @property
    def fp32(self) -> Row:
        return self.rows[0]

    @property
    def chosen(self) -> Row:
        return self.rows[-1]


def timed_rows(bench: Workbench, evaluator: Evaluator, entries: Sequence[Entry],
               allowed: float = math.inf) -> tuple[list[Row], list]:
    """Time the entries side by side in interleaved rounds (wall and thread CPU time; `timing`):
    MIN_ROUNDS first, then one more at a time while a plan within `allowed` on search data (or
    FP32) could still be faster than the fastest by more than the tie and the rounds cannot tell,
    up to CAP_ROUNDS. Each row keeps its per-round times (comparisons are paired ratios) and shows
    its best. Search scores are the ones already measured (scored here only where missing); test
    scores come later, for the rows shown. Each timing takes about TIMING_S, whatever the model's
    speed."""
    built = []
    for e in entries:
        proto = bench.rewriter(e.plan)
        search = e.search if e.search is not None else evaluator.evaluate(proto, timing=False).score
        n8 = sum(e.plan.choice(la.name).quantized for la in bench.prepared.layers)
        built.append((e, evaluator.session(proto), proto, n8, search))
    repeat = timing.runs_within(TIMING_S, bench.baseline.fp32_latency_ms / 1e3, 15)
    done = [0]  # rounds so far: the first warms every session up (twice), later ones once

    def time_round(active: Sequence[int]) -> list[tuple[float, float]]:
        warmup = 2 if done[0] == 0 else 1
        done[0] += 1
        return [astuple(bench.engine.time(built[k][1], bench.latency_feed, warmup=warmup, repeat=repeat))
                for k in active]

    among = [0] + [k for k in range(1, len(built)) if built[0][4] - built[k][4] <= allowed + 1e-12]
    # search scores order the margins (one FP32 and one budget for all): rounds go on only where a tie could ship
    wall, cpu = timing.interleaved(time_round, len(built), among, _busy_rounds, margins=[b[4] for b in built])
    analytic = bench.workload.space.objective == "bitops"
    rows = [Row(e.name, search, float("nan"), float(np.nanmin(wall[i])), model_size(proto), n8, e.evaluations,
                latency_spread=round_spread(wall[i]), cpu_ms=float(np.nanmin(cpu[i])), cpu_spread=round_spread(cpu[i]),
                wall_rounds=tuple(wall[i]), cpu_rounds=tuple(cpu[i]),
                bitops=bitops(bench, e.plan) if analytic else None)
            for i, (e, _, proto, n8, search) in enumerate(built)]
    return rows, [b[1] for b in built]


def _busy_rounds(wall: list[list[float]], cpu: list[list[float]]) -> bool:
    """Whether the machine took the core away while timing (median wall / CPU time per plan)."""
    return float(np.median([np.nanmedian(w) / max(np.nanmedian(c), 1e-9) for w, c in zip(wall, cpu)])) > BUSY_RATIO


def with_interval(evaluator: Evaluator, plan: Plan, row: Row, session=None, fp32_session=None) -> Row:
    """The row with its search drop's interval and the split's resolution (one more evaluation)."""
    _, iv = evaluator.search_with_interval(plan, session, fp32_session)
    return dataclasses.replace(row, interval="" if iv is None else iv.text(),
                               resolution=None if iv is None else iv.resolution)


def clear_choice(evaluator: Evaluator, entries: Sequence[Entry], rows: list[Row], sessions: list, i: int,
                 allowed: float, cpu: bool, compared: int) -> tuple[int, set[int]]:
    """`choice.prefer_clear` with intervals measured here (one more search evaluation each)."""
    def interval(k: int) -> Row:
        return with_interval(evaluator, entries[k].plan, rows[k], sessions[k], sessions[0])

    return prefer_clear(rows, i, allowed, cpu, interval, compared)


def scored(evaluator: Evaluator, plan: Plan, row: Row, interval: bool = False, session=None, fp32_session=None) -> Row:
    """The row with its test score (and, with `interval`, its search drop's bootstrap interval);
    `session`: the plan's session, already built for timing."""
    test = evaluator.evaluate(plan, "test", timing=False, session=session).score
    if not interval:
        return dataclasses.replace(row, test_score=test)
    _, iv = evaluator.search_with_interval(plan, session, fp32_session)
    return dataclasses.replace(row, test_score=test, interval="" if iv is None else iv.text(),
                               resolution=None if iv is None else iv.resolution)


def trial_plan(evaluator: Evaluator, search: SearchResult, r: TrialResult) -> Plan:
    """A trial's plan, with the study and trial it came from."""
    return evaluator.plan(r.choices).with_info(study=search.study_name, trial=r.number)


def rounded_entries(bench: Workbench, evaluator: Evaluator, search: SearchResult, log=print) -> list[Entry]:
    """Learned rounding turns accuracy into speed: the cheapest trial that missed the budget by at
    most RESCUE_FACTOR x while being cheaper than every feasible trial, with codes learned for its
    most sensitive INT8 layers (at most ROUNDED_LAYERS, within `rounding.CAP_S` and a tenth of the
    search's time). One more evaluation; a finalist when it then fits the budget."""
    if "round" not in bench.workload.space.recovery:
        return []
    cheapest = min((r.cost for r in search.trials if r.feasible), default=math.inf)
    over = [r for r in search.trials if not r.feasible and r.cost < cheapest and r.drop <= RESCUE_FACTOR * search.allowed]
    if not over:
        return []
    r = min(over, key=lambda t: (t.cost, t.drop, t.number))
    noise = {x.name: x.noise for x in search.problem.layers}
    int8 = sorted((n for n, lbl in r.choices.items() if lbl != search.problem.float_label),
                  key=lambda n: (-noise.get(n, 0.0), n))[:ROUNDED_LAYERS]
    cap = min(rounding.CAP_S, max(10.0, 0.1 * search.trial_seconds))
    plan, rounded = rounding.learn_for_plan(bench, trial_plan(evaluator, search, r), int8, cap)
    if not rounded:
        return []
    score = evaluator.evaluate(plan, "search", timing=False).score
    drop = bench.baseline.fp32_search - score
    fits = drop <= search.allowed + 1e-12
    log(f"learned rounding on trial {r.number} (drop {r.drop:.4g}, over the budget {search.allowed:g}): "
        f"{len(rounded)} layers -> drop {drop:.4g}, {'within budget: a finalist' if fits else 'still over'}")
    return [Entry(f"qsearch (trial {r.number} + learned rounding)", plan, len(search.trials) + 1, r, score)] \
        if fits else []


def finalize(bench: Workbench, evaluator: Evaluator, search: SearchResult, log=print) -> FinalChoice:
    """Baselines (FP32, naive INT8, the greedy fallback) and the finalists, timed side by side;
    the fastest within budget on search data ships (timing ties to the larger margin), unless it
    is slower than FP32 on a CPU target. Test data is scored once, for the rows the report shows."""
    start = evaluator.evaluations
    fp32_plan = bench.plan({})
    naive = bench.uniform_plan("minmax", "per_tensor")
    memo: dict[tuple, float] = {}
    hybrid, hybrid_evals, hybrid_drop = greedy_fallback(bench, evaluator, search.problem, memo=memo)
    n_trials = len(search.trials)
    fp32_search = bench.baseline.fp32_search
    naive_label = LayerChoice("int8", "minmax", "per_tensor", weights=bench.workload.space.weights[0]).label()
    naive_drop = memo.get(tuple(sorted((la.name, naive_label) for la in bench.candidates())))
    entries = [Entry("fp32", fp32_plan, None, search=fp32_search),
               Entry("naive int8 (minmax, per-tensor)", naive, 1,
                     search=None if naive_drop is None else fp32_search - naive_drop),  # greedy's first step
               Entry("hybrid (greedy fallback)", hybrid, hybrid_evals, search=fp32_search - hybrid_drop)]
    entries += [Entry(f"qsearch (trial {r.number})", trial_plan(evaluator, search, r), n_trials, r, r.score)
                for r in search.finalists()]
    entries += rounded_entries(bench, evaluator, search, log)
    rows, sessions = timed_rows(bench, evaluator, entries, search.allowed)
    on_cpu = busy(rows)
    # distinct plans scored on the search split the choice is made among (a plan the sampler drew
    # again scores the same: no second draw of the split's noise)
    compared = len({frozenset(r.choices.items()) for r in search.trials}) + hybrid_evals + 1
    objective = bench.workload.space.objective
    if objective != "latency" and not bench.workload.latency:  # an analytic cost decides, not this CPU's time
        i, checked = cheapest_clear(rows, search.allowed, objective, lambda k: with_interval(
            evaluator, entries[k].plan, rows[k], sessions[k], sessions[0]), compared)
        fp32_ships = fp32_instead(rows, i, bench.workload.target, on_cpu)  # on a CPU, never slower than FP32
    else:
        i, fp32_ships = decide(rows, search.allowed, bench.workload.target, on_cpu)
        checked = set()
        if not fp32_ships:  # the plan that ships must be clear of the budget by what the split resolves
            i, checked = clear_choice(evaluator, entries, rows, sessions, i, search.allowed, on_cpu, compared)
            fp32_ships = fp32_instead(rows, i, bench.workload.target, on_cpu)  # never slower than FP32
    # test data for the rows the report shows; a baseline already over budget on search data is not
    # worth a test scoring (its row says so)
    over = {k for k in (1, 2) if rows[0].search_score - rows[k].search_score > search.allowed + 1e-12}
    rows = [scored(evaluator, entries[k].plan, rows[k], k == i and k not in checked, sessions[k], sessions[0])
            if k in (0, 1, 2, i) and k not in over else rows[k] for k in range(len(rows))]
    chosen, row, trial = entries[i].plan, rows[i], entries[i].trial
    if trial is None:  # a baseline: say so in the row's name
        row = _renamed(row, f"qsearch: {row.name} (fastest within budget)", n_trials)
        chosen = chosen.with_info(study=search.study_name, trial=None, chosen_from="baseline")
    candidate, candidate_name, verdict = chosen, row.name, ""
    fp32 = rows[0]
    if fp32_ships:
        # the contract: never slower than FP32. Say so plainly and ship FP32, keeping the INT8 plan for review.
        verdict = (f"No INT8 plan within budget beats FP32 here: the best ({candidate_name}) runs at "
                   f"{fp32.latency_ms / row.latency_ms:.2f}x FP32 speed, so plan.yaml keeps every layer FP32 "
                   f"(the INT8 plan is in pareto/; see the latency attribution for where the time goes).")
        chosen = fp32_plan.with_info(study=search.study_name, trial=None)
        row = _renamed(fp32, "qsearch: FP32 (no INT8 plan pays)", n_trials, int8_layers=0)
    alt = None if verdict else within_both(evaluator, entries, rows, sessions, i, search.allowed, on_cpu)
    lost = tuple(dataclasses.replace(rows[k], why=why_lost(rows, i, k, search.allowed, on_cpu, compared))
                 for k in range(3, len(rows)) if k != i or verdict)
    return FinalChoice((*rows[:3], row), chosen, candidate, candidate_name, trial if not verdict else None, verdict,
                       evaluator.evaluations - start, on_cpu, resolution_note(rows[i], search.allowed, rows[0], compared),
                       finalists=lost, speedup=None if verdict else speedup(rows[0], rows[i], on_cpu),
                       alternative=None if alt is None else entries[alt].plan,
                       alternative_name="" if alt is None else rows[alt].name)


def within_both(evaluator: Evaluator, entries: Sequence[Entry], rows: list[Row], sessions: list, i: int,
                allowed: float, cpu: bool) -> int | None:
    """Where the shipped row `i` is over budget on test data: the fastest other row within budget on
    both splits that is still decidedly faster than FP32 (scored on test here, fastest first; `rows`
    gets their test scores), else None. Rows with bit-operations (an analytic objective): the
    cheapest that costs less than the float model instead."""
    fp32 = rows[0]
    if not fp32.test_score - rows[i].test_score > allowed + 1e-12:
        return None
    within = [k for k in range(1, len(rows)) if k != i and fp32.search_score - rows[k].search_score <= allowed + 1e-12]
    if fp32.bitops is not None:
        ordered = sorted((k for k in within if rows[k].bitops < fp32.bitops), key=lambda k: rows[k].bitops)
    else:
        ordered = sorted((k for k in within if pays(rows, k, cpu)), key=lambda k: clock(rows[k], cpu)[0])
    for k in ordered:
        if rows[k].test_score != rows[k].test_score:  # not scored on test yet
            rows[k] = scored(evaluator, entries[k].plan, rows[k], session=sessions[k])
        if fp32.test_score - rows[k].test_score <= allowed + 1e-12:
            return k
    return None


def _renamed(row: Row, name: str, evaluations: int, int8_layers: int | None = None) -> Row:
    return dataclasses.replace(row, name=name, evaluations=evaluations,
                               int8_layers=row.int8_layers if int8_layers is None else int8_layers)


class _Over(Exception):
    """A greedy step's slice estimate is clearly over budget."""


def greedy_fallback(bench: Workbench, evaluator: Evaluator, problem: Problem, method: str = "minmax",
                    granularity: str = "per_tensor", memo: dict | None = None) -> tuple[Plan, int, float]:
    """The peers' accuracy-control loop (`strategy.greedy_revert`) as a plan: all-INT8 with one
    method, the noisiest layers reverted until the budget holds. Returns (plan, evaluations,
    its measured search drop). `memo` collects every measured drop (its first: all-INT8)."""
    option = LayerChoice("int8", method, granularity, weights=bench.workload.space.weights[0]).label()
    drops: dict[tuple, float] = {} if memo is None else memo
    space, allowed = bench.workload.space, problem.allowed
    binomial = bench.workload.metric.name == "top1"

    def over(est: float, batches: int, head) -> None:
        """The trials' pruning rule: a step clearly over budget on the first slice stops there."""
        if clearly_over(est, allowed, (float(head[0]), float(head[1])) if binomial else None):
            raise _Over(est)

    def measure(choices) -> float:
        key = tuple(sorted(choices.items()))
        first = not drops  # all-INT8: the naive baseline, needed in full anyway
        try:
            drops[key] = d = evaluator.evaluate(evaluator.plan(dict(choices)), timing=False,
                                                check=over if space.prune and not first else None,
                                                prune_fraction=space.prune_fraction).drop
        except _Over as stop:
            d = float(stop.args[0])  # an estimate: not recorded as a measured drop
        return d

    choices, evals = strategy.greedy_revert(problem, option, measure)
    drop = drops.get(tuple(sorted(choices.items())))
    return evaluator.plan(choices), evals, drop if drop is not None else evaluator.drop(choices)


def layer_reasons(plan: Plan, profile: SensitivityProfile, fixed: Mapping[str, str] | None = None,
                  absorbed: Mapping[str, str] | None = None) -> dict[str, str]:
    """One line per layer for the reviewer: its sensitivity rank (model-output noise, this layer
    alone INT8), what INT8 measured to save or cost with its glue, and whether the search chose it.
    `absorbed`: layers inside a fused pattern (`PreparedModel.absorbed`) -> the layer they follow."""
    ranked = {x.name: (i, x) for i, x in enumerate(profile.layers, 1)}
    why = {}
    for name in plan.layers:
        if name in (absorbed or {}):
            why[name] = (f"part of the hardswish gate of layer {absorbed[name]}, which runs as one op (forms: "
                         "hardswish fused, the faster form measured): follows that layer's choice")
            continue
        if name not in ranked:
            why[name] = "not a search candidate (search_space.candidates)"
            continue
        rank, x = ranked[name]
        gain = x.gain_ms
        cost = f"INT8 saves {gain:.3f} ms" if gain > 0 else f"INT8 costs {-gain:.3f} ms more"
        how = "fixed INT8 before the search (measured jointly)" if name in (fixed or {}) else "searched"
        why[name] = (f"sensitivity rank {rank}/{len(ranked)} (output SQNR {x.output_sqnr:.1f} dB"
                     f"{'' if x.screened else ', estimated'}); {cost} (measured, glue included); {how}")
    return why


def final_stage_seconds(bench: Workbench) -> float:
    """What the final stage costs, from the FP32 model's measured times: naive INT8 and the
    greedy fallback's bisection (about log2 L evaluations) on search data, the chosen plan's
    interval (and up to two more where it is not clear of the budget), four test scorings, seven
    plans timed in interleaved rounds (typically twice `timing.MIN_ROUNDS`), three per-node
    profiles, the report. Reserved out of `--timeout` so the result can still be written."""
    seconds = bench.baseline.score_seconds
    batch_s = bench.baseline.fp32_latency_ms / 1e3
    greedy = math.ceil(math.log2(len(bench.prepared.layers) + 1)) + 1
    repeat = timing.runs_within(TIMING_S, batch_s, 15)
    timed = 7 * 2 * timing.MIN_ROUNDS * (repeat + 2) * batch_s
    return seconds["search"] * (greedy + 5) + 4 * seconds["test"] + timed + 30 * batch_s + 3.0
