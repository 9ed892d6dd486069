"""Search strategies as units: planted numbers, a fake evaluator, no ONNX model or workload."""

from __future__ import annotations

import numpy as np

from qsearch.config import SearchSpace
from qsearch.search import strategy
from qsearch.search.problem import LayerFacts, Problem

INT8 = "int8/minmax/per_channel"


class Planted:
    """A fake evaluator: drop = sum of single-layer drops + an extra drop for each listed pair of
    adjacent layers that are both INT8 (errors that compound, invisible layer by layer)."""

    def __init__(self, single: np.ndarray, pairs: dict[tuple[int, int], float]):
        self.single, self.pairs, self.calls = single, pairs, 0

    def int8(self, choices) -> set[int]:
        return {int(n[1:]) for n, lbl in choices.items() if lbl.startswith("int8")}

    def __call__(self, choices) -> float:
        self.calls += 1
        on = self.int8(choices)
        return float(sum(self.single[i] for i in on) + sum(v for (a, b), v in self.pairs.items() if a in on and b in on))


def chain_problem(seed: int = 0, n: int = 40):
    """40 layers in a chain, each far below the budget alone, all together 3x over it; eight
    adjacent pairs amplify each other; savings 1-10 (ms); the analysis saw only single-layer noise."""
    rng = np.random.default_rng(seed)
    single = rng.uniform(0.2, 1.0, n) * 1e-3
    saving = rng.uniform(1.0, 10.0, n)
    pairs = {}
    for i in rng.choice(n - 1, 8, replace=False):
        pairs[(int(i), int(i) + 1)] = 4 * (single[i] + single[i + 1])
    allowed = float(single.sum() / 3)
    layers = tuple(LayerFacts(f"L{i}", (INT8,), float(saving[i]), float(single[i]), 0) for i in range(n))
    ranked = sorted(layers, key=lambda x: -x.noise)
    layers = tuple(LayerFacts(x.name, x.options, x.saving, x.noise, ranked.index(x)) for x in layers)
    space = SearchSpace(min_searched=8, fix_below=0.25)
    return Problem(layers, "fp32", allowed, space), Planted(single, pairs), saving


def optimum(single, pairs, saving, allowed, unit=1e-6) -> float:
    """Exact best saving within budget on a chain (DP over layer, previous layer's choice, drop used)."""
    cap = int(allowed / unit)
    w = np.round(single / unit).astype(int)
    extra = {a: int(round(v / unit)) for (a, _), v in pairs.items()}
    neg = -1e18
    # best[prev_on][used] after each layer
    best = np.full((2, cap + 1), neg)
    best[0][0] = 0.0
    for i in range(len(single)):
        new = np.full((2, cap + 1), neg)
        new[0] = np.maximum(best[0], best[1])
        for prev in (0, 1):
            cost = w[i] + (extra.get(i - 1, 0) if prev else 0)
            if cost <= cap:
                new[1][cost:] = np.maximum(new[1][cost:], best[prev][: cap + 1 - cost] + saving[i])
        best = new
    return float(best.max())


def test_closed_loop_reaches_95_percent_of_the_brute_force_optimum_within_50_evaluations():
    for seed in range(3):
        problem, measure, saving = chain_problem(seed)
        opt = optimum(measure.single, measure.pairs, saving, problem.allowed)
        decision = strategy.choose_fixed(problem, measure)
        fixed = {n: INT8 for n in decision.fixed}
        inc = strategy.closed_loop(problem, measure, fixed, max_evals=50 - measure.calls)
        assert measure.calls <= 50  # fixing, bisection and swaps all counted
        got = measure(inc.choices)
        assert got <= problem.allowed + 1e-12 and abs(got - inc.drop) < 1e-12
        reached = sum(saving[i] for i in measure.int8(inc.choices))
        assert reached >= 0.95 * opt, (seed, reached, opt)


def test_additive_knapsack_warm_starts_miss_that_optimum():
    """The planted problem is hard for what the search did before: the additive-noise warm starts
    either break the budget or fall short of 95% of the optimum."""
    problem, measure, saving = chain_problem(0)
    opt = optimum(measure.single, measure.pairs, saving, problem.allowed)
    decision = strategy.choose_fixed(problem, measure)
    dims = strategy.build_dimensions(problem, decision.fixed)
    plans = strategy.warm_start_plans(problem, dims, decision)
    fixed = dict(dims.fixed)
    feasible = [p for p in plans if measure({**fixed, **p}) <= problem.allowed]
    best = max((sum(saving[i] for i in measure.int8({**fixed, **p})) for p in feasible), default=0.0)
    assert best < 0.95 * opt


