"""The final choice and the metric's resolution as units: planted rows and parts, no model."""

from __future__ import annotations

import dataclasses

import numpy as np

from qsearch.choice import busy, decide, pick, resolution_note
from qsearch.report.markdown import Row
from qsearch.resolution import drop_interval


def row(name, search, ms, spread=0.01, cpu=None, resolution=0.001):
    return Row(name, search, search, ms, 1000, 1, None, latency_spread=spread, cpu_ms=cpu or ms,
               cpu_spread=spread, resolution=resolution)


def test_plans_tied_on_speed_ship_the_larger_accuracy_margin():
    rows = [row("fp32", 0.90, 10.0), row("naive", 0.80, 5.0), row("thin margin", 0.896, 6.00),
            row("wide margin", 0.899, 6.05)]
    # naive is fastest but over budget; 6.00 vs 6.05 ms is inside the 2% timing noise: margin decides
    assert pick(rows, allowed=0.005) == 3
    # a clearly faster plan still wins over a more accurate slow one
    rows[3] = row("wide margin, slow", 0.899, 7.0)
    assert pick(rows, allowed=0.005) == 2


def test_a_busy_machine_is_detected_and_cpu_time_decides():
    rows = [row("fp32", 0.9, 20.0, spread=1.08, cpu=10.0), row("a", 0.9, 9.0, spread=0.9, cpu=6.0),
            row("b", 0.9, 12.0, spread=0.9, cpu=5.0)]
    assert busy(rows)
    assert pick(rows, allowed=0.01, cpu=True) == 2  # on the wall clock's ±100% everything ties
    quiet = [row("fp32", 0.9, 10.0, cpu=9.8), row("a", 0.9, 6.0, cpu=5.9)]
    assert not busy(quiet)


def test_a_budget_finer_than_the_split_resolves_is_warned_about():
    # 80 samples scored top-1 in 40 runs of 2: one sample is 0.0125 of accuracy
    rng = np.random.default_rng(0)
    fp32 = np.array([[rng.integers(1, 3), 2] for _ in range(40)], float)
    plan = fp32.copy()
    plan[3, 0] -= 1  # one sample flips
    iv = drop_interval("top1", fp32, plan)
    assert abs(iv.drop - 1 / 80) < 1e-12 and iv.step == 1 / 80 and iv.low <= iv.drop <= iv.high
    assert iv.resolution >= 1 / 80
    r = row("qsearch", 0.9, 5.0, resolution=iv.resolution)
    assert resolution_note(r, allowed=0.005).startswith("warning: the budget 0.005 is finer")
    assert resolution_note(r, allowed=0.05) == ""
    assert "is unknown" in resolution_note(row("custom", 0.9, 5.0, resolution=None), 0.05)


def test_fp32_ships_when_every_int8_plan_is_slower():
    """Planted latencies: every INT8 plan within budget is slower than FP32 (the Q/DQ glue costs
    more than the kernels save): FP32 ships on a CPU target; an FP16 target keeps its plan."""
    rows = [row("fp32", 0.90, 1.00), row("naive", 0.80, 1.30), row("hybrid", 0.899, 1.20), row("trial 3", 0.9, 1.10)]
    i, fp32_ships = decide(rows, allowed=0.005, target="cpu")
    assert fp32_ships and i == 3  # the best INT8 plan (kept for review), not shipped
    assert not decide(rows, allowed=0.005, target="fp16")[1]
    rows[3] = row("trial 3", 0.9, 0.80)
    assert decide(rows, allowed=0.005, target="cpu") == (3, False)
    # a fallback that reverted every layer is FP32 under another name: FP32 ships, said plainly
    rows[3] = Row("hybrid, all reverted", 0.9, 0.9, 0.95, 1000, 0, None, cpu_ms=0.95)
    assert decide(rows, allowed=0.005, target="cpu") == (3, True)


