"""Latency comparisons a benchmark engineer would trust: ratios from interleaved rounds.

Two plans are never compared by their own best times: each round times every plan once, back to
back, and a comparison is the ratio of two plans' times *in the same round* (so a slow minute of
the machine slows both). The geometric mean of those per-round ratios and its 90% interval
(Student's t over the rounds) say how much faster one is. Rounds go on while some plan within
budget could still be faster than the fastest by more than `TIE` and the interval cannot tell,
up to `CAP_ROUNDS`; a pair still undecided then ties.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

MIN_ROUNDS = 3
CAP_ROUNDS = 12  # the stated cap: after it an undecided pair ties
MIN_RUNS = 3  # runs per timing: their median survives one disturbed run
TIE = 0.02  # a difference smaller than 2% decides nothing, however sure
# one-sided 95% Student t quantiles by degrees of freedom (a 90% two-sided interval)
_T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812,
        11: 1.796, 12: 1.782, 13: 1.771, 14: 1.761, 15: 1.753, 20: 1.725, 30: 1.697}


def runs_within(seconds: float, run_s: float, most: int) -> int:
    """Runs per timing so that one timing takes about `seconds` (a slow model's runs each average
    its noise over many kernels already: PP-OCRv4's recognizer at batch 8, 200 ms a run, was timed
    5 runs a plan a round, 8 s of every 12 s trial): at least MIN_RUNS, at most `most`."""
    return int(max(MIN_RUNS, min(most, round(seconds / max(run_s, 1e-6)))))


def _t(df: int) -> float:
    return _T95.get(df) or next((v for k, v in sorted(_T95.items()) if k >= df), 1.645)


@dataclass(frozen=True)
class Ratio:
    """How many times longer `b` takes than `a` (geometric mean of per-round ratios), with its 90%
    interval over `rounds` paired rounds."""

    value: float
    low: float
    high: float
    rounds: int

    def text(self) -> str:
        return f"{self.value:.2f}x (90% interval {self.low:.2f}-{self.high:.2f}x, {self.rounds} rounds)"


def _disturbed(d: np.ndarray) -> np.ndarray:
    """Rounds to leave out: from four rounds on, a round whose log-ratio lies more than 3.5 robust
    standard deviations (1.4826 MAD) from the median was hit by something else (a VM steal, a
    page fault storm) in one of the two plans' windows."""
    if len(d) < 4:
        return np.zeros(len(d), bool)
    med = np.median(d)
    mad = 1.4826 * np.median(np.abs(d - med))
    return np.abs(d - med) > 3.5 * max(mad, 0.02)  # (never below 7%: ordinary jitter is not a disturbance)


def ratio(a: Sequence[float], b: Sequence[float]) -> Ratio:
    """b over a, paired by round (both lists in round order, the same length; NaN where a round did
    not time that entry); disturbed rounds left out, `rounds` counts the ones kept."""
    d = np.log(np.asarray(b, np.float64)) - np.log(np.asarray(a, np.float64))
    d = d[np.isfinite(d)]  # rounds that timed only one of the two (`interleaved`: NaN) pair nothing
    d = d[~_disturbed(d)]
    n = len(d)
    mean = float(d.mean()) if n else 0.0
    hw = _t(n - 1) * float(d.std(ddof=1)) / math.sqrt(n) if n > 1 else math.inf
    return Ratio(math.exp(mean), math.exp(mean - hw), math.exp(mean + hw), n)


def fastest(times: Sequence[Sequence[float]], among: Sequence[int]) -> int:
    """The fastest entry among `among`: the smallest paired ratio to the first of them (disturbed
    rounds left out, so one hit round cannot make a plan look slow or fast)."""
    ref = among[0]
    return min(among, key=lambda k: 1.0 if k == ref else ratio(times[ref], times[k]).value)


def ties_with(times: Sequence[Sequence[float]], best: int, k: int, tie: float = TIE) -> bool:
    """Whether `k` is not decidedly slower than `best`: its ratio's interval reaches 1 + `tie`
    (not slower by more than what matters, or the rounds cannot tell)."""
    return ratio(times[best], times[k]).low <= 1 + tie


def undecided(times: Sequence[Sequence[float]], among: Sequence[int], tie: float = TIE,
              margins: Sequence[float] | None = None) -> list[int]:
    """Entries whose comparison with the fastest the rounds cannot settle yet: the interval holds
    both 'not slower' (1) and 'slower by more than the tie' (1 + tie). With `margins` (each
    entry's accuracy margin; a tie ships the larger), only entries whose margin exceeds the
    fastest's: tied or slower, one with a smaller margin never ships, so its rounds decide nothing."""
    if len(among) < 2:
        return []
    best = fastest(times, among)
    out = []
    for k in among:
        if k != best and (margins is None or margins[k] > margins[best] + 1e-12):
            r = ratio(times[best], times[k])
            if r.low <= 1 + tie < r.high:
                out.append(k)
    return out


def interleaved(time_round: Callable[[Sequence[int]], Sequence[tuple[float, float]]], n: int, among: Sequence[int],
                busy: Callable[[list, list], bool], margins: Sequence[float] | None = None
                ) -> tuple[list[list[float]], list[list[float]]]:
    """Per-entry (wall, CPU) times, one per round (NaN where a round left the entry out):
    `time_round(active)` times the entries `active` once each, in order. MIN_ROUNDS of every entry,
    then one more while `undecided` among `among` (given `margins`, only where the choice could
    change) on the clock the choice will use (`busy(wall, cpu)`: CPU time), up to CAP_ROUNDS. Those
    later rounds time only what they can still decide: entry 0 (the reference every speed-up is
    paired with), the fastest and the undecided; a decided entry's further rounds would change nothing."""
    wall: list[list[float]] = [[] for _ in range(n)]
    cpu: list[list[float]] = [[] for _ in range(n)]

    def one(active: Sequence[int]) -> None:
        timed = dict(zip(active, time_round(active)))
        for i in range(n):
            w, c = timed.get(i, (math.nan, math.nan))
            wall[i].append(w)
            cpu[i].append(c)

    for _ in range(MIN_ROUNDS):
        one(range(n))
    while len(wall[0]) < CAP_ROUNDS:
        times = cpu if busy(wall, cpu) else wall
        open_ = undecided(times, among, margins=margins)
        if not open_:
            break
        one(sorted({0, fastest(times, among), *open_}))
    return wall, cpu


def race(time_round: Callable[[int], tuple[float, float]]) -> Ratio:
    """Whether a challenger is faster than an incumbent by more than `TIE`: `time_round(k)` times
    both once, back to back, in round k, and returns (challenger's time, incumbent's); MIN_ROUNDS,
    then one more while the interval of the incumbent's time over the challenger's holds both
    1 + TIE and something else, up to CAP_ROUNDS (after which the pair ties). Returns that ratio."""
    own: list[float] = []
    ref: list[float] = []
    while True:
        a, b = time_round(len(own))
        own.append(a)
        ref.append(b)
        r = ratio(own, ref)
        if len(own) >= CAP_ROUNDS or (len(own) >= MIN_ROUNDS and not r.low <= 1 + TIE < r.high):
            return r
