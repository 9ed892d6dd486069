"""The early verdict: when the analysis shows no plan can beat FP32 by more than the timing
noise, `optimize` runs no search, says why, and ships FP32 with the measured profile kept. The
profile answers where it can; where it cannot rule single layers out, a measurement decides."""

from __future__ import annotations

from types import SimpleNamespace

import optuna

import qsearch
from qsearch import timing
from qsearch.analysis.sensitivity import LayerSensitivity, SensitivityProfile
from qsearch.analysis.verdict import Measured, candidates, early_verdict, from_measurement, from_profile, measure
from qsearch.config import SearchSpace

from .conftest import make_cnn, open_bench, write_workload


def _profile(fp32_ms: float, int8_ms: float, gains: list[float]) -> SensitivityProfile:
    layers = tuple(LayerSensitivity(f"L{i}", "Conv", 1, 1, {}, {}, fp32_ms=1.0, int8_ms=1.0 - g)
                   for i, g in enumerate(gains))
    return SensitivityProfile("m", "sha256:0", "top1", 0.9, 64, layers, None,
                              meta={"fp32_ms": fp32_ms, "int8_ms": int8_ms})


def _bench(objective: str = "latency", target: str = "cpu"):
    return SimpleNamespace(workload=SimpleNamespace(space=SearchSpace(objective=objective), target=target))


def test_the_verdict_needs_every_way_to_pay_below_the_noise():
    slow = _profile(10.0, 12.0, [0.05, -0.3, 0.1])  # all-INT8 slower; 0.15 ms from single layers: 1.5%
    assert early_verdict(_bench(), slow).startswith("early verdict: no INT8 plan can beat FP32")
    assert early_verdict(_bench(), _profile(10.0, 9.5, [-0.3])) == ""  # all-INT8 saves 5%: search
    # all-INT8 slower, but one layer alone seems to save 3%: the profile cannot tell, a measurement decides
    assert from_profile(_profile(10.0, 12.0, [0.3, -0.3])) is None
    assert early_verdict(_bench("bitops"), slow) == ""  # speed is not what is asked for
    assert early_verdict(_bench(target="fp16"), slow) == ""


def test_optimize_stops_early_runs_no_trial_and_ships_fp32(tmp_path, monkeypatch):
    """Planted noise far above anything INT8 could save (TIE = 1000%), so the path runs on any CPU."""
    monkeypatch.setattr(timing, "TIE", 10.0)
    cfg = write_workload(tmp_path / "w", make_cnn(), n=96, max_drop="0.05", search=False)
    r = qsearch.optimize(cfg, budget=20, out=tmp_path / "out")
    assert r.status == 0 and all(not c.quantized for c in r.plan.layers.values())
    assert r.evaluations < 20  # analysis, naive, the greedy fallback, test scorings: fewer than the 20 trials asked
    study = optuna.load_study(study_name=r.plan.provenance["study"], storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    assert study.trials == []
    # the verdict is a shared job in the study's storage: every worker on it takes the same decision
    names = [x.study_name for x in optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'out' / 'study.db'}")]
    assert any(n.endswith("-analysis-verdict") for n in names), names
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Early verdict: no INT8 plan can beat FP32" in report and (tmp_path / "out" / "sensitivity.yaml").is_file()


def _ratio(value: float, low: float, high: float) -> timing.Ratio:
    return timing.Ratio(value, low, high, 5)


def test_a_measurement_decides_only_when_every_measured_plan_stays_under_the_noise():
    slow = [Measured("all-INT8", 5, _ratio(0.6, 0.58, 0.62)), Measured("INT8 where a layer pays alone", 2,
                                                                     _ratio(0.9, 0.85, 0.95))]
    said = from_measurement(10.0, 12.0, slow)
    assert said.startswith("early verdict: no INT8 plan can beat FP32") and "INT8 where a layer pays alone (2 layers)" in said
    # one plan's interval reaches past the noise: it might pay, so the search runs
    assert from_measurement(10.0, 12.0, [slow[0], Measured("x", 2, _ratio(1.0, 0.97, 1.03))]) == ""
    assert from_measurement(10.0, 12.0, []) == ""


def test_plans_the_profile_points_at_are_measured_on_the_real_runtime(tmp_path):
    """The small CNN's 8x8 maps: Q/DQ glue outweighs any int8 kernel, on every CPU. A profile that
    makes one layer look as if it paid (the attribution artifact a fused hardswish leaves) cannot
    fire the verdict by itself; measuring its two plans does."""
    cfg = write_workload(tmp_path / "w", make_cnn(), n=64, search=False)
    bench = open_bench(cfg, tmp_path / "cache").calibrated()
    names = [la.name for la in bench.candidates()]
    profile = _profile(1.0, 2.0, [0.5] + [-0.5] * (len(names) - 1))
    profile = SensitivityProfile("m", "sha256:0", "top1", 0.9, 64, tuple(
        LayerSensitivity(n, x.op_type, 1, 1, {}, {"int8/minmax/per_tensor": 30.0}, fp32_ms=x.fp32_ms,
                         int8_ms=x.int8_ms) for n, x in zip(names, profile.layers)), None, meta=profile.meta)
    assert from_profile(profile) is None
    plans = candidates(bench, profile)
    assert [(name, n8) for name, _, n8 in plans] == [("all-INT8", len(names)), ("INT8 where a layer pays alone", 1)]
    measured = measure(bench, plans)
    assert all(m.speedup.rounds >= timing.MIN_ROUNDS and m.speedup.low <= m.speedup.value <= m.speedup.high
               for m in measured)
    assert all(m.speedup.high < 1.0 for m in measured)  # both run at 0.6-0.7x FP32 on a 2-core AVX2 EPYC
    said = early_verdict(bench, profile)
    assert said.startswith("early verdict") and "measured against FP32 in interleaved rounds" in said