def test_finalists_keep_the_widest_feasible_plan_beside_the_cheapest():
    """Trial timings are noisy: the feasible plan with the most INT8 layers is re-timed too."""
    from qsearch.config import SearchSpace
    from qsearch.search.problem import Dimensions, FixDecision, LayerFacts, Problem
    from qsearch.search.trials import SearchResult, TrialResult

    names = [f"L{i}" for i in range(6)]
    problem = Problem(tuple(LayerFacts(n, ("int8/minmax/per_channel",), 1.0, 1e-4) for n in names), "fp32", 0.01,
                      SearchSpace())

    def trial(k, n8, cost, feasible=True):
        choices = {n: "int8/minmax/per_channel" if i < n8 else "fp32" for i, n in enumerate(names)}
        return TrialResult(k, choices, 0.9, 0.0, cost, cost, 0, 0.0, feasible)

    trials = (trial(0, 6, 80.0), trial(1, 3, 74.0), trial(2, 4, 75.0), trial(3, 2, 90.0), trial(4, 6, 70.0, False))
    result = SearchResult("s", "mem", 0.01, problem, Dimensions({}, {}), FixDecision((), None, None, 0), trials, (),
                          5, 0, 0.0)
    assert [r.number for r in result.finalists()] == [1, 2, 0]  # two cheapest, then all six INT8 (infeasible 4 not)
    assert [r.number for r in result.finalists(n=2)] == [1, 0]
    # a plan that moves the outputs less (a gain counts as no drop; then fewer INT8 layers) within 10%
    # of the cheapest's cost is a finalist too (76 <= 74 * 1.1)
    safer = TrialResult(3, trials[3].choices, 0.905, -0.005, 76.0, 76.0, 0, 0.0, True)
    result = dataclasses.replace(result, trials=(*trials[:3], safer, trials[4]))
    assert [r.number for r in result.finalists()] == [1, 2, 0, 3]
    slow = dataclasses.replace(safer, cost=82.0)  # beyond the span: not re-timed
    assert [r.number for r in dataclasses.replace(result, trials=(*trials[:3], slow)).finalists()] == [1, 2, 0]


def test_report_numbers_read_as_meant():
    """Drops to 2-4 significant digits, speed-ups that cannot be misread, the verdict in one
    sentence, and a Pareto axis around the budget with a far-off baseline left out of its span."""
    from qsearch.report.markdown import fmt_drop, speed, verdict_line, zoom

    assert [fmt_drop(x) for x in (0.0005991611743558778, -0.00125, 0.0833, 0.0, 1.2e-05)] == \
        ["0.000599", "-0.00125", "0.0833", "0", "1.2e-05"]
    assert speed(1.853) == "1.85x faster than FP32" and speed(0.55) == "1.82x slower than FP32"
    fp32, chosen = row("fp32", 0.90, 10.0), row("qsearch", 0.897, 7.4)
    assert verdict_line(fp32, chosen, 0.005, "top1", False) == (
        "1.35x faster than FP32; top1 0.003 below it on search data (budget: lose at most 0.005) and 0.003 below "
        "it on test data.")
    # over budget on test: never shipped quietly, the verdict's own sentence says so
    over = dataclasses.replace(chosen, test_score=0.89)
    line = verdict_line(fp32, over, 0.005, "top1", False)
    assert "OVER THE BUDGET ON TEST DATA: it loses 0.01 there against the 0.005 allowed" in line
    assert "OVER" not in verdict_line(fp32, over, 0.005, "top1", True)  # FP32 ships: nothing over
    lo, hi = zoom(0.90, 0.005, [0.33, 0.897, 0.899])  # naive at 0.33 does not stretch the axis
    assert 0.88 <= lo < 0.895 and 0.9 < hi < 0.91