def test_a_float_island_whose_borders_cost_more_than_int8_loses_goes_int8():
    """l1 alone is slower in INT8 (-0.1 ms) but as a float island between INT8 neighbours it costs
    two Q/DQ borders (0.3 ms each): the plan must keep it INT8. l4 is an INT8 island whose saving
    (0.2 ms) is less than its two borders: it goes float."""
    names = ["l0", "l1", "l2", "l3", "l4", "l5"]
    saving = {"l0": 2.0, "l1": -0.1, "l2": 2.0, "l3": -1.0, "l4": 0.2, "l5": -1.0}
    layers = tuple(LayerFacts(n, (INT8,), saving[n], 1e-4, i) for i, n in enumerate(names))
    edges = tuple(zip(names, names[1:]))
    problem = Problem(layers, "fp32", 0.01, SearchSpace(), edges=edges, border_cost=0.3)
    calls = []

    def measure(choices):
        calls.append(choices)
        return 0.001 * sum(lbl.startswith("int8") for lbl in choices.values())

    inc = strategy.closed_loop(problem, measure)
    assert inc.choices["l1"] == INT8  # no float island between l0 and l2
    assert inc.choices["l4"] == "fp32" and inc.choices["l3"] == "fp32"
    assert inc.saving == problem.saving({"l0", "l1", "l2"})


def test_greedy_revert_bisects_with_few_evaluations():
    problem, measure, _ = chain_problem(1)
    plan, evals = strategy.greedy_revert(problem, INT8, measure)
    assert measure(plan) <= problem.allowed
    assert evals <= 2 * int(np.ceil(np.log2(len(problem.layers)))) + 2


def test_a_float_region_of_two_layers_between_int8_regions_goes_int8_as_a_whole():
    """m1 and m2 each lose 0.05 ms in INT8, so neither pays alone and flipping one alone only moves
    a border; as a region between INT8 neighbours they cost two borders of 0.3 ms: both go INT8."""
    names = ["a", "m1", "m2", "b"]
    saving = {"a": 1.0, "m1": -0.05, "m2": -0.05, "b": 1.0}
    layers = tuple(LayerFacts(n, (INT8,), saving[n], 1e-4, i) for i, n in enumerate(names))
    problem = Problem(layers, "fp32", 0.01, SearchSpace(), edges=tuple(zip(names, names[1:])), border_cost=0.3)
    inc = strategy.closed_loop(problem, lambda c: 0.001 * sum(v.startswith("int8") for v in c.values()))
    assert all(inc.choices[n] == INT8 for n in names)
    # with a budget that does not allow them, the region stays float and the plan stays within budget
    tight = Problem(layers, "fp32", 0.0025, SearchSpace(), edges=problem.edges, border_cost=0.3)
    inc = strategy.closed_loop(tight, lambda c: 0.001 * sum(v.startswith("int8") for v in c.values()))
    assert inc.drop <= 0.0025 and sum(v == INT8 for v in inc.choices.values()) == 2


def planted_fix_problem(allowed=0.01):
    """12 layers with planted output noise (the analysis's measure), L2 slower in INT8."""
    noise = [1e-4, 2e-4, 3e-4, 4e-4, 5e-4, 6e-4, 3e-3, 4e-3, 5e-3, 6e-3, 7e-3, 8e-3]
    layers = tuple(LayerFacts(f"L{i}", (INT8, "int8/mse/per_channel"), -1.0 if i == 2 else 1.0, v, 11 - i)
                   for i, v in enumerate(noise))
    return Problem(layers, "fp32", allowed, SearchSpace(min_searched=4, fix_below=0.25))


def test_choose_fixed_takes_the_quietest_paying_layers_whose_measured_joint_drop_fits():
    problem = planted_fix_problem()

    def additive(choices):  # the drop is the summed noise of the INT8 layers
        return sum(problem.facts(n).noise for n, lbl in choices.items() if lbl != "fp32")

    d = strategy.choose_fixed(problem, additive)
    # share = 0.25 x 0.01: L0, L1, L3, L4, L5 (1.8e-3; L2 does not pay, L8-L11 are the 4 noisiest)
    assert d.fixed == ("L0", "L1", "L3", "L4", "L5") and d.evaluations == 2
    assert abs(d.joint_drop - 1.8e-3) < 1e-12 and abs(d.all_int8_drop - sum(x.noise for x in problem.layers)) < 1e-12

    def compounding(choices):  # L4 and L5 together cost 1.2e-3 more than their noise says
        on = {n for n, lbl in choices.items() if lbl != "fp32"}
        return additive(choices) + (1.2e-3 if {"L4", "L5"} <= on else 0.0)

    d = strategy.choose_fixed(problem, compounding)
    assert d.fixed == ("L0", "L1", "L3") and d.evaluations == 3 and d.joint_drop <= 0.25 * problem.allowed


