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
from dataclasses import dataclass
from pathlib import Path

import onnx

from qsearch.plan import Plan
from qsearch.review import PlanDiff
from qsearch.sensitivity import SensitivityProfile

PathLike = str | os.PathLike


@dataclass(frozen=True)
class OptimizeResult:
    """What `optimize` wrote to `out`: the plan (None when no plan met the budget: `status` 1)."""

    status: int  # 0 a plan was written, 1 no plan (the log says why)
    out: Path
    plan: Plan | None

    @property
    def plan_path(self) -> Path:
        return self.out / "plan.yaml"

    @property
    def model_path(self) -> Path:
        return self.out / "model.qsearch.onnx"

    @property
    def report_path(self) -> Path:
        return self.out / "report.html"


@dataclass(frozen=True)
class EvaluationResult:
    """A model scored with the workload's metric and timed on its latency batch, beside FP32."""

    model: str
    metric: str
    search: float
    test: float
    latency_ms: float
    size_bytes: int
    fp32_test: float
    fp32_latency_ms: float


def _config(config: PathLike | None) -> str | None:
    return None if config is None else str(config)


def analyze(config: PathLike | None = None, out: PathLike = "qsearch-out", samples: int | None = None,
            reverse: bool = False, workers: int = 1, eval_timeout: float | None = None) -> SensitivityProfile:
    """Per-layer sensitivity (proxy SQNR of every option, output noise alone in INT8, measured INT8
    cost); also written to `out`/sensitivity.yaml/.csv/.png."""
    from qsearch import workflow

    return workflow.run_analyze(_config(config), Path(out), samples, reverse, max(1, workers), eval_timeout)


def optimize(config: PathLike | None = None, budget: int = 50, out: PathLike = "qsearch-out",
             timeout: float | None = None, storage: str | None = None, study: str | None = None,
             samples: int | None = None, workers: int = 1, eval_timeout: float | None = None) -> OptimizeResult:
    """The main job (`qsearch optimize`): analysis, search, the chosen plan, its model and report in
    `out`. The same call on the same `out` resumes the study."""
    from qsearch import workflow

    status = workflow.run_optimize(_config(config), Path(out), budget, timeout, storage, study, samples,
                                   max(1, workers), eval_timeout)
    plan = Plan.read(Path(out) / "plan.yaml") if status == 0 else None
    return OptimizeResult(status, Path(out), plan)


def apply(plan: Plan | PathLike, model: PathLike, output: PathLike | None = None) -> onnx.ModelProto:
    """The plan's QDQ model (deterministic, no data needed); also written to `output` if given."""
    from qsearch import workflow

    return workflow.apply_plan(plan, str(model), None if output is None else str(output))


def evaluate(model: PathLike, config: PathLike | None = None, out: PathLike = "qsearch-out",
             eval_timeout: float | None = None) -> EvaluationResult:
    """Score any ONNX model that takes the workload's data, beside the FP32 model."""
    from qsearch import workflow

    r = workflow.run_evaluate(str(model), _config(config), Path(out), eval_timeout)
    return EvaluationResult(**r)


def show(plan: Plan | PathLike, model: PathLike | None = None) -> str:
    """The plan as a table (what `qsearch show` prints); with the model, a partial plan in full."""
    from qsearch import workflow

    return workflow.show_plan(plan, None if model is None else str(model))


def diff(before: Plan | PathLike, after: Plan | PathLike) -> PlanDiff:
    """Per-layer differences between two plans of one model (`qsearch diff`)."""
    from qsearch.review import diff as plan_diff

    a = before if isinstance(before, Plan) else Plan.read(before)
    b = after if isinstance(after, Plan) else Plan.read(after)
    return plan_diff(a, b, (str(before) if not isinstance(before, Plan) else "before",
                            str(after) if not isinstance(after, Plan) else "after"))
