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
from qsearch.engine.base import Engine
from qsearch.plan.format import Plan
from qsearch.plan.io import read_plan
from qsearch.report.review import PlanDiff
from qsearch.search.seeds import Strategy
from qsearch.workflow import OptimizeResult

__all__ = ["EvaluationResult", "OptimizeResult", "analyze", "apply", "baseline", "diff", "evaluate", "finetune",
           "optimize", "profile", "show"]

PathLike = str | os.PathLike


def _config(config: PathLike | None) -> str | None:
    return None if config is None else str(config)


def analyze(config: PathLike | None = None, *, out: PathLike = "qsearch-out", samples: int | None = None,
            reverse: bool = False, workers: int = 1, eval_timeout: float | None = None,
            engine: Engine | None = None) -> SensitivityProfile:
    """Per-layer sensitivity (`qsearch analyze`); also written to `out`/sensitivity.yaml/.csv/.png.

    Args:
        config: the workload config (None: the embedded default).
        out: the output folder (its `cache/` keeps the calibration statistics).
        samples: search samples the analysis scores each layer on (None: all).
        reverse: also measure each layer float in an otherwise all-INT8 model.
        workers: processes sharing the analysis.
        eval_timeout: seconds one model evaluation may take (0: no limit).
        engine: where models are scored and timed (`qsearch.engine.Engine`; default ONNX Runtime CPU).
    """
    from qsearch import commands

    return commands.run_analyze(_config(config), Path(out), samples=samples, reverse=reverse,
                                workers=max(1, workers), eval_timeout=eval_timeout, engine=engine)


def optimize(config: PathLike | None = None, *, budget: int = 50, out: PathLike = "qsearch-out",
             timeout: float | None = None, storage: str | optuna.storages.BaseStorage | None = None,
             study: str | None = None, samples: int | None = None, workers: int = 1,
             eval_timeout: float | None = None, sampler: optuna.samplers.BaseSampler | None = None,
             pruner: optuna.pruners.BasePruner | None = None, engine: Engine | None = None,
             strategies: tuple[Strategy, ...] | None = None) -> OptimizeResult:
    """The main job (`qsearch optimize`): analysis, search, the chosen plan, its model and report in
    `out`. The same call on the same `out` resumes the study.

    Args:
        config: the workload config (None: the embedded default).
        budget: finished trials in the study.
        out: the output folder (plan, model, report, study).
        timeout: seconds for the whole command (the final stage keeps its share).
        storage: an Optuna storage URL or object (default: SQLite in `out`).
        study: the study's name (default: derived from everything that defines its trials).
        samples: search samples the analysis scores each layer on.
        workers: processes sharing the analysis.
        eval_timeout: seconds one model evaluation may take (0: no limit).
        sampler, pruner: Optuna's own objects (defaults: the search space's sampler, `BudgetPruner`).
        engine: where models are scored and timed (`qsearch.engine.Engine`; default ONNX Runtime CPU).
        strategies: what measures plans before the sampler (`qsearch.search.seeds.STRATEGIES`).
    """
    from qsearch import workflow

    return workflow.run_optimize(_config(config), Path(out), budget=budget, timeout=timeout, storage=storage,
                                 study=study, samples=samples, workers=max(1, workers), eval_timeout=eval_timeout,
                                 sampler=sampler, pruner=pruner, engine=engine, strategies=strategies)


def apply(plan: Plan | PathLike, model: PathLike, output: PathLike | None = None) -> onnx.ModelProto:
    """The plan's QDQ model (deterministic, no data needed); also written to `output` if given."""
    from qsearch import commands

    return commands.apply_plan(plan, str(model), None if output is None else str(output))


