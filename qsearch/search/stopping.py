"""When a trial or the study stops early. A trial: `BudgetPruner`, on its first slice of the
search data. The study: before its trial budget, once the search has reached the top of its space.

A plan that puts every searched layer in INT8 and keeps half the budget spare is the ceiling the
sampler climbs towards; past it, trials only trade calibrations or revert layers, which the
top-down walk has already tried from the same end. The study stops once such a plan is within
`NEAR` of the fastest plan found within budget (a trial's cost is one three-round measurement,
whose spread is 2.6-4.8%: experiments/timing_orientation.md, so two all-INT8 trials of the same
plan differ by that much) and `patience` finished trials have not beaten the fastest by more than
the timing tie. More trials would cost minutes (5 s each on PP-OCRv4's recognizer with a score
without parts, which nothing can prune) for nothing. Where the fastest plan found is well below
the ceiling the search runs its whole budget: the plans found late on our workloads (trials 29 to
49) were found there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from qsearch.resolution import clearly_over
from qsearch.timing import Ratio

TIE = 0.02  # costs within 2% are timing noise (`SearchResult.best`)
NEAR = 2 * TIE  # all-INT8 this close to the fastest plan found counts as reached
SPARE = 0.5  # the ceiling plan keeps at least this share of the budget unused


@dataclass(frozen=True)
class Ceiling:
    """Why a study stopped early: the ceiling trial (all-INT8), the fastest trial within budget
    (often the same), the trials finished since the fastest without beating it, and, where the
    ceiling's own timing was more than `NEAR` above the fastest's, their race side by side."""

    trial: int
    fastest: int
    since: int
    patience: int
    raced: Ratio | None = None  # the ceiling's time over the fastest's, paired by round

    def text(self) -> str:
        near = ""
        if self.fastest != self.trial:
            side = "" if self.raced is None else f"; side by side it takes {self.raced.text()} the fastest's time"
            near = f", within {NEAR:.0%} of the fastest plan found (trial {self.fastest}{side}),"
        return (f"stopped early: trial {self.trial} puts every searched layer in INT8 within half the budget{near} and "
                f"{self.since} trials since trial {self.fastest} did not beat it by more than {TIE:.0%} "
                f"(patience {self.patience})")


def patience_for(budget: int) -> int:
    """Trials past the ceiling before stopping: a fifth of the budget, at least 10."""
    return max(10, budget // 5)


def incumbent(trials: Sequence[FrozenTrial], allowed: float) -> FrozenTrial | None:
    """The finished trial within budget with the lowest cost (None before there is one)."""
    within = [t for t in trials if "cost" in t.user_attrs and t.user_attrs.get("drop", math.inf) <= allowed + 1e-12]
    return min(within, key=lambda t: (t.user_attrs["cost"], t.number), default=None)


def is_record(cost: float, drop: float, trials: Sequence[FrozenTrial], allowed: float) -> bool:
    """Whether a trial within budget is timed more than `NEAR` below every finished trial within
    budget: the likeliest lucky timing, which the study times again against that incumbent before
    it counts (PP-OCRv4's recognizer beside a busy core: a plan one Add away from all-INT8 timed 18%
    below it where five all-INT8 trials timed within 2%; this stop then never fired and the study
    ran 50 trials where it ran 17)."""
    best = incumbent(trials, allowed)
    return drop <= allowed + 1e-12 and best is not None and cost < best.user_attrs["cost"] * (1 - NEAR)


def record_cost(incumbent_cost: float, faster: Ratio) -> float:
    """A record's cost from its race against the incumbent (`timing.race`: the incumbent's time
    over the record's, paired by round): the incumbent's cost over that ratio, but never more than
    `TIE` below the incumbent unless the rounds say it is faster by more than that. A single
    timing put plans with 12 to 37 float layers 6-9% below all-INT8 on the recognizer, twice, where
    side by side all-INT8 was 7% faster; the ceiling stop then never fired (887 s, 50 trials)."""
    paired = incumbent_cost / faster.value
    return paired if faster.low > 1 + TIE else max(paired, incumbent_cost * (1 - TIE))


def trials_to_plan_for(budget: int, stop_at_ceiling: bool) -> int:
    """The trials a stage sized against the search should count on: the budget, or with the
    ceiling stop on, at most twice its patience (the stop ended our studies whose all-INT8 holds
    after 11-17 of 50 trials; a fidelity screen sized against all 50 then cost more than the whole
    search: the recognizer's 66 screens on 60 samples each against 17 trials)."""
    return min(budget, 2 * patience_for(budget)) if stop_at_ceiling else budget


class CeilingStop:
    """An Optuna callback (`study.optimize(callbacks=[...])`) that calls `study.stop()` once the
    best plan within budget is the ceiling and `patience` finished trials since have not beaten it.
    Reads only the trials' own user attributes (`drop`, `cost`, `choices`), and `race(a, b)` (the
    time of trial `a`'s plan over `b`'s, in interleaved rounds: `Evaluator.race`) where one timing
    would decide: the ceiling timed more than `NEAR` above the fastest."""

    def __init__(self, searched: Mapping[str, Sequence[str]], float_label: str, allowed: float, patience: int,
                 race: Callable[[FrozenTrial, FrozenTrial], Ratio] | None = None):
        self.searched, self.float_label = dict(searched), float_label
        self.allowed, self.patience, self.race = allowed, patience, race
        self.stopped: Ceiling | None = None
        self._raced: dict[tuple[int, int], Ratio] = {}  # (ceiling, fastest) -> their race, run once

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        found = self.check(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        if found is not None:
            self.stopped = found
            study.stop()

    def check(self, trials: Sequence[FrozenTrial]) -> Ceiling | None:
        """The ceiling and the finished trials since the fastest, when they reach `patience`; else
        None. The ceiling counts as reached within `NEAR` of the fastest by their single timings, or,
        where those say more, by a race that cannot tell them apart by more than `NEAR` (the
        fastest of 50 single timings is the luckiest: the recognizer's all-INT8 timed 5.8% above a
        plan that later tied with it side by side, and the study ran all 50 trials)."""
        scored = [t for t in trials if t.state == TrialState.COMPLETE and "drop" in t.user_attrs]
        feasible = [t for t in scored if t.user_attrs["drop"] <= self.allowed + 1e-12]
        if not feasible or not self.searched:
            return None
        fastest = min(feasible, key=lambda t: (t.user_attrs["cost"], t.number))
        floor = fastest.user_attrs["cost"]
        band = [t for t in feasible if t.user_attrs["cost"] <= floor * (1 + TIE)]  # the same cost, within noise
        best = min(band, key=lambda t: t.number)  # the first trial at this cost: when it stopped improving
        since = sum(t.number > best.number for t in trials)
        tops = [t for t in feasible if t.user_attrs["drop"] <= self.allowed * SPARE and self._all_int8(t)]
        if since < self.patience or not tops:
            return None
        top = min(tops, key=lambda t: (t.user_attrs["cost"], t.number))
        if top.user_attrs["cost"] <= floor * (1 + NEAR):
            return Ceiling(top.number, best.number, since, self.patience)
        if self.race is None:
            return None
        key = (top.number, fastest.number)
        if key not in self._raced:
            self._raced[key] = self.race(top, fastest)
        raced = self._raced[key]
        return Ceiling(top.number, best.number, since, self.patience, raced) if raced.low <= 1 + NEAR else None

    def _all_int8(self, t: FrozenTrial) -> bool:
        choices = t.user_attrs.get("choices", {})
        return all(choices.get(n, self.float_label) != self.float_label for n in self.searched)


class BudgetPruner(optuna.pruners.BasePruner):
    """Prune a trial whose drop, estimated on the first slice of the search data (its reported
    intermediate value), is clearly over budget: twice the budget plus 3 sigma of a binomial
    accuracy estimate on the slice (top-1), so borderline plans finish."""

    def __init__(self, allowed: float, binomial: bool = False):
        self.allowed, self.binomial = allowed, binomial

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        est = trial.intermediate_values.get(step) if step is not None else trial.user_attrs.get("drop_estimate")
        if est is None:
            return False
        parts = trial.user_attrs.get("slice_parts")
        return clearly_over(est, self.allowed, tuple(parts) if self.binomial and parts else None)
