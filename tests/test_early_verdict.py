"""The early verdict: when the analysis shows no plan can beat FP32 by more than the timing
noise, `optimize` runs no search, says why, and ships FP32 with the measured profile kept."""

from __future__ import annotations

from types import SimpleNamespace

import optuna

import qsearch
from qsearch import timing
from qsearch.analysis.sensitivity import LayerSensitivity, SensitivityProfile
from qsearch.config import SearchSpace
from qsearch.workflow import early_verdict

from .conftest import make_cnn, write_workload


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
    assert early_verdict(_bench(), _profile(10.0, 12.0, [0.3, -0.3])) == ""  # one layer alone saves 3%
    assert early_verdict(_bench("bitops"), slow) == ""  # speed is not what is asked for
    assert early_verdict(_bench(target="fp16"), slow) == ""


def test_optimize_stops_early_runs_no_trial_and_ships_fp32(tmp_path, monkeypatch):
    """Planted noise far above anything INT8 could save (TIE = 1000%), so the path runs on any CPU."""
    monkeypatch.setattr(timing, "TIE", 10.0)
    cfg = write_workload(tmp_path / "w", make_cnn(), n=96, max_drop="0.05", search=False)
    r = qsearch.optimize(cfg, budget=20, out=tmp_path / "out")
    assert r.status == 0 and all(not c.is_int8 for c in r.plan.layers.values())
    assert r.evaluations < 20  # analysis, naive, the greedy fallback, test scorings: fewer than the 20 trials asked
    study = optuna.load_study(study_name=r.plan.provenance["study"], storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    assert study.trials == []
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Early verdict: no INT8 plan can beat FP32" in report and (tmp_path / "out" / "sensitivity.yaml").is_file()
