"""Where new things plug in, exercised through the seams without editing a stage module: a toy
engine that wraps ONNX Runtime and counts its calls, a toy recovery technique (weight clipping),
and a toy search strategy, each through `qsearch.optimize` on a small workload."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import optuna
import pytest

import qsearch
from qsearch.analysis.sensitivity import SensitivityProfile
from qsearch.engine import OrtCpu
from qsearch.errors import ConfigError, DataError, ModelError, PlanError, QsearchError
from qsearch.plan.io import read_plan
from qsearch.recovery import techniques
from qsearch.search.seeds import STRATEGIES

from .conftest import make_cnn, write_workload
from .test_seeds import float_doubling


class CountingEngine(OrtCpu):
    """ONNX Runtime, counting what the stages ask of it."""

    name = "counting"

    def __init__(self, threads: int = 1):
        super().__init__(threads)
        self.calls = {"session": 0, "time": 0, "profile": 0}

    def session(self, model):
        self.calls["session"] += 1
        return super().session(model)

    def time(self, session, feed, warmup=3, repeat=15):
        self.calls["time"] += 1
        return super().time(session, feed, warmup, repeat)

    def profile(self, model, feed, runs=5, warmup=2):
        self.calls["profile"] += 1
        return super().profile(model, feed, runs, warmup)


def test_a_toy_engine_scores_times_and_profiles_every_model(workload, tmp_path):
    engine = CountingEngine()
    r = qsearch.optimize(workload, budget=3, out=tmp_path / "out", engine=engine)
    assert r.status == 0 and r.plan is not None
    assert engine.calls["profile"] >= 2  # the analysis's FP32 and all-INT8 profiles
    assert engine.calls["time"] >= 3  # FP32, the trials, the final stage
    # every trial's session came through it: at least one per finished trial
    study = optuna.load_study(study_name=read_plan(r.plan_path).provenance["study"],
                              storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    assert engine.calls["session"] >= len(study.trials)
    before = dict(engine.calls)
    e = qsearch.evaluate(r.model_path, workload, out=tmp_path / "eval", engine=engine)
    assert e.search == r.plan.metrics["plan"]["search"] and engine.calls["session"] > before["session"]


def _clip(layer, w: np.ndarray) -> np.ndarray:
    """Weight clipping at the 99th percentile of |w|: a data-free technique in a few lines."""
    bound = float(np.quantile(np.abs(w), 0.99))
    return np.clip(w, -bound, bound).astype(np.float32)


@pytest.fixture
def wclip():
    t = techniques.register(techniques.Technique("wclip", 4, "weights clipped at their 99th percentile",
                                                 weight=_clip))
    yield t
    techniques.unregister("wclip")


def test_a_toy_recovery_technique_is_searched_applied_and_checked(wclip, tmp_path):
    """Registered once: the search space may allow it, the analysis ranks it per layer, plans
    carry it, and the rewriter applies it (the model differs from plain int8)."""
    cfg = write_workload(tmp_path / "w", make_cnn(outlier_layer="conv_b"), n=96, max_drop="0.5",
                         extra="search_space: {recovery: [wclip], calibration: [minmax]}\n")
    assert "wclip" in techniques.recoveries()
    r = qsearch.optimize(cfg, budget=3, out=tmp_path / "out")
    prof = SensitivityProfile.from_yaml((tmp_path / "out" / "sensitivity.yaml").read_text())
    for x in prof.layers:  # ranked beside the plain options where a layer has weights, never elsewhere
        clipped = [k for k in x.proxy_sqnr if k.endswith("/wclip")]
        assert bool(clipped) == x.name.startswith(("conv", "fc")), (x.name, sorted(x.proxy_sqnr))
        assert all(math.isfinite(x.proxy_sqnr[k]) for k in clipped)
    columns = next(csv.reader(io.StringIO((tmp_path / "out" / "sensitivity.csv").read_text())))
    assert "sqnr_db[int8/minmax/per_channel/wclip]" in columns  # the reviewer's table shows it too
    assert r.status == 0
    from dataclasses import replace

    plan = qsearch.baseline("naive", cfg, output=tmp_path / "naive.yaml", out=tmp_path / "out")
    weighted = next(n for n, c in plan.layers.items() if c.quantized and n.startswith("conv"))
    clipped = replace(plan, layers={**plan.layers, weighted: replace(plan.layers[weighted], recovery="wclip")})
    plain = replace(plan, layers={**plan.layers, weighted: replace(plan.layers[weighted], recovery="none")})
    model = str(tmp_path / "w" / "model.onnx")
    a, b = qsearch.apply(clipped, model), qsearch.apply(plain, model)
    assert a.SerializeToString() != b.SerializeToString()
    add = next(n for n, c in plan.layers.items() if n.startswith("add"))  # no weight: refused in one line
    bad = replace(plan, layers={**plan.layers, add: qsearch.plan.LayerChoice("int8", recovery="wclip")})
    with pytest.raises(PlanError, match=f"layer '{add}' .* asks for recovery wclip"):
        qsearch.apply(bad, model)


def test_a_toy_strategy_runs_before_the_sampler(workload, tmp_path):
    r = qsearch.optimize(workload, budget=4, out=tmp_path / "out", strategies=(float_doubling, *(s for s in STRATEGIES if s.__name__ in ("neighbours", "knapsacks"))))
    study = optuna.load_study(study_name=read_plan(r.plan_path).provenance["study"],
                              storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    mine = [t for t in study.trials if t.user_attrs.get("strategy") == "float_doubling"]
    assert mine and not any(t.user_attrs.get("strategy") == "closed_loop" for t in study.trials)


def test_error_classes_tell_the_stage_apart(tmp_path):
    """API callers can catch by kind; each is still a QsearchError with exit code 2."""
    bad_config = tmp_path / "c.yaml"
    bad_config.write_text("name: x\nmodel: m.onnx\nnonsense: 1\n")
    with pytest.raises(ConfigError):
        qsearch.optimize(bad_config, budget=1, out=tmp_path / "o")
    (tmp_path / "p.yaml").write_text("qsearch_plan: 99\n")
    with pytest.raises(PlanError):
        qsearch.show(tmp_path / "p.yaml")
    (tmp_path / "m.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelError):
        qsearch.profile(tmp_path / "m.onnx")
    for cls in (ConfigError, DataError, ModelError, PlanError):
        assert issubclass(cls, QsearchError) and cls.exit_code == 2
