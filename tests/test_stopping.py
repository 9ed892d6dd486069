"""The ceiling stop on real Optuna studies with planted costs and drops: it stops once all-INT8
within half the budget has stayed best for `patience` trials, and never below the ceiling."""

from __future__ import annotations

import optuna
import pytest

from qsearch.search.stopping import CeilingStop, patience_for
from qsearch.timing import Ratio

LAYERS = ("a", "b", "c", "d")
SEARCHED = {n: ("float", "int8") for n in LAYERS}


def run_study(cost_of, drop_of, allowed: float, budget: int, patience: int = 10) -> tuple[int, CeilingStop]:
    """A study over four layers; the all-INT8 plan is enqueued first, as the top-down walk proposes it."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial({n: "int8" for n in LAYERS})

    def objective(trial: optuna.Trial) -> float:
        choices = {n: trial.suggest_categorical(n, list(SEARCHED[n])) for n in LAYERS}
        cost, drop = cost_of(choices), drop_of(choices)
        for k, v in (("cost", cost), ("drop", drop), ("choices", choices)):
            trial.set_user_attr(k, v)
        return cost

    stop = CeilingStop(SEARCHED, "float", allowed, patience)
    study.optimize(objective, n_trials=budget, callbacks=[stop])
    return len(study.trials), stop


def int8(choices) -> int:
    return sum(v == "int8" for v in choices.values())


def test_all_int8_clear_of_the_budget_stops_after_patience_trials():
    n, stop = run_study(lambda c: 10.0 - int8(c), lambda c: 0.001 * int8(c), allowed=0.01, budget=50)
    assert stop.stopped is not None and stop.stopped.trial == 0
    assert n == 11  # the ceiling (trial 0) and ten trials that could not beat it
    assert "trial 0" in stop.stopped.text() and "10 trials since" in stop.stopped.text()


def test_all_int8_near_the_budget_edge_runs_the_whole_budget():
    # the ceiling's drop 0.004 uses more than half of 0.006: a clearer plan may still be worth finding
    n, stop = run_study(lambda c: 10.0 - int8(c), lambda c: 0.001 * int8(c), allowed=0.006, budget=30)
    assert stop.stopped is None and n == 30


def test_a_faster_plan_below_the_ceiling_runs_the_whole_budget():
    # layer b is slower in INT8 (a one-layer island paying its glue): the best plan keeps it float
    def cost(c):
        return 10.0 - int8(c) + 2.0 * (c["b"] == "int8")

    n, stop = run_study(cost, lambda c: 0.0, allowed=0.01, budget=30)
    assert stop.stopped is None and n == 30


def planted(costs: list[float], float_at: tuple[int, ...] = ()) -> list[optuna.trial.FrozenTrial]:
    """Finished trials with these costs, drop 0, numbered in order: all-INT8, except those numbered
    in `float_at`, which keep layer a float."""
    out = []
    for i, cost in enumerate(costs):
        choices = {n: "float" if (n == "a" and i in float_at) else "int8" for n in LAYERS}
        t = optuna.trial.create_trial(value=cost, user_attrs={"cost": cost, "drop": 0.0, "choices": choices})
        t.number = i
        out.append(t)
    return out


def test_an_improvement_beyond_the_tie_restarts_the_count():
    stop = CeilingStop(SEARCHED, "float", 0.01, patience=10)
    assert stop.check(planted([10.0] * 11)).trial == 0  # ten trials since the first at this cost
    # trial 5 is 5% faster: the count restarts there, and only 5 trials follow it
    assert stop.check(planted([10.0] * 5 + [9.5] + [10.0] * 5)) is None
    # 1% faster is the same cost within timing noise: the count runs from trial 0
    found = stop.check(planted([10.0] * 5 + [9.9] + [10.0] * 5))
    assert (found.fastest, found.trial, found.since) == (0, 5, 10)


def test_a_plan_below_the_ceiling_within_its_noise_stops_it_too():
    """PP-OCRv4's recognizer, seed 1: a plan with one layer float timed 3% below the all-INT8
    trials (whose own costs spread 2.5%) and reset the count; the ceiling is within `NEAR` of it."""
    stop = CeilingStop(SEARCHED, "float", 0.01, patience=10)
    found = stop.check(planted([10.0] * 4 + [9.7] + [10.2] * 10, float_at=(4,)))
    assert (found.trial, found.fastest, found.since) == (0, 4, 10)
    assert "within 4% of the fastest plan found (trial 4)" in found.text()
    # 6% faster than every all-INT8 plan: a real gain below the ceiling, so the search goes on
    assert stop.check(planted([10.0] * 4 + [9.4] + [10.2] * 20, float_at=(4,))) is None


def test_a_ceiling_timed_beyond_near_races_the_fastest_once():
    """PP-OCRv4's recognizer on an AMX machine, seed 1: all-INT8 (trial 0) timed once 5.8% above
    the fastest of 50 single timings and the study ran all 50 trials. Now, once patience has run
    out, the two race side by side (planted ratios here): a tie stops the study, a decided gap
    does not, and each pair races once."""
    calls = []

    def race(ratio):
        def run(a, b):
            calls.append((a.number, b.number))
            return ratio
        return run

    trials = planted([10.0] * 4 + [9.4] + [10.2] * 10, float_at=(4,))
    tie = CeilingStop(SEARCHED, "float", 0.01, patience=10, race=race(Ratio(1.01, 0.99, 1.03, 5)))
    assert tie.check(trials[:12]) is None and calls == []  # patience not yet run out: nothing to race
    found = tie.check(trials)
    assert (found.trial, found.fastest, found.since) == (0, 4, 10) and calls == [(0, 4)]
    assert "side by side it takes 1.01x" in found.text()
    slower = CeilingStop(SEARCHED, "float", 0.01, patience=10, race=race(Ratio(1.06, 1.05, 1.07, 12)))
    assert slower.check(trials) is None and slower.check([*trials, *planted([10.2] * 16)[15:]]) is None
    assert calls == [(0, 4), (0, 4)]  # the decided pair is not raced again


@pytest.mark.parametrize("budget, expected", [(10, 10), (50, 10), (100, 20), (200, 40)])
def test_patience_is_a_fifth_of_the_budget_at_least_ten(budget, expected):
    assert patience_for(budget) == expected


def test_optimize_stops_at_the_ceiling_and_says_so(tmp_path):
    """End to end on a small CNN with a bit-operations objective (all-INT8 is then strictly the
    cheapest plan) and a loose budget: the study ends before its 30 trials and the summary says why