def evaluate(model: PathLike, config: PathLike | None = None, *, out: PathLike = "qsearch-out",
             eval_timeout: float | None = None, engine: Engine | None = None) -> EvaluationResult:
    """Score any ONNX model that takes the workload's data, beside the FP32 model.

    Args:
        model: the ONNX model to score (a qsearch, ORT or any other QDQ model).
        config: the workload config (None: the embedded default).
        out: the output folder (its `cache/` keeps the calibration statistics).
        eval_timeout: seconds one model evaluation may take (0: no limit).
        engine: where the model is scored and timed (default ONNX Runtime CPU).
    """
    from qsearch import commands

    return commands.run_evaluate(str(model), _config(config), Path(out), eval_timeout=eval_timeout, engine=engine)


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


def baseline(kind: str, config: PathLike | None = None, *, output: PathLike = "baseline.yaml",
             out: PathLike = "qsearch-out", method: str = "minmax", granularity: str = "per_tensor",
             eval_timeout: float | None = None, recovery: str = "none") -> Plan:
    """The plan a simpler method ships, scored on test data and written to `output`.

    Args:
        kind: `naive`, `hybrid`, `fp32` or `fp16`.
        config: the workload config (None: the embedded default).
        output: where the plan is written.
        out: the output folder (its `cache/` keeps the calibration statistics).
        method, granularity: the naive plan's calibration method and weight granularity.
        eval_timeout: seconds one model evaluation may take (0: no limit).
        recovery: naive only (`bias`, `cle`, `cle+bias`...): applied where each layer can take it.
    """
    from qsearch import commands

    return commands.run_baseline(kind, _config(config), Path(out), output=str(output), method=method,
                                 granularity=granularity, eval_timeout=eval_timeout, recovery=recovery)


def profile(model: PathLike, config: PathLike | None = None, *, top: int = 15,
            output: PathLike | None = None) -> LatencyProfile:
    """Where the time goes in any ONNX model on the workload's latency batch (`qsearch profile`)."""
    from qsearch import commands

    return commands.run_profile(str(model), _config(config), top, None if output is None else str(output))


def finetune(config: PathLike | None = None, *, plan: Plan | PathLike, out: PathLike = "qsearch-out/finetune",
             epochs: int = 30, lr: float = 1e-3, timeout: float | None = None, loss: str | None = None,
             learn_ranges: bool = True, range_lr: float | None = None, patience: int = 6, seed: int = 0,
             eval_timeout: float | None = None):
    """Quantization-aware training of exactly `plan`'s graph (`qsearch finetune`; needs the `train` extra).
    Writes the fine-tuned float model, its plan, its QDQ model, finetune.yaml and report.md to `out`;
    returns a `qsearch.qat.run.FinetuneResult` (PTQ against QAT on search and test).

    Args:
        config: the workload config (None: the embedded default).
        plan: the plan to fine-tune (a file or a `Plan` of the workload's model).
        out: the output folder.
        epochs, lr: training length and Adam's learning rate for weights and biases.
        timeout: seconds for the whole command; the best checkpoint so far is kept (exit 124 in the CLI).
        loss: 'pkg.module:fn' taking (student outputs, FP32 outputs) as tensors, returning a scalar tensor
            (default: each output's squared error relative to its FP32 power).
        learn_ranges: learn activation ranges (LSQ-style) or keep the plan's (straight-through estimator).
        range_lr: the ranges' learning rate (default: lr).
        patience: epochs without a better search score before stopping early.
        seed: batch order.
        eval_timeout: seconds one model evaluation may take (0: no limit).
    """
    try:
        from qsearch.qat import mirror

        mirror.require()
        from qsearch.qat import run as finetune_run
        from qsearch.qat.train import Settings
    except ImportError as exc:
        from qsearch.errors import QsearchError

        raise QsearchError(f"qsearch finetune needs PyTorch and onnx2torch ({exc.name} is missing): "
                           "pip install 'qsearch[train]'") from None
    settings = Settings(epochs=epochs, lr=lr, range_lr=range_lr, learn_ranges=learn_ranges, patience=patience,
                        seed=seed, loss=loss)
    return finetune_run.run(_config(config), plan if isinstance(plan, Plan) else str(plan), Path(out), settings,
                            timeout=timeout, eval_timeout=eval_timeout)
