"""A resolution for every metric: a score function that returns one number gets its drop's
interval by replaying it on the recorded outputs of its own runs (a jackknife over its batches),
and the plan that ships is clear of the budget by that resolution, or the verdict says the split
cannot tell. Real sessions on a small model; the choice itself on planted rows."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from qsearch.choice import clear, pick, resolution_note
from qsearch.evaluator import Evaluator
from qsearch.report.markdown import Row, verdict_line
from qsearch.resolution import drop_interval

from .conftest import make_cnn, open_bench, write_workload

SCORE = '''
import numpy as np

import os

DATA = np.load(os.path.join(os.path.dirname(__file__), "search.npz"))


def accuracy(session):
    """Top-1 in batches of 16, one number: what a user writes."""
    x, y = DATA["x"], DATA["label"]
    right = 0
    for i in range(0, len(x), 16):
        right += int((session.run(None, {"x": x[i:i + 16]})[0].argmax(1) == y[i:i + 16]).sum())
    return right / len(x)
'''


def _bench(tmp_path, entry: str):
    """A workload whose metric is the user's function `entry` (a module of its own per test)."""
    import importlib

    cfg = write_workload(tmp_path / "w", make_cnn(outlier_layer="conv_b"), n=192, max_drop="0.05")
    module = f"userscore_{entry}"
    (tmp_path / "w" / f"{module}.py").write_text(SCORE)
    importlib.invalidate_caches()
    cfg.write_text(cfg.read_text().replace("metric: top1", f"metric: {{search: '{module}:{entry}', "
                                                            f"test: '{module}:{entry}'}}"))
    return open_bench(cfg, tmp_path / "cache")


def test_a_score_without_parts_gets_a_resolution_from_the_replay(tmp_path):
    bench = _bench(tmp_path, "accuracy")
    ev = Evaluator(bench)
    plan = bench.uniform_plan("minmax", "per_tensor")
    score, iv = ev.search_with_interval(plan)
    assert iv is not None and iv.stderr > 0
    assert abs(iv.drop - (bench.baseline.fp32_search - score)) < 1e-12 and iv.low < iv.drop < iv.high
    # the same drop as per-sample parts (what a built-in top-1 bootstraps): the two agree on the scale
    fp32 = bench.engine.session(bench.prepared.proto)
    q = bench.engine.session(bench.rewriter(plan))
    data = np.load(tmp_path / "w" / "search.npz")
    parts = [np.stack([(s.run(None, {"x": data["x"][i:i + 16]})[0].argmax(1) == data["label"][i:i + 16]).sum()
                       * np.ones(1), 16 * np.ones(1)], 1) for s in (fp32, q) for i in range(0, 192, 16)]
    boot = drop_interval("top1", np.concatenate(parts[:12]), np.concatenate(parts[12:]))
    assert 0.3 < iv.stderr / boot.stderr < 3


def test_a_score_whose_runs_depend_on_its_outputs_stays_unknown(tmp_path):
    """A function that asks a different number of runs of the two models, or whose replay does not
    give its own score back, gets no interval rather than a wrong one."""
    from qsearch.replay import Recording, jackknife

    bench = _bench(tmp_path, "accuracy")
    x = np.load(tmp_path / "w" / "search.npz")["x"]
    fp32 = Recording(bench.engine.session(bench.prepared.proto))
    plan = Recording(bench.engine.session(bench.rewriter(bench.uniform_plan("minmax", "per_tensor"))))

    def runs(session, n):
        return float(sum(session.run(None, {"x": x[16 * i:16 * i + 16]})[0].max() for i in range(n)))

    a, b = runs(fp32, 4), runs(plan, 3)  # the function asked FP32 one run more
    assert jackknife(lambda s: runs(s, 4), fp32, plan, a, b) is None
    fp32.calls.clear()
    plan.calls.clear()
    a, b = runs(fp32, 4), runs(plan, 4)
    assert jackknife(lambda s: runs(s, 4), fp32, plan, a, b) is not None
    assert jackknife(lambda s: runs(s, 4) + 1e-9, fp32, plan, a, b) is None  # replay must give its score back


def _row(name, score, ms, resolution=None):
    return Row(name, score, score, ms, 1000, 3, None, cpu_ms=ms, resolution=resolution)


def test_the_shipped_plan_is_clear_of_the_budget_or_the_verdict_says_it_cannot_tell():
    fp32 = _row("fp32", 0.90, 10.0)
    edge = _row("trial 1", 0.896, 6.0, resolution=0.002)  # drop 0.004 of 0.005: within 0.002 of it
    safe = _row("trial 2", 0.899, 7.0, resolution=0.002)
    rows = [fp32, edge, safe]
    assert clear(edge, fp32, 0.005) is False and clear(safe, fp32, 0.005) is True
    assert clear(_row("x", 0.899, 7.0), fp32, 0.005) is None  # unknown resolution
    assert pick(rows, 0.005) == 1  # the fastest within budget...
    assert pick(rows, 0.005, among={2}) == 2  # ...but among the clear ones, the clear one ships
    note = resolution_note(edge, 0.005, fp32)
    assert note.startswith("the search split cannot tell whether this plan is within budget")
    assert resolution_note(safe, 0.005, fp32) == ""
    line = verdict_line(fp32, edge, 0.005, "top1", False, edge=True)
    assert line.startswith("The search split cannot tell whether this plan is within budget")


