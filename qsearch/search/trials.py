"""What the search stage hands on: its finished trials and the study that made them, as frozen
records (`SearchResult`), so the final stage and the report never reach into a live study."""

from __future__ import annotations

import math
from dataclasses import dataclass

from qsearch.search.problem import Dimensions, FixDecision, Problem
from qsearch.search.stopping import Ceiling

MARGIN_SPAN = 0.10  # the largest-margin finalist costs at most this much more than the cheapest


@dataclass(frozen=True)
class TrialResult:
    number: int
    choices: dict[str, str]
    score: float
    drop: float
    cost: float
    latency_ms: float
    size_bytes: int
    bitops: float
    feasible: bool


@dataclass(frozen=True)
class SearchResult:
    """What the search stage hands on: the study's finished trials and what defined them."""

    study_name: str
    storage: str  # as a shared plan may show it (`jobs.storage_label`)
    allowed: float
    problem: Problem
    dims: Dimensions
    decision: FixDecision
    trials: tuple[TrialResult, ...]  # completed, in trial order
    failures: tuple[str, ...]  # the recorded errors of failed trials
    n_trials: int  # every trial run, failed and pruned included (not plans queued and never run)
    repaired: int  # trials that were repair steps
    trial_seconds: float
    stopped: Ceiling | None = None  # why the study stopped before its trial budget, if it did

    def best(self) -> TrialResult | None:
        """The cheapest trial within budget; costs within 2% are timing noise, and among those
        the more accurate plan wins."""
        feasible = [r for r in self.trials if r.feasible]
        if not feasible:
            return None
        floor = min(r.cost for r in feasible)
        near = [r for r in feasible if r.cost <= floor * 1.02]
        return max(near, key=lambda r: (r.score, -r.cost, -r.number))

    def finalists(self, n: int = 3) -> list[TrialResult]:
        """What the final stage re-times side by side: the cheapest feasible trials (each was timed
        once, alone, so the cheapest is a noisy argmin), the feasible trial with the most INT8
        layers (on PP-OCRv4's recognizer trials timed all-INT8 10% slower than a 130-layer plan
        that side by side was 5% slower than it), and the one with the largest margin within
        MARGIN_SPAN of the cheapest's cost: where the split cannot tell whether the fastest are
        within budget, the largest margin that still pays ships (`choice.prefer_clear`)."""
        feasible = sorted((r for r in self.trials if r.feasible), key=lambda r: (r.cost, -r.score, r.number))
        if not feasible:
            return []
        widest = max(feasible, key=lambda r: (self.int8_layers(r), -r.cost))
        chosen = feasible[:n] if widest in feasible[:n] else [*feasible[: n - 1], widest]
        span = [r for r in feasible if r.cost <= feasible[0].cost * (1 + MARGIN_SPAN)]
        # a gain counts as no drop (`choice.upper_drop`); then the fewest INT8 layers: outputs that move least
        safest = min(span, key=lambda r: (max(r.drop, 0.0), self.int8_layers(r), r.cost, r.number))
        return chosen if safest in chosen else [*chosen, safest]

    def int8_layers(self, r: TrialResult) -> int:
        return sum(lbl != self.problem.float_label for lbl in r.choices.values())

    def closest(self, n: int = 3) -> list[TrialResult]:
        return sorted(self.trials, key=lambda r: (r.drop, r.cost))[:n]

    def pareto(self) -> list[TrialResult]:
        """Non-dominated trials on (score up, cost down), cheapest first."""
        front, best_score = [], -math.inf
        for r in sorted(self.trials, key=lambda r: (r.cost, -r.score)):
            if r.score > best_score + 1e-12:
                front.append(r)
                best_score = r.score
        return front
