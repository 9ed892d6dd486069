"""The strategy seam's contract, which every strategy in `seeds.STRATEGIES` (and any new one) must
meet on planted problems, in the manner of Optuna's sampler tests: it spends at most the
evaluations it is given, proposes only the options each layer has, and what it measures or
proposes includes a plan within budget."""

from __future__ import annotations

import pytest

from qsearch.search import strategy
from qsearch.search.seeds import STRATEGIES, Start

from .test_strategy import chain_problem


def float_doubling(problem, measure, start):
    """A toy strategy (also run end to end in test_seams): from all-INT8, the noisiest layers
    float, doubling their number until the budget holds; it proposes the first plan within budget
    (FP32 where its evaluations ran out first)."""
    fp = problem.float_label
    order = [x.name for x in sorted(problem.layers, key=lambda x: -x.noise) if x.name not in start.fixed]
    k, left = 0, start.max_evals
    while left > 0 and k <= len(order):
        plan = {**problem.best, **start.fixed, **dict.fromkeys(order[:k], fp)}
        left -= 1
        if measure(plan) <= problem.allowed:
            return [plan]
        k = max(1, 2 * k)
    return [{**problem.best, **start.fixed, **dict.fromkeys(order, fp)}]


CONTRACT = [*STRATEGIES, float_doubling]


def _start(problem, measure, max_evals: int, with_best: bool) -> Start:
    decision = strategy.choose_fixed(problem, measure)
    dims = strategy.build_dimensions(problem, decision.fixed)
    fp = problem.float_label
    best = {x.name: fp for x in problem.layers} if with_best else None  # FP32: within any budget
    return Start({n: dims.fixed[n] for n in dims.fixed}, dims, decision, max_evals, best)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_evals", [0, 3, 12])
@pytest.mark.parametrize("fn", CONTRACT, ids=lambda f: f.__name__)
def test_every_strategy_respects_its_evaluations_and_the_options(fn, max_evals, seed):
    problem, planted, _ = chain_problem(seed)
    start = _start(problem, planted, max_evals, with_best=True)
    before = planted.calls
    measured: list[tuple[dict, float]] = []

    def measure(choices):
        d = planted(choices)
        measured.append((dict(choices), d))
        return d

    plans = fn(problem, measure, start)
    assert planted.calls - before == len(measured) <= max_evals
    options = {x.name: {*x.options, problem.float_label} for x in problem.layers}
    for plan in [*plans, *(p for p, _ in measured)]:
        assert set(plan) <= set(options) and all(lbl in options[n] for n, lbl in plan.items()), plan
    if measured or plans:  # something within budget among what it measured or proposed
        drops = [d for _, d in measured] + [planted(p) for p in plans]
        assert min(drops) <= problem.allowed + 1e-12


def test_a_strategy_that_measures_finds_a_plan_within_budget_that_pays():
    """The closed loop, given evaluations, ends with a measured plan within budget with INT8 layers."""
    problem, planted, _ = chain_problem(0)
    start = _start(problem, planted, 12, with_best=False)
    found = []

    def measure(choices):
        d = planted(choices)
        found.append((choices, d))
        return d

    STRATEGIES[0](problem, measure, start)
    within = [c for c, d in found if d <= problem.allowed]
    assert within and max(len(planted.int8(c)) for c in within) > len(start.fixed)


def _islands_problem():
    """24 layers in a chain; each alone measures slower in INT8 (saving -0.3: its Q/DQ glue),
    borders cost 0.5, so regions pay; three planted layers (5, 11, 17) break the budget, the rest
    together fit it. The optimum: every layer INT8 but those three."""
    import numpy as np

    from qsearch.config import SearchSpace
    from qsearch.search.problem import LayerFacts, Problem

    n, noisy = 24, (5, 11, 17)
    noise = np.random.default_rng(0).uniform(0.1, 0.3, n) * 1e-3
    noise[list(noisy)] = 5e-3
    allowed = float(noise.sum() - noise[list(noisy)].sum() + 1e-4)
    layers = [LayerFacts(f"L{i}", ("int8/minmax/per_channel",), -0.3, float(noise[i])) for i in range(n)]
    ranked = sorted(layers, key=lambda x: -x.noise)
    layers = tuple(LayerFacts(x.name, x.options, x.saving, x.noise, ranked.index(x)) for x in layers)
    edges = tuple((f"L{i}", f"L{i + 1}") for i in range(n - 1))
    problem = Problem(layers, "fp32", allowed, SearchSpace(min_searched=8), edges, border_cost=0.5)

    def measure(choices) -> float:
        return float(sum(noise[int(k[1:])] for k, v in choices.items() if v != "fp32"))

    return problem, measure, {f"L{i}" for i in range(n) if i not in noisy}


def test_the_top_down_walk_finds_the_region_the_bottom_up_loop_misses():
    from qsearch.search.top_down import top_down

    problem, planted, optimum = _islands_problem()
    start = _start(problem, planted, 12, with_best=False)
    assert start.decision.all_int8_drop > problem.allowed and not start.fixed
    up: list[tuple[set, float]] = []
    down: list[tuple[set, float]] = []

    def recorder(into):
        def measure(choices):
            d = planted(choices)
            into.append(({n for n, v in choices.items() if v != "fp32"}, d))
            return d
        return measure

    strategy.closed_loop(problem, recorder(up), start.fixed, max_evals=12)
    top_down(problem, recorder(down), start)
    best_up = max((len(s) for s, d in up if d <= problem.allowed), default=0)
    within = [s for s, d in down if d <= problem.allowed]
    assert optimum in within and len(down) <= 6  # bisection: about log2(24) + 1 evaluations
    assert best_up < len(optimum)  # from FP32 up, single-layer savings all said "does not pay"
