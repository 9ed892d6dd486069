"""`qsearch finetune`: quantization-aware training of exactly one plan's graph. Checks everything
before training (the plan is this model's, the ops can be mirrored, a user's loss returns a
scalar), trains (`train`), writes the best checkpoint's float model, plan and QDQ model whenever it
improves (an interrupt or a time limit keeps them), then scores PTQ and QAT on test side by side."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qsearch.errors import Interrupted, QsearchError
from qsearch.evaluator import Evaluator
from qsearch.files import atomic_write_bytes, atomic_write_text
from qsearch.limits import CommandTimeout
from qsearch.plan.check import check_plan
from qsearch.plan.format import Plan
from qsearch.plan.io import read_plan
from qsearch.progress import Progress, log
from qsearch.qat import mirror as mirrors
from qsearch.qat.export import Checkpoint, Exported, export
from qsearch.qat.train import History, Settings, Trainer, check_settings
from qsearch.scoring import reference_outputs

FLOAT_FILE, QDQ_FILE, PLAN_FILE = "model.finetuned.onnx", "model.qsearch.onnx", "plan.yaml"


@dataclass(frozen=True, kw_only=True)
class FinetuneResult:
    """PTQ (the plan as given) against QAT (the fine-tuned plan) on the same layers."""

    plan: Plan
    out: Path
    fp32_search: float
    fp32_test: float
    ptq_search: float
    ptq_test: float
    qat_search: float
    qat_test: float
    ptq_latency_ms: float
    qat_latency_ms: float
    history: History
    seconds: float
    evaluations: int


def run(config: str | None, plan_path: str | Plan, out: Path, settings: Settings, *, timeout: float | None = None,
        eval_timeout: float | None = None) -> FinetuneResult:
    from qsearch.commands import check_eval_timeout, open_bench

    t0 = time.perf_counter()
    check_settings(settings)
    check_eval_timeout(eval_timeout)
    if timeout is not None and not timeout > 0:
        raise QsearchError(f"--timeout must be > 0 seconds, got {timeout!r}")
    where = "plan" if isinstance(plan_path, Plan) else str(plan_path)
    plan = plan_path if isinstance(plan_path, Plan) else read_plan(where)
    wide = next((n for n, c in plan.layers.items() if c.precision == "int16"), None)
    if wide is not None:  # before anything is written
        raise QsearchError(f"{where}: layer '{wide}' is int16: finetune trains INT8 layers only (16-bit activations "
                           "are not mirrored in training yet); make it int8 or float in the plan")
    bench = open_bench(config, out, eval_timeout, calibrate=False)
    check_plan(plan, bench.prepared, where)
    if not any(plan.choice(la.name).quantized for la in bench.prepared.layers):
        raise QsearchError(f"{where}: the plan has no INT8 layer: there is nothing to fine-tune")
    tg = bench.rewriter.training_graph(plan)
    mirror = mirrors.build(tg, bench.prepared, settings.learn_ranges)
    fp32 = bench.engine.session(bench.prepared.proto)
    batches = [*bench.calib_data.batches, *bench.search_data.batches]
    teacher = [*reference_outputs(fp32, bench.calib_data), *reference_outputs(fp32, bench.search_data)]
    trainer = Trainer(mirror, batches, teacher, settings)  # (a user's loss is checked by its first pass,
    # `Trainer.run`'s epoch 0, before anything is written)
    evaluator = Evaluator(bench)
    ptq_search = evaluator.evaluate(plan, "search", timing=False).score
    exports: dict[int, Exported] = {}

    def score(ck: Checkpoint) -> float:
        exports[ck.epoch] = export(bench.prepared, tg, ck, plan, settings.as_dict(), FLOAT_FILE)
        return evaluator.evaluate(exports[ck.epoch].qdq, "search", timing=False).score

    def on_best(ck: Checkpoint, _score: float) -> None:
        _write(out, exports[ck.epoch])
        for e in [e for e in exports if e != ck.epoch]:
            del exports[e]

    deadline = None if timeout is None else time.monotonic() + timeout
    history = trainer.run(score, on_best, Progress("finetune"), deadline=deadline, log=log)
    best = exports[history.best.epoch]
    kept = f"kept the best checkpoint (epoch {history.best.epoch}) in {out / PLAN_FILE}, {out / FLOAT_FILE}"
    if history.stopped == "interrupted":
        raise Interrupted(kept)
    if history.stopped == "nan loss":
        log(f"the training loss became NaN; stopped and {kept}")
    result = _compare(bench, evaluator, plan, ptq_search, best, history, out, t0)
    from qsearch.report.finetune import write_report

    write_report(result, out)
    if history.stopped == "timeout":
        raise CommandTimeout(f"--timeout {timeout:g} s reached; {kept}")
    return result


def _write(out: Path, ex: Exported) -> None:
    """Float model, then QDQ model, then the plan naming them (by fingerprint) last."""
    atomic_write_bytes(out / FLOAT_FILE, ex.float_model.SerializeToString())
    atomic_write_bytes(out / QDQ_FILE, ex.qdq.SerializeToString())
    ex.plan.write(out / PLAN_FILE)


def _compare(bench, evaluator: Evaluator, plan: Plan, ptq_search: float, best: Exported, history: History,
             out: Path, t0: float) -> FinetuneResult:
    ptq = evaluator.evaluate(plan, "test")
    qat = evaluator.evaluate(best.qdq, "test")
    fp32_test = evaluator.fp32_test()
    best_search = next(e.search for e in history.epochs if e.epoch == history.best.epoch)
    final = best.plan.with_info({"test": qat.score, "latency_ms": qat.latency_ms, "fp32_test": fp32_test,
                                 "search": best_search})
    final.write(out / PLAN_FILE)
    summary = {"fp32": {"search": bench.baseline.fp32_search, "test": fp32_test},
               "ptq": {"search": ptq_search, "test": ptq.score, "latency_ms": ptq.latency_ms},
               "qat": {"search": final.metrics["search"], "test": qat.score, "latency_ms": qat.latency_ms,
                       "epoch": history.best.epoch},
               "stopped": history.stopped,
               "epochs": [{"epoch": e.epoch, "loss": _finite(e.loss), "search": e.search, "seconds": e.seconds}
                          for e in history.epochs]}
    import yaml

    atomic_write_text(out / "finetune.yaml", yaml.safe_dump(summary, sort_keys=False))
    return FinetuneResult(plan=final, out=out, fp32_search=bench.baseline.fp32_search, fp32_test=fp32_test,
                          ptq_search=ptq_search, ptq_test=ptq.score, qat_search=final.metrics["search"],
                          qat_test=qat.score, ptq_latency_ms=ptq.latency_ms, qat_latency_ms=qat.latency_ms,
                          history=history, seconds=time.perf_counter() - t0, evaluations=evaluator.evaluations)


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None
