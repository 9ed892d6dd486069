"""Timing a benchmark engineer would trust, on planted clocks: paired ratios from interleaved
rounds, rounds until the interval decides or the cap ties, and jitter that cannot flip a choice
between plans whose true latencies differ by 10%."""

from __future__ import annotations

import numpy as np
import pytest

from qsearch import timing
from qsearch.choice import pick, round_spread, speedup
from qsearch.report.markdown import Row


def _planted(true_ms: list[float], seed: int, machine: float = 0.25, own: float = 0.03, spikes: float = 0.05):
    """A clock: each round the whole machine runs slower or faster (lognormal `machine`), each
    measurement has its own jitter (`own`), and now and then one is hit by a spike (x1.5)."""
    rng = np.random.default_rng(seed)
    calls = [0]

    def time_round(active):
        calls[0] += 1
        common = rng.lognormal(0, machine)
        out = []
        for k in active:
            x = true_ms[k] * common * rng.lognormal(0, own) * (1.5 if rng.random() < spikes else 1.0)
            out.append((x, x))
        return out

    return time_round, calls


def _rows(wall, scores, names=("fp32", "fast", "slow by 10%")):
    return [Row(name, s, s, np.nanmin(w), 1000, 3, None, cpu_ms=np.nanmin(w), wall_rounds=tuple(w), cpu_rounds=tuple(w))
            for name, s, w in zip(names, scores, wall)]


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


def test_rounds_past_the_first_time_only_what_they_can_still_decide():
    """FP32 (the reference), the fastest, and a finalist 2% slower (on the tie's edge: never
    settled) go on to the cap; a finalist 50% slower is decided after MIN_ROUNDS and is left out
    of the later rounds (NaN there), its speed-up paired over the rounds it was timed in."""
    scores = [0.90, 0.897, 0.899, 0.899]
    time_round, calls = _planted([10.0, 6.0, 6.12, 9.0], seed=3, machine=0.0, own=0.03, spikes=0.0)
    wall, cpu = timing.interleaved(time_round, 4, [0, 1, 2, 3], busy=lambda w, c: False)
    n = calls[0]
    assert n > timing.MIN_ROUNDS
    for k in (0, 1, 2):
        assert np.isfinite(wall[k]).all() and len(wall[k]) == n
    assert np.isfinite(wall[3][:timing.MIN_ROUNDS]).all() and np.isnan(wall[3][timing.MIN_ROUNDS:]).all()
    rows = _rows(wall, scores, ("fp32", "fast", "tie", "slow"))
    assert speedup(rows[0], rows[3]).rounds == timing.MIN_ROUNDS and speedup(rows[0], rows[1]).rounds >= n - 1
    assert pick(rows, allowed=0.005) in (1, 2) and round_spread(wall[3]) >= 0


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


def _pair(challenger: float, incumbent: float, seed: int, **jitter):
    """A planted clock for `timing.race`: (challenger's time, incumbent's) per round."""
    time_round, calls = _planted([challenger, incumbent], seed, **jitter)
    return (lambda k: tuple(t[0] for t in time_round((0, 1)))), calls


def test_a_record_race_tells_10_percent_from_a_lucky_timing():
    """A trial's single timing put the recognizer's plans 6-9% below all-INT8 where side by side
    they were 7% slower; the race against the incumbent must not be fooled the same way (+-25%
    machine swings between rounds, 3% jitter, 5% spikes x1.5), on 200 planted clocks: a challenger
    10% faster wins decidedly on 95% of them (else it ties: never counted slower than it is by more
    than the tie); an equal one wins on at most 5% (a one-sided 95% interval), and then by little."""
    from qsearch.search.stopping import record_cost

    won, lucky = 0, []
    for seed in range(200):
        r = timing.race(_pair(9.0, 10.0, seed)[0])
        won += r.low > 1 + timing.TIE
        assert record_cost(100.0, r) <= 100.0 * (1 - timing.TIE) and timing.MIN_ROUNDS <= r.rounds <= timing.CAP_ROUNDS
        r = timing.race(_pair(10.0, 10.0, seed)[0])
        if r.low > 1 + timing.TIE:
            lucky.append(r.value)
        else:  # within the tie: it beats the incumbent by nothing
            assert record_cost(100.0, r) >= 100.0 * (1 - timing.TIE)
    assert won >= 190 and len(lucky) <= 10 and max(lucky, default=1.0) < 1.10, (won, lucky)


def test_a_record_slower_side_by_side_counts_slower_than_the_incumbent():
    from qsearch.search.stopping import record_cost

    slower = timing.Ratio(0.93, 0.90, 0.96, 5)  # the incumbent's time over the record's: the record is slower
    assert record_cost(158.7, slower) == pytest.approx(158.7 / 0.93)
    undecided = timing.Ratio(1.03, 0.99, 1.07, timing.CAP_ROUNDS)  # the cap reached: a tie
    assert record_cost(158.7, undecided) == pytest.approx(158.7 * (1 - timing.TIE))


def test_a_real_session_raced_against_itself_ties(tmp_path):
    """Two ONNX Runtime sessions of one model, on the evaluator's own clock: never a record."""
    from qsearch.config import load_workload
    from qsearch.evaluator import Evaluator
    from qsearch.workbench import open_workbench

    from .conftest import make_cnn, write_workload

    bench = open_workbench(load_workload(write_workload(tmp_path, make_cnn(), n=16)), cache_dir=tmp_path / "c",
                           log=lambda *a: None)
    ev = Evaluator(bench)
    proto = bench.prepared.proto
    r = ev.race(ev.session(proto), ev.session(proto))
    assert timing.MIN_ROUNDS <= r.rounds <= timing.CAP_ROUNDS and r.low <= 1 + timing.TIE


def test_a_lucky_record_is_raced_and_counts_no_faster_than_the_tie(tmp_path):
    """`racing.confirmed` on real sessions: a plan timed 40% below the incumbent (the same plan, so
    a lucky timing) races it and counts within the tie of the incumbent's cost, not its own;
    a trial that sets no record keeps its timing untouched."""
    import dataclasses

    import optuna

    from qsearch.config import load_workload
    from qsearch.evaluator import Evaluator
    from qsearch.search import racing
    from qsearch.workbench import open_workbench

    from .conftest import make_cnn, write_workload

    bench = open_workbench(load_workload(write_workload(tmp_path, make_cnn(), n=16)), cache_dir=tmp_path / "c",
                           log=lambda *a: None)
    ev = Evaluator(bench)
    plan = ev.plan({})
    said = []
    incumbent = optuna.trial.create_trial(value=10.0, user_attrs={"cost": 10.0, "drop": 0.0, "choices": {}})
    lucky = dataclasses.replace(ev.evaluate(plan, timing=False), drop=0.0, relative_ms=6.0)
    counted = racing.confirmed(ev, plan, lucky, [incumbent], 0.01, said.append)
    assert counted.relative_ms >= 10.0 * (1 - timing.TIE) - 1e-9 and said and "a record" in said[0]
    usual = dataclasses.replace(lucky, relative_ms=9.9)
    assert racing.confirmed(ev, plan, usual, [incumbent], 0.01, said.append) is usual and len(said) == 1