def test_warm_start_plans_start_from_what_pays_then_all_int8_then_knapsacks():
    problem = planted_fix_problem()
    decision = strategy.FixDecision(("L0", "L1"), 3e-4, 0.0351, 2)
    dims = strategy.build_dimensions(problem, decision.fixed)
    assert set(dims.fixed) == {"L0", "L1"} and dims.searched["L3"] == (INT8, "int8/mse/per_channel", "fp32")
    plans = strategy.warm_start_plans(problem, dims, decision)
    assert plans[0] == {**{n: INT8 for n in dims.searched}, "L2": "fp32"}  # INT8 only where it pays
    assert plans[1] == {n: INT8 for n in dims.searched}  # the best all-INT8 plan
    assert dict.fromkeys(dims.searched, "fp32") in plans
    assert len({tuple(sorted(p.items())) for p in plans}) == len(plans)  # no plan twice
    knapsack = plans[2]  # the whole budget's worth of noise, by saving per unit of noise
    int8_noise = sum(problem.facts(n).noise for n, lbl in knapsack.items() if lbl != "fp32") + 3e-4
    assert int8_noise <= sum(x.noise for x in problem.layers) * problem.allowed / decision.all_int8_drop + 1e-12


def test_a_few_noisy_layers_in_a_long_chain_go_float_and_the_rest_stays_one_int8_region():
    """Three noisy layers break the budget; 27 quiet ones fit easily: the three go float and
    everything else stays INT8 (6 borders), within a handful of evaluations."""
    n = 30
    noisy = {4, 15, 23}
    noise = [5e-3 if i in noisy else 1e-5 for i in range(n)]
    names = [f"c{i}" for i in range(n)]
    ranked = sorted(range(n), key=lambda i: -noise[i])
    layers = tuple(LayerFacts(names[i], (INT8,), 1.0, noise[i], ranked.index(i)) for i in range(n))
    problem = Problem(layers, "fp32", 0.004, SearchSpace(), edges=tuple(zip(names, names[1:])), border_cost=0.2)
    calls = []

    def measure(choices):
        calls.append(choices)
        return sum(noise[int(k[1:])] for k, v in choices.items() if v.startswith("int8"))

    inc = strategy.closed_loop(problem, measure, max_evals=25)
    int8 = {k for k, v in inc.choices.items() if v == INT8}
    assert int8 == set(names) - {f"c{i}" for i in noisy}
    assert inc.drop <= problem.allowed and problem.borders(int8) == 6 and len(calls) <= 25


def test_choose_fixed_orders_options_by_the_all_int8_set_measured_best():
    """The proxy ranks a clipping range first everywhere; all-INT8 with MinMax loses less: measured
    once each, the MinMax set wins and every layer's MinMax option comes first from then on."""
    clip, mm, mm_pt = "int8/percentile/per_channel", "int8/minmax/per_channel/cle", "int8/minmax/per_tensor"
    layers = tuple(LayerFacts(f"L{i}", (clip, mm, mm_pt), 1.0, 1e-4, i) for i in range(4))
    problem = Problem(layers, "fp32", 0.01, SearchSpace(min_searched=0))
    seen = []

    def measure(choices):
        seen.append(dict(choices))
        return sum({clip: 0.02, mm: 0.004, mm_pt: 0.001}.get(lbl, 0.0) for lbl in choices.values())

    d = strategy.choose_fixed(problem, measure)
    # the analysis's set, then the MinMax one; "MinMax per-channel" is the same set: not measured again
    assert [set(s.values()) for s in seen[:2]] == [{clip}, {mm}] and d.option_set == "minmax"
    assert abs(d.all_int8_drop - 4 * 0.004) < 1e-12
    assert strategy.with_option_set(problem, d.option_set).best == {f"L{i}": mm for i in range(4)}
    assert all(set(s.values()) <= {mm, "fp32"} for s in seen[2:])  # the fixed set is measured in it
    assert d.evaluations == len(seen)
