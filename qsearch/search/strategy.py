"""Search strategies: pure functions over what the analysis measured and a `measure` callback.

Nothing here touches ONNX, Optuna or files. A strategy gets a `Problem` (the candidate layers in
graph order with their best INT8 options, measured saving and output noise) and a callable that
scores a plan, and returns plans. That makes every strategy testable with planted numbers:
- `choose_fixed`: the quietest paying layers fixed to INT8 as a set whose *measured* joint drop
  uses at most `fix_below` of the budget (single-layer drops below a metric's resolution hide
  compounding);
- `build_dimensions`: one categorical per remaining layer (its best INT8 options, float);
- `warm_start_plans`: the first trials of the study (additive noise-model knapsacks and friends);
- `repair`: when nothing meets the budget, revert INT8 layers of the closest plan by measured
  noise per benefit, doubling then bisecting;
- `greedy_revert`: the peers' accuracy-control loop (all-INT8 with one method, the noisiest
  layers reverted until the budget holds): a baseline.
Plans are `dict[layer, option label]`; layers a plan does not name stay float.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from qsearch.search import regions
from qsearch.search.problem import Dimensions, FixDecision, Incumbent, LayerFacts, MeasureDrop, Problem


def _first(x: LayerFacts, *wanted: str) -> str | None:
    """The first of x's options whose label starts with one of `wanted` (in `wanted`'s order)."""
    for w in wanted:
        got = next((o for o in x.options if o == w or o.startswith((w + "/", w + "@"))), None)
        if got is not None:
            return got
    return None


# Candidate orders of every layer's INT8 options, each judged by one all-INT8 measurement. A
# per-layer proxy ranks a range that clips outliers (percentile, entropy, MSE) by the layer's own
# output error; it cannot see what the clipped values did downstream (on PP-OCRv4's recognizer its
# best options lose 12 points all-INT8 where MinMax per-channel everywhere gains 1).
OPTION_SETS: dict[str, object] = {
    "analysis": lambda x: None,
    "minmax": lambda x: _first(x, "int8/minmax"),
    "minmax per-channel": lambda x: _first(x, "int8/minmax/per_channel", "int8/minmax/per_tensor"),
}


def with_option_set(problem: Problem, name: str) -> Problem:
    """The problem with each layer's option from the named set first (the rest in the analysis's order)."""
    pick = OPTION_SETS[name]
    layers = []
    for x in problem.layers:
        first = pick(x)
        layers.append(x if first is None else replace(x, options=(first, *(o for o in x.options if o != first))))
    return replace(problem, layers=tuple(layers))


def choose_fixed(problem: Problem, measure: MeasureDrop) -> FixDecision:
    """Fix the quietest paying layers to INT8, but only as a set whose measured joint drop uses at
    most `fix_below` of the budget."""
    space = problem.space
    if not problem.mixable:
        return FixDecision((), None, None, 0)
    all_drop, evaluations, option_set, tried = measure(problem.best), 1, "analysis", [problem.best]
    for name in OPTION_SETS:  # other option orders, each one all-INT8 measurement: the lowest drop wins
        alt = with_option_set(problem, name)
        if alt.best not in tried:
            tried.append(alt.best)
            drop, evaluations = measure(alt.best), evaluations + 1
            if drop < all_drop:
                all_drop, option_set = drop, name
    problem = with_option_set(problem, option_set)
    layers, best = problem.layers, problem.best
    share = space.fix_below * problem.allowed
    noisiest = {x.name for x in sorted(layers, key=lambda x: (-x.noise, x.name))[: space.min_searched]}
    cands = sorted((x for x in layers if x.saving > 0 and x.name not in noisiest), key=lambda x: (x.noise, x.name))
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
            return FixDecision(tuple(chosen), drop, all_drop, evaluations, option_set)
        limit = acc / 2
    return FixDecision((), None, all_drop, evaluations, option_set)


def build_dimensions(problem: Problem, fixed_int8: tuple[str, ...] = ()) -> Dimensions:
    space = problem.space
    fixed, searched = {}, {}
    for x in problem.layers:
        options = x.options[: space.options_per_layer]
        if "int8" not in space.precisions:
            fixed[x.name] = problem.float_label
        elif "float" not in space.precisions or x.name in fixed_int8:
            fixed[x.name] = options[0]
        else:
            wide = (problem.int16(x.name),) if problem.wide else ()
            searched[x.name] = (*options, *wide, problem.float_label)
    return Dimensions(fixed, searched)


def warm_start_plans(problem: Problem, dims: Dimensions, decision: FixDecision) -> list[dict[str, str]]:
    """First trials (over the searched layers), most informative first: "INT8 only where it pays",
    the best all-INT8 plan, additive noise-model plans, FP32 in every searched layer, then the k
    noisiest layers float. The additive model: output noise powers of independent layer errors
    add, and the drop grows with the total noise; the all-INT8 measurement calibrates how much
    noise the budget buys, and layers go INT8 in order of benefit per unit of noise."""
    fp, searched, allowed = problem.float_label, dims.searched, problem.allowed
    best = {n: opts[0] for n, opts in searched.items()}
    facts = {n: problem.facts(n) for n in searched}
    pays = {n: best[n] if facts[n].saving > 0 else fp for n in searched}
    plans = [pays, best]
    if problem.wide:  # the accurate quantized end: every searched layer int16
        plans.append({n: problem.int16(n) for n in best})
    int8_fixed = [n for n, lbl in dims.fixed.items() if lbl != fp]
    fixed_noise = sum(problem.facts(n).noise for n in int8_fixed)
    total = sum(x.noise for x in problem.layers)
    all_drop = decision.all_int8_drop
    for share in (1.0, 0.5, 0.25):
        limit = total if all_drop is None or all_drop <= share * allowed else total * share * allowed / all_drop
        plan, acc = {}, fixed_noise
        for n in sorted(searched, key=lambda n: -facts[n].saving / max(facts[n].noise, 1e-12)):
            ok = facts[n].saving > 0 and acc + facts[n].noise <= limit
            plan[n] = best[n] if ok else fp
            acc += facts[n].noise if ok else 0.0
        plans.append(plan)
    plans.append(dict.fromkeys(searched, fp))
    ranked = [x.name for x in sorted(problem.layers, key=lambda x: x.rank) if x.name in searched]  # noisiest first
    for k in (1, 2, 3, 5, 8):
        if k <= len(ranked):
            plans.append({**pays, **{n: fp for n in ranked[:k]}})
    if problem.wide:  # int16 where float would go: all-INT8 with its noisiest layers widened
        for k in (1, 2, 3, 5, 8):
            if k <= len(ranked):
                plans.append({**best, **{n: problem.int16(n) for n in ranked[:k]}})
    return [dict(t) for t in dict.fromkeys(tuple(sorted(p.items())) for p in plans)]


def repair(problem: Problem, start: Mapping[str, str], measure: MeasureDrop, max_steps: int = 12) -> int:
    """No trial met the budget: revert INT8 layers of the closest plan `start`, most noise per unit
    of benefit first, in doubling steps, then bisect to keep as many INT8 as possible. Each step is
    one `measure` call (the caller records it). FP32 (everything reverted) meets any budget.
    Returns the number of evaluations spent."""
    fp = problem.float_label
    int8 = [n for n, lbl in start.items() if lbl != fp and n in problem.names]
    order = sorted(int8, key=lambda n: -problem.facts(n).noise / max(problem.facts(n).saving, 1e-9))
    spent = 0

    def feasible(k: int) -> bool:
        nonlocal spent
        spent += 1
        return measure({**start, **{n: fp for n in order[:k]}}) <= problem.allowed + 1e-12

    lo, hi, k = 0, None, 1
    while hi is None:
        k = min(k, len(order))
        if feasible(k):
            hi = k
        else:
            lo = k
            if k == len(order):
                return spent  # even FP32 in every searched layer misses: only an impossible budget
            k *= 2
    while hi - lo > 1 and spent < max_steps:
        mid = (lo + hi) // 2
        if feasible(mid):
            hi = mid
        else:
            lo = mid
    return spent


def greedy_revert(problem: Problem, option: str, measure: MeasureDrop) -> tuple[dict[str, str], int]:
    """The peers' accuracy-control loop as a baseline: all-INT8 with one `option` label, the k
    noisiest layers reverted to float, for the smallest k within budget. Peers revert one layer
    per evaluation (81-192 evaluations on a 243-layer model); the drop falls with k, so bisecting
    over k finds it in about log2 L evaluations. Returns (plan, evaluations)."""
    fp = problem.float_label
    order = [x.name for x in sorted(problem.layers, key=lambda x: x.rank)]  # noisiest first
    evals = 0

    def plan(k: int) -> dict[str, str]:
        reverted = set(order[:k])
        return {x.name: fp if x.name in reverted else option for x in problem.layers}

    def feasible(k: int) -> bool:
        nonlocal evals
        evals += 1
        return measure(plan(k)) <= problem.allowed

    if feasible(0):
        return plan(0), evals
    lo, hi = 0, len(order)  # lo: over budget (measured); hi: every layer float, within any budget
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if feasible(mid):
            hi = mid
        else:
            lo = mid
    return plan(hi), evals


class _Meter:
    """Plans over the free layers, measured and counted, within an evaluation budget."""

    def __init__(self, problem: Problem, measure: MeasureDrop, fixed: Mapping[str, str], max_evals: int):
        self.problem, self.measure, self.fixed, self.max_evals = problem, measure, dict(fixed), max_evals
        self.free = [x for x in problem.layers if x.name not in self.fixed]
        self.base = {n for n, lbl in self.fixed.items() if lbl != problem.float_label}
        self.best = problem.best
        self.evals = 0

    @property
    def left(self) -> int:
        return self.max_evals - self.evals

    def plan(self, int8: set[str]) -> dict[str, str]:
        fp = self.problem.float_label
        return {**{x.name: self.best[x.name] if x.name in int8 else fp for x in self.free}, **self.fixed}

    def drop(self, int8: set[str]) -> float:
        self.evals += 1
        return self.measure(self.plan(int8))


def closed_loop(problem: Problem, measure: MeasureDrop, fixed: Mapping[str, str] | None = None,
                max_evals: int = 30) -> Incumbent:
    """The largest INT8 set within budget, found by measuring, not by an additive model.

    From FP32 up (`_grow`): layers go INT8 in order of saving per unit of output noise; the longest
    prefix of that order within budget is found by bisection on the measured drop (about log2 L
    evaluations), and the layer that broke it together with the prefix stays float while the rest
    is tried the same way. Then regions: INT8 regions whose Q/DQ pairs cost more than they save go
    float, and float regions whose borders cost more than INT8 would go INT8, each measured and
    kept within budget. `fixed` (e.g. `choose_fixed`'s INT8 set) stays as it is. Every plan
    measured is one `measure` call (the caller records it).

    (Measured on the PP-OCRv4 recognizer, `experiments/closed_loop_ocr_rec_avx2.md`: also bisecting
    from all-INT8 down, the k noisiest layers float, spent half the evaluations without finding a
    plan: reverting even 115 of 230 layers by single-layer noise left the drop at 2-3 points, so
    the search reached 80-90% of all-INT8's speed-up instead of 80-98%.)"""
    m = _Meter(problem, measure, fixed or {}, max_evals)
    chosen, current = _grow(m)
    before = set(chosen)
    chosen = regions.drop_int8_regions(problem, chosen, m.base)
    if chosen != before:
        current = None  # fewer INT8 layers: measured again below
    for region in regions.float_regions(problem, chosen | m.base, [x.name for x in m.free]):  # each measured: adds risk
        if m.left <= 0:
            break
        d = m.drop(chosen | region)
        if d <= problem.allowed:
            chosen |= region
            current = d
    if current is None or m.evals == 0:
        current = m.drop(chosen)
    return Incumbent(m.plan(chosen), current, m.evals, problem.saving(chosen | m.base))


def _grow(m: _Meter) -> tuple[set[str], float | None]:
    """From FP32 up: layers in order of saving per unit of output noise (those whose INT8 form
    alone does not pay last, when borders cost: inside an INT8 region they save Q/DQ pairs). The
    longest prefix within budget is found by bisection; the layer after it broke the budget with
    the prefix (compounding the single-layer noise does not show), so it stays float and the rest
    is tried the same way. Layers whose predicted drop exceeds the slack are skipped unmeasured."""
    problem = m.problem
    pays = sorted((x for x in m.free if x.saving > 0), key=lambda x: (-x.saving / max(x.noise, 1e-12), x.rank))
    costs = sorted((x for x in m.free if x.saving <= 0), key=lambda x: (-x.saving, x.rank))
    queue = [x.name for x in (*pays, *(costs if problem.border_cost > 0 else ()))]
    chosen: set[str] = set()
    current = 0.0 if not m.base else None  # drop of the fixed set with everything else float
    while queue and m.left > 0:
        full = m.drop(chosen | set(queue))
        if full <= problem.allowed:
            return chosen | set(queue), full
        lo, hi = 0, len(queue)  # prefix lo: within budget (known); hi: over (measured)
        while hi - lo > 1 and m.left > 0:
            mid = (lo + hi) // 2
            d = m.drop(chosen | set(queue[:mid]))
            if d <= problem.allowed:
                lo, current = mid, d
            else:
                hi = mid
        chosen |= set(queue[:lo])
        queue = _fitting(problem, queue[lo + 1:], chosen | m.base, current)
    return chosen, current


def _fitting(problem: Problem, queue: list[str], int8: set[str], drop: float | None) -> list[str]:
    """The layers of `queue` whose drop, predicted from the measured drop per unit of output noise
    of the current set, still fits the slack (all of them while nothing calibrates the ratio)."""
    noise = sum(problem.facts(n).noise for n in int8)
    if drop is None or noise <= 0 or drop <= 0:
        return queue
    per_noise = drop / noise
    slack = problem.allowed - drop
    return [n for n in queue if per_noise * problem.facts(n).noise <= slack]
