"""The strategy seam: what measures and proposes plans before Optuna's sampler takes over.

A strategy is a callable `(problem, measure, start) -> plans`. Every plan it passes to `measure`
is scored on the whole search data and recorded as a trial of the study (the sampler learns from
it); the plans it returns are enqueued for the sampler to try first. It may call `measure` at most
`start.max_evals` times. The study runs `STRATEGIES` in order, each seeing the best plan within
budget that the ones before it measured. A new strategy is one module with such a function and
one entry in that tuple (or `qsearch.optimize(..., strategies=...)`); `tests/test_seeds.py` holds
the contract every strategy must meet on planted problems.
"""

from __future__ import annotations

from qsearch.search import strategy
from qsearch.search.problem import MeasureDrop, Problem, Start, Strategy
from qsearch.search.top_down import top_down


def closed_loop(problem: Problem, measure: MeasureDrop, start: Start) -> list[dict[str, str]]:
    """Up from the fixed set: the largest INT8 set within budget, found by measuring
    (`strategy.closed_loop`). Everything it finds is already a trial: it proposes nothing more."""
    if problem.mixable and start.max_evals >= 2:
        strategy.closed_loop(problem, measure, start.fixed, max_evals=start.max_evals)
    return []


def neighbours(problem: Problem, measure: MeasureDrop, start: Start) -> list[dict[str, str]]:
    """Plans one step from the best plan within budget: each of its first INT8 layers with its
    next-best option, and its most costly ones (most noise per saving) float. TPE samples around
    them."""
    if start.best is None:
        return []
    fp, searched = problem.float_label, start.dims.searched
    base = {n: start.best[n] for n in searched if n in start.best}
    int8 = [n for n, lbl in base.items() if lbl != fp]
    plans = [{**base, n: searched[n][1]} for n in int8[:4] if len(searched[n]) > 2]
    costly = sorted(int8, key=lambda n: -problem.facts(n).noise / max(problem.facts(n).saving, 1e-9))
    return plans + [{**base, n: fp} for n in costly[:4]]


def knapsacks(problem: Problem, measure: MeasureDrop, start: Start) -> list[dict[str, str]]:
    """The additive noise-model plans (`strategy.warm_start_plans`), unmeasured: the sampler's first trials."""
    return strategy.warm_start_plans(problem, start.dims, start.decision)


# top_down first: it runs only when all-INT8 misses the budget, in about log2(layers) evaluations
STRATEGIES: tuple[Strategy, ...] = (top_down, closed_loop, neighbours, knapsacks)