(FP32 may still ship: on a model this small INT8 is slower, and the final stage times that)."""
    from qsearch import optimize

    from .conftest import make_cnn, write_workload

    cfg = write_workload(tmp_path / "w", make_cnn(), n=64, max_drop="0.5",
                         extra="search_space: {extends: default, objective: bitops}\n")
    r = optimize(cfg, budget=30, out=tmp_path / "out")
    study = optuna.load_study(study_name=r.plan.provenance["study"], storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    assert r.status == 0 and len(study.trials) < 30
    assert "stopped early: trial" in (tmp_path / "out" / "report.md").read_text()


def test_a_stage_sized_against_the_search_counts_the_trials_the_ceiling_stop_lets_run():
    from qsearch.search.stopping import trials_to_plan_for

    assert trials_to_plan_for(50, stop_at_ceiling=False) == 50
    assert trials_to_plan_for(50, stop_at_ceiling=True) == 2 * patience_for(50) == 20
    assert trials_to_plan_for(200, stop_at_ceiling=True) == 80  # patience is a fifth of a large budget
    assert trials_to_plan_for(12, stop_at_ceiling=True) == 12  # never more than the budget


def test_a_record_far_below_every_trial_within_budget_is_timed_again():
    """The recognizer's trial 7: 135.7 where all-INT8 trials timed 164-168; one timing decides nothing."""
    from qsearch.search.stopping import is_record

    trials = planted([164.5, 165.7, 167.5])
    assert is_record(135.7, 0.0, trials, 0.01)
    assert not is_record(160.0, 0.0, trials, 0.01)  # within 4% of the fastest: noise either way
    assert not is_record(135.7, 0.02, trials, 0.01)  # over budget: it sets no record
    assert not is_record(135.7, 0.0, [], 0.01)  # the first trial has nothing to beat
    over = optuna.trial.create_trial(value=100.0, user_attrs={"cost": 100.0, "drop": 0.5, "choices": {}})
    assert is_record(135.7, 0.0, [*trials, over], 0.01)  # a faster trial over budget is no record to beat
