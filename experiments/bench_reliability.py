"""Reliability in numbers: interrupted searches, several workers on one study, bad inputs, fuzzing.

Kills and resumes real `qsearch optimize` runs on the embedded default workload, runs two workers
on one SQLite study and on one journal file, and runs the bad-input and hypothesis test suites
(fuzz examples from QSEARCH_FUZZ_EXAMPLES, default 300 here). Writes reliability.md.

    python experiments/bench_reliability.py [--budget 30]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def require() -> None:
    import importlib.util

    missing = [m for m in ("qsearch", "optuna", "pytest", "hypothesis") if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"error: bench_reliability.py needs {', '.join(missing)}: pip install -c constraints.txt -e \".[test]\"")


def optimize(out: Path, budget: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qsearch", "optimize", "--budget", str(budget), "--out", str(out),
                             *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def trials(storage) -> list:
    import optuna

    # the search study; the others hold the analysis jobs (-analysis, -analysis-proxy, -analysis-profile)
    names = [n for n in optuna.get_all_study_names(storage) if "-analysis" not in n]
    return optuna.load_study(study_name=names[0], storage=storage).get_trials(deepcopy=False) if names else []


def finished(ts) -> list:
    return [t for t in ts if t.state.name in ("COMPLETE", "PRUNED")]


def kill_and_resume(sig: signal.Signals, budget: int, after: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        url = f"sqlite:///{out / 'study.db'}"
        p = optimize(out, budget)
        while True:
            time.sleep(0.01)
            if p.poll() is not None:
                raise SystemExit(f"the run ended before it could be interrupted: {p.stderr.read()[-300:]}")
            try:
                ts = trials(url) if (out / "study.db").exists() else []
            except Exception:
                continue
            if len(finished(ts)) >= after and any(t.state.name == "RUNNING" and t.params for t in ts):
                break
        p.send_signal(sig)
        p.communicate(timeout=120)
        before = {t.number: (t.state, t.values) for t in finished(trials(url))}
        lost = [t for t in trials(url) if t.state.name in ("RUNNING", "FAIL")]
        n_layers = max(len(t.params) for t in finished(trials(url)))
        with_plan = sum(len(t.system_attrs.get("fixed_params") or t.params) == n_layers for t in lost)
        t0 = time.perf_counter()
        p = optimize(out, budget)
        _, err = p.communicate(timeout=600)
        ts = trials(url)
        after_map = {t.number: (t.state, t.values) for t in finished(ts)}
        kept = sum(after_map.get(n) == v for n, v in before.items())
        retried = sum(1 for t in ts if t.user_attrs.get("retry_of") in {x.number for x in lost})
        return {"signal": sig.name, "exit": p.returncode, "finished_before": len(before), "kept": kept,
                "lost": len(lost), "with_plan": with_plan, "retried": retried, "finished_after": len(after_map), "budget": budget,
                "resume_s": time.perf_counter() - t0, "plan": (out / "plan.yaml").is_file()}


def workers(kind: str, n: int, budget: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        extra, storage = [], f"sqlite:///{out / 'study.db'}"
        if kind == "journal":
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend

            path = str(Path(tmp) / "study.journal")
            extra = ["--storage", f"journal:{path}"]
        t0 = time.perf_counter()
        procs = [optimize(out, budget, *extra) for _ in range(n)]
        codes = [p.wait(timeout=900) for p in procs]
        wall = time.perf_counter() - t0
        if kind == "journal":
            storage = JournalStorage(JournalFileBackend(path))
        ts = trials(storage)
        fin = finished(ts)
        warm = [tuple(sorted(t.params.items())) for t in ts if t.system_attrs.get("fixed_params")]
        return {"storage": kind, "workers": n, "exit": codes, "budget": budget, "finished": len(fin),
                "unique": len({t.number for t in ts}) == len(ts), "left_running": sum(t.state.name == "RUNNING" for t in ts),
                "warm_dupes": len(warm) - len(set(warm)), "wall_s": wall}


def pytest_count(expr: str, env: dict | None = None) -> tuple[int, int, float]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *shlex.split(expr)], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, **(env or {})})
    passed = int(m.group(1)) if (m := re.search(r"(\d+) passed", r.stdout)) else 0
    failed = int(m.group(1)) if (m := re.search(r"(\d+) failed", r.stdout)) else 0
    return passed, failed, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=30)
    ap.add_argument("--fuzz", type=int, default=300, help="hypothesis examples for the rewriter property test")
    args = ap.parse_args()
    require()
    lines = [f"# Reliability ({date.today()}, {platform.machine()}, {os.cpu_count()} cores)", "",
             "## Interrupted `qsearch optimize` (default workload), then the same command again", "",
             "| signal | resume exit | finished before | kept after resume | lost in flight (with a whole plan) | "
             "plan re-run | finished after | budget | plan written | resume s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|:-:|---:|"]
    # single worker baseline for the multi-worker speed-up
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        r = kill_and_resume(sig, args.budget, after=8)
        lines.append(f"| {r['signal']} | {r['exit']} | {r['finished_before']} | {r['kept']} | {r['lost']} ({r['with_plan']}) | "
                     f"{r['retried']} | "
                     f"{r['finished_after']} | {r['budget']} | {'yes' if r['plan'] else 'no'} | {r['resume_s']:.1f} |")
    lines += ["", "A trial interrupted before its sampler had drawn every layer holds nothing to re-run; one with a "
              "whole plan (sampled, or enqueued by the warm start) is re-run once with the same plan."]
    lines += ["", "## Several workers on one study (default workload; each worker also runs its own analysis)", "",
              "| storage | workers | exit codes | budget | finished trials | numbers unique | left RUNNING | duplicated warm-start plans | wall s |",
              "|---|---:|---|---:|---:|:-:|---:|---:|---:|"]
    for kind, n in (("sqlite", 1), ("sqlite", 2), ("journal", 2)):
        r = workers(kind, n, args.budget)
        lines.append(f"| {r['storage']} | {r['workers']} | {r['exit']} | {r['budget']} | {r['finished']} | "
                     f"{'yes' if r['unique'] else 'NO'} | {r['left_running']} | {r['warm_dupes']} | {r['wall_s']:.1f} |")
    lines += ["", "## Bad inputs and fuzzing (the test suites, run here)", "", "| suite | cases passed | failed | s |",
              "|---|---:|---:|---:|"]
    for name, expr, env in (
        ("bad inputs (CLI: models, configs, plans, data, entry points, output paths, storage)",
         "tests/test_plan_and_cli.py -k bad", None),
        ("hostile inputs (YAML alias bombs, endless/empty data, labels vs outputs, plan field types, huge "
         "ranges, outputs over inputs, empty --out)", "tests/test_hostile_inputs.py", None),
        ("golden fusion per pattern vs ORT's quantizer (tests/test_patterns.py)", "tests/test_patterns.py", None),
        ("valid models that once broke (If/Loop reading outer tensors, IR 3 initializers as inputs, symbolic "
         "H/W MACs)", "tests/test_valid_models.py", None),
        ("limits and outputs (hung metric, --timeout bound, interrupted final stage, output set, garbled or foreign "
         "study before analysis, SIGTERM with --workers, evaluate on a mismatched model, non-finite activations)",
         "tests/test_limits_and_outputs.py", None),
        (f"rewriter fuzzing (hypothesis, {args.fuzz} random graphs x random plans)",
         "tests/test_rewrite.py -k random", {"QSEARCH_FUZZ_EXAMPLES": str(args.fuzz)}),
        ("interruption and workers, each ending in the same result semantics (tests/test_reliability.py)",
         "tests/test_reliability.py", None),
        ("accuracy recovery: hand-computed values, the equalized model (hypothesis), the sidecar round trip, bad "
         "recovery input (tests/test_recovery.py)", "tests/test_recovery.py", None),
        ("the YAML reader against safe_load (hypothesis) and its refusals (tests/test_yamlread.py)",
         "tests/test_yamlread.py", None),
        ("PyTorch factories: export, cache, bf16 / fp16 widened and said, meta refused, extra state, export "
         "failures (tests/test_torch_input.py)", "tests/test_torch_input.py", None),
        (f"recovery on random graphs: every option of every layer valid, runs, all-float bit-identical, probe = "
         f"final rewrite (hypothesis, {args.fuzz} graphs; tests/test_recovery_properties.py)",
         "tests/test_recovery_properties.py", {"QSEARCH_FUZZ_EXAMPLES": str(args.fuzz)}),
        ("FP16 target with both hardswish forms, optimize / apply / evaluate (tests/test_fp16_hardswish.py)",
         "tests/test_fp16_hardswish.py", None),
        ("this round's inputs: ceiling stop, weight encodings, int8 path, heartbeats, displayed plan figures "
         "(tests/test_hostile_inputs.py -k round, tests/test_api_and_review.py -k 'suspicion or typed')",
         "tests/test_hostile_inputs.py tests/test_api_and_review.py -k 'round or suspicion or typed or unknown_int8'",
         None),
    ):
        p, f, s = pytest_count(expr, env)
        if name.startswith("rewriter"):
            p = args.fuzz if p else 0  # one property test, run on `fuzz` generated cases
        if name.startswith("recovery on random"):
            p = p - 1 + args.fuzz if p else 0  # its property test counts its generated graphs
        lines.append(f"| {name} | {p} | {f} | {s:.1f} |")
    text = "\n".join(lines) + "\n"
    (HERE / "reliability.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
