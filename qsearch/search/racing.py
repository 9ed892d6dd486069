"""Trials' plans timed side by side where one timing would decide: a record against the
incumbent before it counts, the ceiling against the fastest before the study stops or runs on.
A trial's cost is one three-round measurement against FP32; the fastest of fifty such is the
luckiest, so every comparison that ends or steers the study is a paired ratio from interleaved
rounds (`Evaluator.race`, `timing.race`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from optuna.trial import FrozenTrial

from qsearch.evaluator import Evaluation, Evaluator
from qsearch.search.stopping import incumbent, is_record, record_cost
from qsearch.timing import Ratio


def confirmed(evaluator: Evaluator, plan, ev: Evaluation, trials: Sequence[FrozenTrial], allowed: float,
              log: Callable[[str], None]) -> Evaluation:
    """A record (`stopping.is_record`) races the incumbent in interleaved rounds before it counts
    (`stopping.record_cost`): its cost becomes the incumbent's over their paired ratio. Timing
    only, no scoring; records are rare."""
    if ev.relative_ms is None or not is_record(ev.relative_ms, ev.drop, trials, allowed):
        return ev
    best = incumbent(trials, allowed)
    faster = evaluator.race(evaluator.session(plan), _session(evaluator, best))
    cost = record_cost(best.user_attrs["cost"], faster)
    log(f"a record: timed {ev.relative_ms:.4g} against the fastest within budget's {best.user_attrs['cost']:.4g} "
        f"(trial {best.number}); side by side it is {faster.text()} faster: counts {cost:.4g}")
    return dataclasses.replace(ev, relative_ms=cost)


def trials_race(evaluator: Evaluator, log: Callable[[str], None]) -> Callable[[FrozenTrial, FrozenTrial], Ratio]:
    """`race(a, b)`: trial `a`'s plan's time over trial `b`'s, in interleaved rounds (what
    `stopping.CeilingStop` asks of the ceiling against the fastest)."""
    def race(a: FrozenTrial, b: FrozenTrial) -> Ratio:
        r = evaluator.race(_session(evaluator, b), _session(evaluator, a))
        log(f"the ceiling (trial {a.number}, cost {a.user_attrs['cost']:.4g}) against the fastest (trial {b.number}, "
            f"{b.user_attrs['cost']:.4g}) side by side: it takes {r.text()} its time")
        return r

    return race


def _session(evaluator: Evaluator, trial: FrozenTrial):
    """A finished trial's plan, rewritten and loaded (its own session is not kept past the trial)."""
    return evaluator.session(evaluator.plan(trial.user_attrs["choices"]))
