import numpy as np

from qsearch.analysis.sensitivity import analyze, spearman
from qsearch.evaluator import Evaluator, bitops
from qsearch.finalize import greedy_fallback
from qsearch.plan.format import LayerChoice
from qsearch.search import strategy
from qsearch.search.framing import problem_for
from qsearch.workbench import open_workbench

from .conftest import make_cnn, new_search, open_bench, write_workload


def _ctx(tmp_path, max_drop="0.02", extra=""):
    cfg = write_workload(tmp_path / "w", make_cnn(outlier_layer="conv_b"), n=128, max_drop=max_drop, extra=extra)
    return open_bench(cfg, tmp_path / "cache")


def test_outlier_layer_is_ranked_first_and_hurts_most(tmp_path):
    ctx = _ctx(tmp_path, extra="search_space: {granularity: [per_tensor], calibration: [minmax]}\n")
    profile = analyze(ctx, cache_dir=tmp_path / "cache")
    # the two layers that quantize the outlier tensor come first, with real accuracy drops
    assert {x.name for x in profile.layers[:2]} == {"conv_b", "add_res"}
    assert min(x.best_drop for x in profile.layers[:2]) > 0.05
    # the measured drops are real: quantizing the top half together hurts more than the bottom half
    names = [x.name for x in profile.layers]
    half = len(names) // 2

    def drop(layers):
        plan = ctx.uniform_plan("minmax", "per_tensor", keep_float=tuple(n for n in names if n not in layers))
        return Evaluator(ctx).evaluate(plan, timing=False).drop

    assert drop(names[:half]) > drop(names[half:])
    # the probe proxy agrees on the worst layer, with no scoring function involved
    label = LayerChoice("int8", "minmax", "per_tensor", weights=ctx.workload.space.weights[0]).label()
    sq = {x.name: x.proxy_sqnr.get(label, x.proxy_sqnr.get("int8/minmax/per_tensor")) for x in profile.layers}
    assert sq["conv_a"] > sq["conv_b"] + 3  # dB


def test_profile_is_cached_and_calibration_runs_once(tmp_path):
    ctx = _ctx(tmp_path)
    assert ctx.calibration_passes == 1
    p1 = analyze(ctx, samples=64, cache_dir=tmp_path / "cache")
    ctx2 = open_workbench(ctx.workload, cache_dir=tmp_path / "cache", log=lambda *a: None)
    assert ctx2.calibration_passes == 0  # statistics came from the on-disk cache
    p2 = analyze(ctx2, samples=64, cache_dir=tmp_path / "cache")
    assert p2.to_yaml() == p1.to_yaml()


def test_spearman_matches_hand_computed():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert abs(spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) - 0.8) < 1e-12


def test_search_meets_budget_and_is_at_least_as_good_as_greedy(tmp_path):
    # on a model this tiny int8 is neither faster nor smaller (Q/DQ overhead), so use the analytic cost
    ctx = _ctx(tmp_path, max_drop="0.02", extra="search_space: {objective: bitops}\n")
    profile = analyze(ctx, cache_dir=tmp_path / "cache")
    dims = strategy.build_dimensions(problem_for(ctx, profile))
    assert "conv_b" in dims.searched and dims.searched["conv_b"][-1] == "fp32"
    search = new_search(ctx, profile, tmp_path / "out")
    search.run(12)
    best = search.best()
    assert best is not None and best.drop <= ctx.allowed_drop()
    greedy, evals, _ = greedy_fallback(ctx, Evaluator(ctx), problem_for(ctx, profile))
    greedy_int8 = sum(greedy.choice(n).quantized for n in ctx.prepared.layer_names)
    best_int8 = sum(lbl.startswith("int8") for lbl in best.choices.values())
    assert best_int8 >= greedy_int8 and best.cost <= bitops(ctx, greedy)
    pareto = search.result().pareto()
    assert pareto and all(np.diff([r.cost for r in pareto]) >= 0)


def test_calibration_split_into_shared_jobs_equals_one_pass(tmp_path):
    """Per-tensor statistics do not depend on the other tensors: the parts that workers share
    (through the study's job queue) merge into exactly the single pass's statistics."""
    from qsearch.search.jobs import StudyQueue

    ctx = _ctx(tmp_path)
    one = ctx.stats
    split = open_workbench(ctx.workload, cache_dir=tmp_path / "cache2", log=lambda *a: None, calibrate=False)
    assert split.stats is None and split.calibration_passes == 0
    queue = StudyQueue(None, tmp_path / "out", "calib-test")
    split = split.calibrated(queue, log=lambda *a: None)
    shared = split.stats
    assert split.calibration_passes == 2  # one pass per part, here both in this process
    assert sorted(shared.tensors) == sorted(one.tensors)
    for t, s in one.tensors.items():
        o = shared.tensors[t]
        assert (o.min, o.max, o.lo, o.hi) == (s.min, s.max, s.lo, s.hi) and np.array_equal(o.counts, s.counts)
    again = open_workbench(ctx.workload, cache_dir=tmp_path / "cache2", log=lambda *a: None, calibrate=False)
    again = again.calibrated(queue, log=lambda *a: None)
    assert again.calibration_passes == 0  # merged statistics cached; the queue's jobs are done


