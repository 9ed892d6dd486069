"""Timing a benchmark engineer would trust, on planted clocks: paired ratios from interleaved
rounds, rounds until the interval decides or the cap ties, and jitter that cannot flip a choice
between plans whose true latencies differ by 10%."""

from __future__ import annotations

import numpy as np
import pytest

from qsearch import timing
from qsearch.choice import pick
from qsearch.report.markdown import Row


def _planted(true_ms: list[float], seed: int, machine: float = 0.25, own: float = 0.03, spikes: float = 0.05):
    """A clock: each round the whole machine runs slower or faster (lognormal `machine`), each
    measurement has its own jitter (`own`), and now and then one is hit by a spike (x1.5)."""
    rng = np.random.default_rng(seed)
    calls = [0]

    def time_round():
        calls[0] += 1
        common = rng.lognormal(0, machine)
        out = []
        for t in true_ms:
            x = t * common * rng.lognormal(0, own) * (1.5 if rng.random() < spikes else 1.0)
            out.append((x, x))
        return out

    return time_round, calls


def _rows(wall, scores):
    return [Row(name, s, s, min(w), 1000, 3, None, cpu_ms=min(w), wall_rounds=tuple(w), cpu_rounds=tuple(w))
            for name, s, w in zip(("fp32", "fast", "slow by 10%"), scores, wall)]


@pytest.mark.parametrize("seed", range(60))
def test_planted_jitter_cannot_flip_the_choice_between_plans_10_percent_apart(seed):
    """The slower plan has the larger accuracy margin: were the two called a tie, it would ship.
    Machine-wide swings of +-25% between rounds and 5% spikes must not make that happen."""
    time_round, calls = _planted([10.0, 6.0, 6.6], seed)
    wall, cpu = timing.interleaved(time_round, 3, [0, 1, 2], busy=lambda w, c: False)
    rows = _rows(wall, [0.90, 0.897, 0.899])
    assert pick(rows, allowed=0.005) == 1, [np.round(w, 2) for w in wall]
    assert timing.MIN_ROUNDS <= calls[0] <= timing.CAP_ROUNDS


def test_a_difference_below_the_tie_or_beyond_the_cap_is_a_tie():
    """Plans 1% apart tie (the larger margin ships); plans the rounds cannot separate within the
    cap tie too, after exactly CAP_ROUNDS rounds."""
    time_round, calls = _planted([10.0, 6.0, 6.06], seed=1, own=0.002, spikes=0.0)
    wall, _ = timing.interleaved(time_round, 3, [0, 1, 2], busy=lambda w, c: False)
    assert pick(_rows(wall, [0.90, 0.897, 0.899]), allowed=0.005) == 2
    noisy, calls = _planted([10.0, 6.0, 6.3], seed=2, machine=0.0, own=0.3, spikes=0.0)
    wall, _ = timing.interleaved(noisy, 3, [0, 1, 2], busy=lambda w, c: False)
    assert calls[0] == timing.CAP_ROUNDS


def test_rounds_stop_when_no_undecided_plan_could_ship():
    """A finalist 2% slower than the fastest sits on the tie's edge: the rounds can never settle
    it and ran to the cap. With the smaller accuracy margin it ships neither tied nor slower, so
    MIN_ROUNDS decide; with the larger margin a tie would ship it, and the rounds go on."""
    scores = [0.90, 0.899, 0.897]  # fp32, the fastest (larger margin), the one 2% slower (smaller)
    time_round, calls = _planted([10.0, 6.0, 6.12], seed=3, machine=0.0, own=0.03, spikes=0.0)
    wall, _ = timing.interleaved(time_round, 3, [0, 1, 2], busy=lambda w, c: False, margins=scores)
    assert calls[0] == timing.MIN_ROUNDS and pick(_rows(wall, scores), allowed=0.005) == 1
    time_round, calls = _planted([10.0, 6.0, 6.12], seed=3, machine=0.0, own=0.03, spikes=0.0)
    wall, _ = timing.interleaved(time_round, 3, [0, 1, 2], busy=lambda w, c: False, margins=[0.90, 0.897, 0.899])
    assert calls[0] > timing.MIN_ROUNDS
    time_round, calls = _planted([10.0, 6.0, 6.12], seed=3, machine=0.0, own=0.03, spikes=0.0)
    timing.interleaved(time_round, 3, [0, 1, 2], busy=lambda w, c: False)  # no margins: every pair counts
    assert calls[0] > timing.MIN_ROUNDS


def test_ratio_and_its_interval():
    r = timing.ratio([2.0, 2.0, 2.0], [3.0, 3.0, 3.0])
    assert r.value == pytest.approx(1.5) and r.low == pytest.approx(1.5) and r.high == pytest.approx(1.5)
    r = timing.ratio([1.0, 1.1, 0.9, 1.0], [1.2, 1.25, 1.1, 1.22])
    assert r.low < r.value < r.high and r.rounds == 4 and "90% interval" in r.text()


def test_a_timing_runs_about_its_seconds_and_never_under_three_runs():
    """A slow model's timing is a few long runs (PP-OCRv4 rec at batch 8: 200 ms each), a fast
    model's many short ones; the median always has three runs to survive a disturbed one."""
    from qsearch.timing import MIN_RUNS, runs_within

    assert runs_within(0.35, 0.2, 15) == MIN_RUNS == 3  # was 5: 1 s of runs per plan per round
    assert runs_within(0.35, 0.025, 15) == 14
    assert runs_within(0.35, 0.001, 15) == 15
    assert runs_within(0.3, 0.05, 5) == 5
    assert runs_within(0.3, 0.0, 5) == 5  # an unmeasured (zero) time never divides by zero