def _timed(name, score, ms, resolution=None, rounds=6):
    t = tuple(ms * (1 + 0.003 * ((k % 3) - 1)) for k in range(rounds))
    return Row(name, score, score, ms, 1000, 3, None, cpu_ms=ms, resolution=resolution, wall_rounds=t, cpu_rounds=t)


def test_a_clear_plan_that_does_not_pay_is_no_answer_and_fp32_ships_before_a_slower_plan():
    """The detector at batch 1 (`experiments/closed_loop_ocr_det_lines_batch1_noparts_avx2.md`): the fast
    trials are within budget but not clear of it (a wide replay interval); the only clear plan, a
    greedy fallback with six INT8 layers, runs slower than FP32. It must not ship: the fast plan
    stays, said to be at the edge; and a plan slower than FP32 never ships."""
    from qsearch.choice import fp32_instead, pays, prefer_clear

    rows = [_timed("fp32", 0.737, 14.3), _timed("naive", 0.30, 12.3), _timed("hybrid", 0.741, 14.5),
            _timed("trial 22", 0.728, 12.7), _timed("trial 35", 0.737, 13.0)]
    resolutions = {1: 0.01, 2: 0.001, 3: 0.034, 4: 0.034}

    def interval(k):
        return replace(rows[k], resolution=resolutions[k])

    i, checked = prefer_clear(rows, 3, 0.01, False, interval)
    # the hybrid is clear but slower than FP32: no answer; of the two that pay, neither clear, the
    # larger margin ships (trial 35: drop 0.0 against trial 22's 0.009, the same resolution)
    assert i == 4 and checked == {2, 3, 4}
    assert not pays(rows, 2) and pays(rows, 3)
    assert fp32_instead(rows, 2, "cpu") and not fp32_instead(rows, 3, "cpu")
    from qsearch.choice import why_lost
    assert why_lost(rows, 4, 3, 0.01, False).startswith("neither is clear of the budget; the shipped plan has the larger")
    resolutions[4] = 0.06  # trial 35's drop is wider: 0.0 + 0.06 against 0.009 + 0.034
    assert prefer_clear(rows, 3, 0.01, False, interval)[0] == 3
    resolutions[4] = 0.034
    rows[4] = replace(rows[4], resolution=None)
    resolutions[4] = 0.001  # a clear trial that pays: it ships instead
    assert prefer_clear(rows, 3, 0.01, False, interval)[0] == 4


def test_the_best_of_many_plans_needs_a_wider_margin_to_be_clear():
    """The best of 50 noisy drops is the luckiest: a margin of two standard errors clears a plan
    measured alone, not the winner among 50 (Bonferroni, one-sided: z = 3.09 at 5%/50)."""
    from qsearch.choice import selection_factor

    assert selection_factor(1) == 1.0 and selection_factor(0) == 1.0
    assert abs(selection_factor(50) - 3.0902 / 2) < 1e-3
    assert selection_factor(10) < selection_factor(50) < selection_factor(500)
    fp32, plan = _row("fp32", 0.70, 10.0), _row("trial 20", 0.7027, 6.0, resolution=0.0098)  # seed 1's numbers
    assert clear(plan, fp32, 0.01) is True  # -0.0027 + 0.0098 <= 0.01
    assert clear(plan, fp32, 0.01, compared=60) is False  # -0.0027 + 0.0098 * 1.58 > 0.01
    note = resolution_note(plan, 0.01, fp32, compared=60)
    assert note.startswith("the search split cannot tell") and "among 60 plans" in note


def test_a_gain_on_a_split_that_cannot_tell_is_no_margin():
    """The detector at batch 4: trials 0.02-0.03 above FP32 on search lost 0.015-0.02 on test. Where
    no paying plan is clear, a measured gain counts as no drop, and the plan whose outputs move
    least (the smaller resolution) ships; the finalists' table states each drop once."""
    from qsearch.choice import prefer_clear, selection_factor, upper_drop
    from qsearch.report.markdown import finalists_table

    rows = [_timed("fp32", 0.737, 14.3), _timed("naive", 0.30, 12.3), _timed("hybrid", 0.741, 14.5),
            _timed("lucky", 0.767, 12.5), _timed("quiet", 0.742, 12.9)]
    resolutions = {2: 0.001, 3: 0.03, 4: 0.02}  # lucky: -0.03 +- 0.03; quiet: -0.005 +- 0.02

    def interval(k):
        return replace(rows[k], resolution=resolutions[k], interval=f"{rows[0].search_score - rows[k].search_score:.3g} "
                       "(90% interval a to b)")

    i, _ = prefer_clear(rows, 3, 0.01, False, interval, compared=60)  # neither clear among 60 plans
    f = selection_factor(60)
    assert i == 4 and abs(upper_drop(rows[3], rows[0], 60) - 0.03 * f) < 1e-12
    assert abs(upper_drop(rows[4], rows[0], 60) - 0.02 * f) < 1e-12  # without the gain counted as none: 0.047 - 0.03
    table = finalists_table([rows[3]], "custom", rows[0])
    assert "| -0.03 (90% interval a to b) |" in table and "-0.03 -0.03" not in table