def test_cache_sized_runs_give_whole_batch_results(tmp_path, monkeypatch):
    """qsearch runs the model in cache-sized pieces of each batch (`workbench.run_samples`): the
    scores, the calibration's exact min/max and the proxy match whole-batch runs."""
    from qsearch import workbench
    from qsearch.analysis import proxy

    whole = _ctx(tmp_path)
    assert whole.run_samples is not None and whole.run_samples >= 32  # tiny maps: whole batches
    monkeypatch.setattr(workbench, "RUN_BYTES", 4 * 8 * 8 * 8 * 4)  # the 8x8x8 feature maps: 4 samples a run
    small = open_workbench(whole.workload, cache_dir=tmp_path / "cache-small", log=lambda *a: None)
    assert small.run_samples == 4
    assert small.baseline.fp32_search == whole.baseline.fp32_search
    assert Evaluator(small).fp32_test() == Evaluator(whole).fp32_test()
    plan = {la.name: LayerChoice("int8", "minmax", "per_tensor") for la in whole.candidates()}
    assert Evaluator(small).evaluate(small.plan(plan)).score == Evaluator(whole).evaluate(whole.plan(plan)).score
    for t, s in whole.stats.tensors.items():
        o = small.stats.tensors[t]
        assert (o.min, o.max, o.counts.sum()) == (s.min, s.max, s.counts.sum())
    entries = [(la, LayerChoice("int8", "minmax", "per_tensor")) for la in whole.candidates()]
    a, _ = proxy.proxy_sqnr(whole, entries, whole.search_data)
    b, _ = proxy.proxy_sqnr(small, entries, small.search_data)
    assert np.allclose(a, b, rtol=1e-4)


def test_graph_edges_follow_value_moving_ops(tmp_path):
    """The border model's graph: candidate layers joined by a tensor, through the Reshape between
    the pooled features and the classifier; the model input is the one border all-INT8 keeps."""
    from qsearch.search.framing import graph_edges

    ctx = _ctx(tmp_path)
    edges, outer = graph_edges(ctx)
    assert set(edges) == {("conv_a", "conv_b"), ("conv_a", "add_res"), ("conv_b", "add_res"), ("add_res", "gap"),
                          ("gap", "fc")}
    assert outer == 1


def test_the_screen_spends_a_share_of_the_search_and_still_finds_the_outlier(tmp_path):
    from qsearch.analysis.screen import MIN_METRIC_SAMPLES, MIN_SAMPLES, samples_within

    # 300 layers, a 50-trial budget over 48 samples, half of it for the screen: 4 each -> the floor
    assert samples_within(0.5 * 50 * 48, 300, 48, metric=False) == MIN_SAMPLES
    assert samples_within(0.5 * 50 * 48, 300, 48, metric=True) == MIN_METRIC_SAMPLES  # a top-1 drop needs more
    assert samples_within(0.5 * 50 * 160, 59, 64, metric=False) == 64  # cheap enough: never more than it has
    assert samples_within(0.5 * 50 * 96, 70, 64, metric=False) == 34
    ctx = _ctx(tmp_path, extra="search_space: {granularity: [per_tensor], calibration: [minmax]}\n")
    profile = analyze(ctx, cache_dir=tmp_path / "cache", screen_spend=10)
    assert profile.meta["screen_samples"] == MIN_METRIC_SAMPLES
    assert {x.name for x in profile.layers[:2]} == {"conv_b", "add_res"}  # the outlier, found on 32 of 128 samples
    assert "screen_samples" not in analyze(ctx, cache_dir=tmp_path / "cache").meta  # no spend given: all samples


def test_the_proxy_reads_as_many_input_values_as_it_needs_not_more():
    """A layer's output SQNR is a statistic over its values: large pages reach the proxy's count in
    fewer samples; small inputs keep every sample of the screen's subset; never under the floor."""
    import numpy as np

    from qsearch.analysis.screen import MIN_SAMPLES, PROXY_ELEMENTS, proxy_samples
    from qsearch.data import Dataset

    def ds(n, shape, per_batch=1):
        batches = tuple({"x": np.zeros((per_batch, *shape), np.float32)} for _ in range(n // per_batch))
        return Dataset("search", batches, (None,) * len(batches), n, "planted")

    assert proxy_samples(ds(48, (3, 800, 608))) == -(-PROXY_ELEMENTS // (3 * 800 * 608)) == 11
    assert proxy_samples(ds(64, (3, 48, 320), per_batch=8)) == 64  # 2.9M values in all: every sample
    assert proxy_samples(ds(64, (3, 256, 256))) == 64  # 81 would reach the count: the subset holds 64
    assert proxy_samples(ds(16, (3, 4000, 4000))) == MIN_SAMPLES


def test_a_screen_of_output_noise_reads_as_many_input_values_as_it_needs():
    """Screening each layer alone on large pages: output noise over SCREEN_ELEMENTS input values,
    whatever the spend allows (the layout detector: 4 pages of 800x608, not 8); a built-in metric
    read from the same outputs keeps its floor; small inputs are untouched."""
    from qsearch.analysis.screen import MIN_METRIC_SAMPLES, MIN_VALUE_SAMPLES, SCREEN_ELEMENTS, samples_within

    page = 3 * 800 * 608
    assert samples_within(0.5 * 50 * 48, 138, 48, metric=False, per_sample=page) == SCREEN_ELEMENTS // page == 4
    assert samples_within(0.5 * 50 * 48, 138, 48, metric=True, per_sample=page) == MIN_METRIC_SAMPLES
    assert samples_within(0.5 * 50 * 96, 70, 64, metric=False, per_sample=3 * 256 * 256) == 30  # 6M values: 30 pages
    assert samples_within(0.5 * 50 * 96, 70, 64, metric=False, per_sample=3 * 48 * 320) == 34  # spend decides
    assert samples_within(1e9, 10, 64, metric=False, per_sample=3 * 4000 * 4000) == MIN_VALUE_SAMPLES
