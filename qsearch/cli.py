"""Command line: parse arguments, call the Python API (`api.py`), turn errors into one line and an exit code."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from qsearch._version import __version__
from qsearch.calibration import GRANULARITIES, METHODS
from qsearch.errors import INTERRUPTED, Interrupted, QsearchError
from qsearch.limits import CommandTimeout, EvaluationTimeout
from qsearch.recovery.techniques import recoveries


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qsearch", description="Sensitivity-driven selective INT8 quantization search.")
    p.add_argument("--version", action="version", version=f"qsearch {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _search_commands(sub)
    _model_commands(sub)
    _plan_commands(sub)
    _finetune_command(sub)
    return p


def _common(sp, out_default="qsearch-out", writes_folder=True) -> None:
    """Arguments every command over a workload takes."""
    sp.add_argument("--config", help="workload YAML (default: the embedded digits workload)")
    if writes_folder:
        sp.add_argument("--out", default=out_default, help="output folder (default: %(default)s)")
    else:  # the command's output is -o or stdout; this folder only keeps the calibration cache
        sp.add_argument("--cache", dest="out", default=out_default,
                        help="folder whose cache/ keeps calibration statistics (default: %(default)s)")
        sp.add_argument("--out", dest="out", help=argparse.SUPPRESS)  # the earlier name, still accepted
    sp.add_argument("--eval-timeout", type=float, metavar="SECONDS",
                    help="limit per model evaluation (default: 20x the FP32 model's, at least 60 s; 0: none); "
                         "a trial past it fails and the search goes on")


def _machine_output(sp) -> None:
    sp.add_argument("--json", action="store_true",
                    help="print one JSON object on stdout instead of the tables (keys in the README)")
    sp.add_argument("--quiet", action="store_true", help="no log lines or progress on stderr (errors still print)")


def _search_commands(sub) -> None:
    """analyze and optimize."""
    common = _common
    a = sub.add_parser("analyze", help="per-layer sensitivity, ranked",
                       description="Calibrate once, then measure every candidate layer: its options' proxy SQNR, "
                                   "its output noise alone in INT8, and whether its INT8 form pays (ORT profile). "
                                   "Writes sensitivity.yaml/.csv/.png to --out.",
                       epilog="example: qsearch analyze --config my_model.yaml --out runs/my_model")
    common(a)
    _machine_output(a)
    a.add_argument("--samples", type=int, help="score on the first N search samples only")
    a.add_argument("--reverse", action="store_true", help="also measure all-INT8-but-this-layer (accuracy restored)")
    a.add_argument("--workers", type=int, default=1, help="worker processes for scoring")

    o = sub.add_parser("optimize", help="search the mixed-precision plan (the main job)",
                       description="Analysis, then an Optuna study under the accuracy budget; writes plan.yaml, "
                                   "model.qsearch.onnx, report.md/.html, Pareto plans and trials.csv to --out. "
                                   "Exit 0 result written, 1 no plan (says why), 2 bad input, 124 --timeout, "
                                   "130 interrupted; the same command resumes.",
                       epilog="example: qsearch optimize --config my_model.yaml --budget 50 --out runs/my_model")
    common(o)
    _machine_output(o)
    o.add_argument("--budget", type=int, default=50, help="number of trials (default: %(default)s)")
    o.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="bound the whole command: the search stops early enough to write the result in time")
    o.add_argument("--storage", help="Optuna storage URL (default: sqlite in --out); journal:FILE for a journal file")
    o.add_argument("--study", help="study name (default: derived from the model); same name resumes")
    o.add_argument("--samples", type=int, help="sensitivity analysis on the first N search samples only")
    o.add_argument("--workers", type=int, default=1, help="worker processes for the sensitivity analysis")


def _model_commands(sub) -> None:
    """apply, evaluate, profile: commands that take a model."""
    common = _common

    ap = sub.add_parser("apply", help="apply a plan to a model (no data needed)",
                        description="Rewrite a float ONNX model into the plan's QDQ model, deterministically: the "
                                    "same plan and model always give the same bytes.",
                        epilog="example: qsearch apply qsearch-out/plan.yaml model.onnx -o model.int8.onnx")
    ap.add_argument("plan", help="plan YAML written by optimize or baseline (or edited by hand)")
    ap.add_argument("model", help="the float ONNX model the plan was made for")
    ap.add_argument("-o", "--output", required=True, help="where to write the quantized ONNX model")

    e = sub.add_parser("evaluate", help="score a model on the workload's data: metric, latency, size",
                       description="Score any ONNX model that takes the workload's data (FP32, a qsearch plan's "
                                   "model, another tool's) with the workload's metric on search and test data, "
                                   "and time it.",
                       epilog="example: qsearch evaluate model.int8.onnx --config my_model.yaml")
    e.add_argument("model", help="the ONNX model to score")
    common(e, writes_folder=False)
    _machine_output(e)

    pr = sub.add_parser("profile", help="where the time goes in any ONNX model: ORT's per-node profile by kind, "
                                        "op type and layer (no calibration)",
                        description="Run any ONNX model that takes the workload's data (FP32, a qsearch plan's model, "
                                    "another tool's) on the latency batch under ONNX Runtime's profiler and print "
                                    "milliseconds by kind (int8 kernel, float op, Q/DQ glue), by op type and by layer "
                                    "of the workload's model, with the fusion check.",
                        epilog="example: qsearch profile qsearch-out/model.qsearch.onnx --config my_model.yaml -o layers.csv")
    pr.add_argument("model", help="the ONNX model to profile")
    pr.add_argument("--config", help="workload YAML: its data and model's layers (default: the embedded digits workload)")
    pr.add_argument("--top", type=int, default=15, help="rows per table (default: %(default)s)")
    pr.add_argument("-o", "--output", help="also write every layer's times as CSV")


def _plan_commands(sub) -> None:
    """show, diff, baseline: commands about plans."""
    common = _common

    sh = sub.add_parser("show", help="a plan as a table: every layer's precision, calibration, granularity, why",
                        description="Print a plan for review: model, scores and provenance, then one row per layer "
                                    "in graph order. With --model, a partial or schema-1 plan is listed in full "
                                    "(and checked against the model).",
                        epilog="example: qsearch show qsearch-out/plan.yaml")
    sh.add_argument("plan", help="plan YAML")
    sh.add_argument("--model", help="the float ONNX model: list every layer of a partial plan, check the plan fits")

    df = sub.add_parser("diff", help="what changed between two plans, per layer (exit 0 same, 1 different)",
                        description="Compare two plans of one model: plan-wide settings, then each layer whose "
                                    "option or INT8 ranges differ. Exit 0 when they are the same, 1 when not.",
                        epilog="example: qsearch diff main/plan.yaml branch/plan.yaml")
    df.add_argument("before", help="plan YAML (e.g. the reviewed one)")
    df.add_argument("after", help="plan YAML (e.g. the proposed one)")

    b = sub.add_parser("baseline", help="write a baseline plan: naive all-INT8, fp32/fp16, or hybrid (greedy)",
                       description="Write the plan a simpler method would ship, scored on test data, to compare "
                                   "with optimize's or to start from; -o is the plan file.",
                       epilog="example: qsearch baseline naive --config my_model.yaml -o naive.yaml")
    b.add_argument("kind", choices=["naive", "hybrid", "fp32", "fp16"],
                   help="naive: every candidate INT8 with one method; hybrid: the greedy fallback (reverts the "
                        "most sensitive layers until the budget holds); fp32/fp16: no INT8")
    common(b, writes_folder=False)
    b.add_argument("-o", "--output", required=True, help="where to write the plan YAML")
    b.add_argument("--calibration", choices=METHODS, default="minmax", help="activation ranges (default: %(default)s)")
    b.add_argument("--granularity", choices=GRANULARITIES, default="per_tensor",
                   help="weight scales (default: %(default)s)")
    b.add_argument("--recovery", choices=recoveries(), default="none",
                   help="naive only: cross-layer equalization (cle) or smoothing (smooth, MinMax only), and/or "
                        "bias correction, where each layer can take it (default: %(default)s)")


def _finetune_command(sub) -> None:
    f = sub.add_parser("finetune", help="quantization-aware training of exactly one plan (needs the train extra)",
                       description="Mirror the plan's own graph in PyTorch with fake quantization exactly where the "
                                   "plan's Q/DQ go, distil from the FP32 model on the calibration and search inputs, "
                                   "stop early on the search metric of the exported QDQ model, and write the "
                                   "fine-tuned float model, its plan and QDQ model, and a PTQ-vs-QAT report to --out. "
                                   "Exit 0 done, 2 bad input, 124 --timeout, 130 interrupted (both keep the best "
                                   "checkpoint).",
                       epilog="example: qsearch finetune --config my_model.yaml --plan runs/my_model/plan.yaml "
                              "--out runs/qat --epochs 10")
    _common(f, out_default="qsearch-out/finetune")
    f.add_argument("--plan", required=True, help="the plan to fine-tune (optimize's, a baseline's, a Pareto plan)")
    f.add_argument("--epochs", type=int, default=30, help="passes over the calibration and search inputs "
                                                          "(default: %(default)s)")
    f.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (default: %(default)s)")
    f.add_argument("--timeout", type=float, metavar="SECONDS", help="bound the whole command (keeps the best so far)")
    f.add_argument("--loss", metavar="PKG.MODULE:FN", help="your loss: fn(student_outputs, fp32_outputs) -> scalar "
                                                            "tensor (default: relative squared error per output)")
    f.add_argument("--fixed-ranges", action="store_true",
                   help="keep the plan's activation ranges (default: learn them, LSQ-style)")


def _interrupt(signum, frame):
    """Raise at once where it is safe; inside a GC callback the raise is swallowed (the hook in
    main() keeps it quiet) and the search stops at its next check of INTERRUPTED instead."""
    INTERRUPTED.set()
    raise KeyboardInterrupt  # SIGTERM (a scheduler's kill) takes the same clean path as Ctrl-C


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if threading.current_thread() is not threading.main_thread():
        return _main(args)
    INTERRUPTED.clear()
    # SQLAlchemy logs a traceback when an interrupted connection goes back to its pool; the
    # one-line "interrupted" message is what the user needs
    logging.getLogger("sqlalchemy.pool").setLevel(logging.CRITICAL)
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    hook = sys.unraisablehook
    # an interrupt or a time limit that lands inside a GC callback is swallowed there (and fires again);
    # the user needs no "Exception ignored" trace for it
    quiet = (KeyboardInterrupt, CommandTimeout, EvaluationTimeout)
    sys.unraisablehook = lambda u: None if isinstance(u.exc_value, quiet) else hook(u)
    # once interrupted, a background thread's failure (Optuna's heartbeat thread finding its storage
    # session cut mid-commit) is a consequence of stopping, not news: no thread traceback then
    thread_hook = threading.excepthook
    threading.excepthook = lambda a: None if INTERRUPTED.is_set() else thread_hook(a)
    try:
        return _main(args)
    except BrokenPipeError:  # `qsearch show plan.yaml | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush there
        return 1
    finally:
        sys.unraisablehook = hook
        threading.excepthook = thread_hook
        for s, h in previous.items():
            signal.signal(s, h)


def _run_reporting(args, out: Path) -> int | None:
    """analyze, optimize, evaluate: tables for a person, or with --json one object for a program."""
    import dataclasses
    import json

    from qsearch import api
    from qsearch.progress import output

    with output(quiet=args.quiet, stdout=not args.json):
        if args.command == "analyze":
            p = api.analyze(args.config, out=out, samples=args.samples, reverse=args.reverse, workers=args.workers,
                            eval_timeout=args.eval_timeout)
            result, code = {"model": p.model, "metric": p.metric, "fp32_score": p.fp32_score, "samples": p.samples,
                            "layers": len(p.layers), "int8_pays": sum(x.gain_ms > 0 for x in p.layers),
                            "most_sensitive": [x.name for x in p.layers[:5]],
                            "evaluations": p.meta.get("evaluations"), "seconds": p.seconds,
                            "paths": {k: str(out / f"sensitivity.{k}") for k in ("yaml", "csv", "png")}}, 0
        elif args.command == "optimize":
            r = api.optimize(args.config, budget=args.budget, out=out, timeout=args.timeout, storage=args.storage,
                             study=args.study, samples=args.samples, workers=args.workers,
                             eval_timeout=args.eval_timeout)
            result, code = r.to_json(), r.status
        else:
            evaluated = api.evaluate(args.model, args.config, out=out, eval_timeout=args.eval_timeout)
            result, code = dataclasses.asdict(evaluated), 0
    if args.json:
        print(json.dumps(result, default=str))
    return code


def _main(args) -> int:
    from qsearch import api

    try:
        out = Path(getattr(args, "out", "qsearch-out"))
        if args.command in ("analyze", "optimize", "evaluate"):
            return _run_reporting(args, out)
        if args.command == "apply":
            api.apply(args.plan, args.model, args.output)
            return 0
        if args.command == "show":
            print(api.show(args.plan, args.model))
            return 0
        if args.command == "diff":
            from qsearch.report.review import diff_text

            d = api.diff(args.before, args.after)
            print(diff_text(d, (args.before, args.after)))
            return 0 if d.same else 1
        if args.command == "finetune":
            r = api.finetune(args.config, plan=args.plan, out=out, epochs=args.epochs, lr=args.lr,
                             timeout=args.timeout, loss=args.loss, learn_ranges=not args.fixed_ranges,
                             eval_timeout=args.eval_timeout)
            print(f"PTQ test {r.ptq_test:.4f} -> QAT test {r.qat_test:.4f} (fp32 {r.fp32_test:.4f}); best epoch "
                  f"{r.history.best.epoch} ({r.history.stopped}); {r.seconds / 60:.1f} min; wrote {out / 'plan.yaml'}, "
                  f"{out / 'model.qsearch.onnx'}, {out / 'report.md'}")
            return 0
        if args.command == "profile":
            api.profile(args.model, args.config, top=args.top, output=args.output)
            return 0
        if args.command == "baseline":
            api.baseline(args.kind, args.config, output=args.output, out=out, method=args.calibration,
                         granularity=args.granularity, eval_timeout=args.eval_timeout, recovery=args.recovery)
            return 0
    except QsearchError as exc:
        print(f"qsearch: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except EvaluationTimeout as exc:  # outside a trial (a trial's timeout fails only that trial)
        print(f"qsearch: error: {exc}", file=sys.stderr)
        return 2
    except CommandTimeout as exc:
        print(f"qsearch: timeout: {exc}", file=sys.stderr)
        return 124
    except Interrupted as exc:
        return _interrupted(exc.kept)
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as exc:
        if INTERRUPTED.is_set():  # a library wrapped the KeyboardInterrupt in its own error
            return _interrupted()
        if _storage_failure(exc):
            print(f"qsearch: error: the study's storage failed ({_first_line(exc)}); a damaged study.db? "
                  "move it away (its trials are lost) or pick another --out/--storage", file=sys.stderr)
            return 2
        raise
    return 0


def _storage_failure(exc: BaseException) -> bool:
    """An error of the study's database (a garbled SQLite page, a server gone), from Optuna or
    SQLAlchemy, wherever in the run it surfaced."""
    import optuna

    chain = [exc, exc.__cause__, exc.__context__]
    return any(isinstance(e, optuna.exceptions.StorageInternalError)
               or type(e).__module__.split(".")[0] in ("sqlalchemy", "sqlite3") for e in chain if e is not None)


def _first_line(exc: BaseException) -> str:
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    text = str(root).strip().splitlines()
    return f"{type(root).__name__}: {text[0] if text else ''}"[:200]


def _interrupted(kept: str = "nothing was written") -> int:
    print(f"qsearch: interrupted; {kept}", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
