"""The Python API: the stages the command line runs, for notebooks and scripts. Each function
takes what the matching command takes and returns the frozen dataclasses the pipeline passes
between stages; bad input raises `QsearchError` (the CLI turns it into one line and exit 2).

    import qsearch
    result = qsearch.optimize("my_model.yaml", budget=50, out="runs/my_model")
    print(qsearch.show(result.plan))
    model = qsearch.apply(result.plan, "model.onnx")
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import optuna

from qsearch.analysis.profiling import LatencyProfile
from qsearch.analysis.sensitivity import SensitivityProfile
from qsearch.commands import EvaluationResult
from qsearch.plan.format import Plan
from qsearch.plan.io import read_plan
from qsearch.report.review import PlanDiff
from qsearch.workflow import OptimizeResult

__all__ = ["EvaluationResult", "OptimizeResult", "analyze", "apply", "baseline", "diff", "evaluate", "optimize",
           "profile", "show"]

PathLike = str | os.PathLike


def _config(config: PathLike | None) -> str | None:
    return None if config is None else str(config)


def analyze(config: PathLike | None = None, out: PathLike = "qsearch-out", samples: int | None = None,
            reverse: bool = False, workers: int = 1, eval_timeout: float | None = None) -> SensitivityProfile:
    """Per-layer sensitivity (proxy SQNR of every option, output noise alone in INT8, measured INT8
    cost); also written to `out`/sensitivity.yaml/.csv/.png."""
    from qsearch import commands

    return commands.run_analyze(_config(config), Path(out), samples, reverse, max(1, workers), eval_timeout)


def optimize(config: PathLike | None = None, budget: int = 50, out: PathLike = "qsearch-out",
             timeout: float | None = None, storage: str | None = None, study: str | None = None,
             samples: int | None = None, workers: int = 1, eval_timeout: float | None = None,
             sampler: optuna.samplers.BaseSampler | None = None,
             pruner: optuna.pruners.BasePruner | None = None) -> OptimizeResult:
    """The main job (`qsearch optimize`): analysis, search, the chosen plan, its model and report in
    `out`. The same call on the same `out` resumes the study. `storage` is an Optuna storage URL or
    object; `sampler` and `pruner` are Optuna's own (defaults: the search space's sampler, and
    `study.BudgetPruner`)."""
    from qsearch import workflow

    return workflow.run_optimize(_config(config), Path(out), budget, timeout, storage, study, samples,
                                 max(1, workers), eval_timeout, sampler, pruner)


def apply(plan: Plan | PathLike, model: PathLike, output: PathLike | None = None) -> onnx.ModelProto:
    """The plan's QDQ model (deterministic, no data needed); also written to `output` if given."""
    from qsearch import commands

    return commands.apply_plan(plan, str(model), None if output is None else str(output))


def evaluate(model: PathLike, config: PathLike | None = None, out: PathLike = "qsearch-out",
             eval_timeout: float | None = None) -> EvaluationResult:
    """Score any ONNX model that takes the workload's data, beside the FP32 model."""
    from qsearch import commands

    return commands.run_evaluate(str(model), _config(config), Path(out), eval_timeout)


def show(plan: Plan | PathLike, model: PathLike | None = None) -> str:
    """The plan as a table (what `qsearch show` prints); with the model, a partial plan in full."""
    from qsearch import commands

    return commands.show_plan(plan, None if model is None else str(model))


def diff(before: Plan | PathLike, after: Plan | PathLike) -> PlanDiff:
    """Per-layer differences between two plans of one model (`qsearch diff`)."""
    from qsearch.report.review import diff as plan_diff

    a = before if isinstance(before, Plan) else read_plan(before)
    b = after if isinstance(after, Plan) else read_plan(after)
    return plan_diff(a, b, (str(before) if not isinstance(before, Plan) else "before",
                            str(after) if not isinstance(after, Plan) else "after"))


def baseline(kind: str, config: PathLike | None = None, output: PathLike = "baseline.yaml",
             out: PathLike = "qsearch-out", method: str = "minmax", granularity: str = "per_tensor",
             eval_timeout: float | None = None, recovery: str = "none") -> Plan:
    """The plan a simpler method ships (`naive`, `hybrid`, `fp32`, `fp16`), scored on test data and
    written to `output`; `out` keeps the calibration cache. `recovery` (naive only: `bias`, `cle`,
    `cle+bias`): where each layer can take it."""
    from qsearch import commands

    return commands.run_baseline(kind, _config(config), Path(out), str(output), method, granularity, eval_timeout,
                                 recovery)


def profile(model: PathLike, config: PathLike | None = None, top: int = 15, output: PathLike | None = None) -> LatencyProfile:
    """Where the time goes in any ONNX model on the workload's latency batch (`qsearch profile`)."""
    from qsearch import commands

    return commands.run_profile(str(model), _config(config), top, None if output is None else str(output))
