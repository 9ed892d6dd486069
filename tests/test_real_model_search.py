"""What real pretrained models broke: compounding error below the metric's resolution, INT8 that
does not pay, nondeterministic metrics. Small models built here, real sessions and studies."""

import numpy as np
import yaml

from qsearch.cli import main
from qsearch.config import load_workload
from qsearch.pipeline import Context
from qsearch.plan import LayerChoice
from qsearch.search import Search
from qsearch.sensitivity import analyze

from .conftest import make_cnn, write_chain_workload, write_workload


def test_compounding_error_below_resolution_still_meets_budget(tmp_path):
    """30 layers that each cost at most the budget alone, but together break it: the fixed set
    is measured together, and the search (with repair) still returns a plan within budget."""
    ctx = Context(load_workload(write_chain_workload(tmp_path / "w", max_drop="0.005")), cache_dir=tmp_path / "cache", log=lambda *a: None)
    allowed, fp32 = ctx.allowed_drop(), ctx.baseline.fp32_search
    single = [fp32 - ctx.evaluate(ctx.plan({n: LayerChoice("int8", "minmax", "per_tensor")}), timing=False).score
              for n in ctx.prepared.layer_names]
    all_int8 = fp32 - ctx.evaluate(ctx.uniform_plan("minmax", "per_tensor"), timing=False).score
    # each layer alone: at most one of 512 samples flips (the resolution); all together: over budget
    assert len(single) == 31 and max(single) <= 1 / 512 and all_int8 > allowed
    profile = analyze(ctx, cache_dir=tmp_path / "cache")
    assert profile.meta["evaluations"] <= len(single) + 2  # one screen per layer + one proxy pass
    search = Search(ctx, profile, tmp_path / "out")
    d = search.decision
    assert d.all_int8_drop > allowed
    assert d.joint_drop is None or d.joint_drop <= ctx.workload.space.fix_below * allowed + 1e-12
    search.run(10)
    search.repair()
    best = search.best()
    assert best is not None and best.drop <= allowed
    assert sum(LayerChoice.parse(c).is_int8 for c in best.choices.values()) > 0  # not just FP32


def test_plan_is_never_slower_than_fp32_where_int8_does_not_pay(tmp_path, capsys):
    """On a tiny CNN, Q/DQ glue costs more than the int8 kernels save: the profile says so per
    layer, and whatever optimize ships is not slower than FP32 in its own measurement."""
    cfg = write_workload(tmp_path / "w", make_cnn(), n=96, max_drop="0.05",
                         extra="search_space: {calibration: [minmax], granularity: [per_tensor]}\n")
    out = tmp_path / "out"
    assert main(["optimize", "--config", str(cfg), "--out", str(out), "--budget", "6"]) == 0
    prof = yaml.safe_load((out / "sensitivity.yaml").read_text())
    assert any(x["fp32_ms"] - x["int8_ms"] < 0 for x in prof["layers"])  # measured, not assumed
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    m = plan["metrics"]
    assert m["plan"]["latency_ms"] <= m["fp32"]["latency_ms"]
    report = (out / "report.md").read_text()
    assert "Where the time goes" in report and "Q/DQ glue" in report
    if m["plan"]["latency_ms"] == m["fp32"]["latency_ms"]:  # FP32 shipped: said plainly
        assert "No INT8 plan within budget beats FP32" in report


def test_nondeterministic_metric_is_refused_before_analysis(tmp_path, capsys):
    w = tmp_path / "w"
    cfg = write_workload(w, make_cnn(), n=64)
    (w / "noisy_metric.py").write_text("import random\n\ndef score(session):\n    return random.random()\n")
    cfg.write_text(cfg.read_text().replace("metric: top1", "metric: {search: 'noisy_metric:score', test: 'noisy_metric:score'}"))
    assert main(["optimize", "--config", str(cfg), "--out", str(tmp_path / "o"), "--budget", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and "noisy_metric:score" in err[-1] and "not deterministic" in err[-1]


def test_study_is_bound_to_the_config_and_odd_out_paths_work(tmp_path):
    cfg = write_workload(tmp_path / "w", make_cnn(), n=64, max_drop="0.05",
                         extra="search_space: {calibration: [minmax], granularity: [per_tensor], objective: bitops}\n")
    out = tmp_path / "odd?#%out"
    ctx = Context(load_workload(cfg), cache_dir=out / "cache", log=lambda *a: None)
    profile = analyze(ctx, cache_dir=out / "cache")
    s1 = Search(ctx, profile, out)
    s1.run(3)
    assert (out / "study.db").is_file() and not any(p.name.startswith("odd") and p.is_file() for p in tmp_path.iterdir())
    # another budget is another study: the old trials are not reused
    cfg.write_text(cfg.read_text().replace("max_drop: 0.05", "max_drop: 0.01"))
    ctx2 = Context(load_workload(cfg), cache_dir=out / "cache", log=lambda *a: None)
    s2 = Search(ctx2, analyze(ctx2, cache_dir=out / "cache"), out)
    assert s2.study_name != s1.study_name and len(s2.study.trials) == 0
    # the same config resumes the same study, with the fixed set read back instead of re-measured
    s3 = Search(Context(load_workload(cfg), cache_dir=out / "cache", log=lambda *a: None), profile, out)
    assert s3.study_name == s2.study_name and s3.evaluations == 0
    assert np.isfinite(s1.best().cost)