def test_a_plan_over_budget_on_test_gets_the_fastest_plan_within_on_both_splits_beside_it():
    from qsearch.finalize import within_both
    from qsearch.report.markdown import verdict_line

    def r(name, search, test, ms):
        t = tuple(ms * (1 + 0.002 * (k % 2)) for k in range(4))
        return Row(name, search, test, ms, 1000, 3, None, cpu_ms=ms, wall_rounds=t, cpu_rounds=t)

    rows = [r("fp32", 0.90, 0.90, 10.0), r("naive", 0.80, 0.80, 5.0), r("hybrid", 0.899, 0.899, 9.0),
            r("trial 1", 0.898, 0.88, 6.0), r("trial 2", 0.897, 0.897, 7.0), r("trial 3", 0.897, 0.896, 6.5)]
    # trial 1 ships on search data but loses 0.02 on test (budget 0.005); trial 3 is the fastest within on both
    assert within_both(None, [], rows, [], 3, 0.005, cpu=False) == 5
    assert within_both(None, [], rows, [], 4, 0.005, cpu=False) is None  # trial 2 is within on test: nothing to add
    # the only plans within on both splits run slower than FP32: no answer but FP32
    rows[2], rows[4], rows[5] = (r("hybrid", 0.899, 0.899, 10.2), r("trial 2", 0.897, 0.88, 7.0),
                                 r("trial 3", 0.897, 0.896, 10.5))
    assert within_both(None, [], rows, [], 3, 0.005, cpu=False) is None
    rows[2] = r("hybrid", 0.899, 0.899, 9.0)  # faster than FP32 again: it is the answer
    assert within_both(None, [], rows, [], 3, 0.005, cpu=False) == 2
    line = verdict_line(rows[0], rows[3], 0.005, "top1", False, alternative="qsearch (trial 3), in plan.within-test.yaml")
    assert "OVER THE BUDGET ON TEST DATA" in line and "The fastest plan within budget on both splits: qsearch (trial 3)" in line
    # the run's printed summary says it too, with the file of the plan within budget on both splits
    from qsearch.result import ALTERNATIVE, test_miss

    assert test_miss(rows[0], rows[3], 0.005, "qsearch (trial 3)") == (
        f" OVER THE BUDGET ON TEST DATA: the fastest plan within budget on both splits, qsearch (trial 3), is in "
        f"{ALTERNATIVE}.")
    assert "no other plan" in test_miss(rows[0], rows[3], 0.005, None)
    assert test_miss(rows[0], rows[5], 0.005, None) == ""  # within on test: nothing to add


def test_an_analytic_cost_ships_the_cheapest_plan_clear_of_the_budget():
    """Bit-operations decide for NPU targets: the cheapest plan within budget whose drop is clear
    of it by what the split resolves; intervals are computed cheapest first, only as needed."""
    from qsearch.choice import cheapest_clear

    def b(name, search, gbops, resolution):
        return dataclasses.replace(row(name, search, 1.0, resolution=None), bitops=gbops), resolution

    planted = [b("float", 0.90, 80.0, 0.001), b("naive", 0.80, 20.0, 0.001), b("edge", 0.8955, 25.0, 0.002),
               b("clear", 0.899, 30.0, 0.002), b("clear, dearer", 0.8995, 40.0, 0.002)]
    rows = [r for r, _ in planted]
    asked = []

    def interval(k):
        asked.append(k)
        return dataclasses.replace(rows[k], resolution=planted[k][1])

    i, checked = cheapest_clear(rows, 0.005, "bitops", interval)
    # naive is over budget; "edge" (drop 0.0045) is within it but not clear (0.0045 + 0.002 > 0.005)
    assert i == 3 and checked == {2, 3} and asked == [2, 3]
    # none clear: the cheapest within budget ships (the verdict says the split cannot tell)
    rows = [dataclasses.replace(r, resolution=None) for r, _ in planted]
    i, _ = cheapest_clear(rows, 0.005, "bitops", lambda k: dataclasses.replace(rows[k], resolution=0.01))
    assert i == 2
    # the size objective reads bytes, not bit-operations: the row with more GBOPs but fewer bytes ships
    sized = [rows[0], dataclasses.replace(rows[3], size_bytes=500), dataclasses.replace(rows[4], size_bytes=300)]
    assert cheapest_clear(sized, 0.005, "size", lambda k: dataclasses.replace(sized[k], resolution=0.0))[0] == 2
    assert cheapest_clear(sized, 0.005, "bitops", lambda k: dataclasses.replace(sized[k], resolution=0.0))[0] == 1
