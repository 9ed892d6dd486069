"""The closed loop to the budget on a real workload, as a user runs it: `qsearch optimize --budget N`
with several sampler seeds, then every shipped model timed side by side with FP32, naive INT8
(MinMax, per-tensor) and all-INT8 (every candidate at its best option, in the measured forms) in
interleaved rounds in this run. Reports each plan's speed-up over FP32 as a share of all-INT8's
(the issue's 90% rule), its drops on search and test data, the run's wall time, the final stage's
share and the model evaluations. Writes closed_loop_<workload>[_variant]_<int8 path>.md.

    python experiments/bench_closed_loop.py --workload ocr_rec --seeds 0 1 2
    python experiments/bench_closed_loop.py --workload ocr_det --max-drop 0.004 --seeds 0
"""

from __future__ import annotations

import argparse
import importlib
import platform
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


NO_PARTS = """\
# the workload's own score functions, returning one number instead of per-sample parts (what a user
# who writes `return accuracy` gives): qsearch must find the drop's resolution by replaying them
import numpy as np

from {module} import {search} as _search, {test} as _test


def _one(parts):
    p = np.asarray(parts, dtype=np.float64)
    return float(p[:, 0].sum() / p[:, 1].sum()) if p.ndim == 2 else float(p)


def search(session):
    return _one(_search(session))


def test(session):
    return _one(_test(session))
"""


def _plain_scores(text: str, where: Path) -> str:
    """The config with its score functions wrapped to return one number (`NO_PARTS`)."""
    m = re.search(r'metric: \{search: "([\w.]+):(\w+)", test: "([\w.]+):(\w+)"\}', text)
    if m is None:
        raise SystemExit("error: --no-parts needs a workload whose metric is {search: mod:fn, test: mod:fn}")
    (where / "noparts_scores.py").write_text(NO_PARTS.format(module=m.group(1), search=m.group(2), test=m.group(4)))
    return text.replace(m.group(0), 'metric: {search: "noparts_scores:search", test: "noparts_scores:test"}')


def workload_config(name: str, max_drop: str | None, seed: int, out: Path, latency_batch: int | None = None,
                    no_parts: bool = False) -> Path:
    """The workload's config (built by its example module), with another budget or seed if asked;
    `latency_batch`: another latency batch; `no_parts`: score functions that return one number."""
    if name == "digits":  # a copy: the seeded config goes next to its data, not into the package
        import shutil

        from qsearch.config import DEFAULT_WORKLOAD

        copy = out.parent / "digits-src"
        shutil.copytree(Path(DEFAULT_WORKLOAD).parent, copy, dirs_exist_ok=True)
        src = copy / "workload.yaml"
    else:
        src = importlib.import_module(f"qsearch.examples.{name}").build()
    text = src.read_text()
    if max_drop is not None:
        text = re.sub(r"^max_drop: .*$", f"max_drop: {max_drop}", text, flags=re.M)
    if latency_batch is not None:
        text = re.sub(r"latency_batch: \d+", f"latency_batch: {latency_batch}", text)
    if no_parts:
        text = _plain_scores(text, src.parent)
    space = re.search(r"^search_space: (\S+)$", text, flags=re.M)
    if space:
        text = text.replace(space.group(0), f"search_space:\n  extends: {space.group(1)}\n  seed: {seed}")
    variant = (f"-batch{latency_batch}" if latency_batch else "") + ("-noparts" if no_parts else "")
    cfg = src.parent / f"workload-seed{seed}{variant}.yaml"
    cfg.write_text(text)
    return cfg


def run(cfg: Path, out: Path, budget: int) -> dict:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "qsearch", "optimize", "--config", str(cfg), "--budget", str(budget),
                        "--out", str(out)], capture_output=True, text=True)
    wall = time.perf_counter() - t
    (out / "stderr.log").write_text(r.stderr)
    if r.returncode != 0:
        return {"rc": r.returncode, "wall": wall}
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    m = plan["metrics"]
    return {"rc": 0, "wall": wall, "metrics": m, "summary": r.stdout}


def baselines(cfg: Path, out: Path):
    """Every plan the issue measures qsearch against, built from the first seed's analysis: FP32,
    naive INT8, all-INT8 at each layer's best option and the same minus its k most sensitive layers
    (k = 1..10), the greedy fallback, and ONNX Runtime's quantize_static (MinMax, per-tensor and
    per-channel, with and without reduce_range) on the same calibration data."""
    from qsearch.analysis.sensitivity import SensitivityProfile
    from qsearch.config import load_workload
    from qsearch.evaluator import Evaluator
    from qsearch.finalize import greedy_fallback
    from qsearch.search.framing import problem_for
    from qsearch.workbench import open_workbench

    sys.path.insert(0, str(HERE))
    from bench_peers import ort_static

    profile = SensitivityProfile.from_yaml((out / "sensitivity.yaml").read_text())
    bench = open_workbench(load_workload(cfg), cache_dir=out / "cache", log=lambda *a: None).with_forms(profile.forms)
    best = {x.name: x.best_option for x in profile.layers}  # most sensitive first
    models = {"fp32": bench.rewriter(bench.plan({})),
              "naive int8 (minmax, per-tensor)": bench.rewriter(bench.uniform_plan("minmax", "per_tensor")),
              "all-INT8 (best option per layer)": bench.rewriter(bench.plan(best))}
    names = list(best)
    for k in range(1, 11):
        models[f"all-INT8 minus {k} most sensitive"] = bench.rewriter(bench.plan({n: best[n] for n in names[k:]}))
    plan, _, _ = greedy_fallback(bench, Evaluator(bench), problem_for(bench, profile))
    models["greedy fallback"] = bench.rewriter(plan)
    for per_channel in (False, True):
        for reduce_range in (False, True):
            row = ort_static(bench, "MinMax", per_channel, reduce_range=reduce_range)
            if row.model is not None:
                models[row.name] = row.model
            else:
                print(f"{row.name}: {row.note}", file=sys.stderr)
    return bench, models


def paired(bench, models: dict, rounds: int) -> dict:
    """Each model's speed-up over FP32: the paired per-round ratio of thread CPU times (one intra-op
    thread), every model timed once per round, rounds interleaved; with its 90% interval."""
    from qsearch.timing import ratio

    sessions = {k: bench.engine.session(m) for k, m in models.items()}
    cpu: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for k, s in sessions.items():
            cpu[k].append(bench.engine.time(s, bench.latency_feed, repeat=10).cpu_ms)
    return {k: (ratio(v, cpu["fp32"]), min(v)) for k, v in cpu.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="ocr_rec")
    ap.add_argument("--budget", type=int, default=50)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-drop", help="another accuracy budget than the workload's")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--latency-batch", type=int, help="another latency batch than the workload's (e.g. 1)")
    ap.add_argument("--no-parts", action="store_true", help="score functions that return one number")
    args = ap.parse_args()
    import shutil

    import onnx

    root = HERE / ".cache" / "closed_loop" / args.workload
    runs = {}
    for seed in args.seeds:
        out = root / f"seed{seed}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = workload_config(args.workload, args.max_drop, seed, out, args.latency_batch, args.no_parts)
        runs[seed] = (cfg, out, run(cfg, out, args.budget))
        print(f"seed {seed}: rc {runs[seed][2]['rc']}, {runs[seed][2]['wall']:.0f} s", file=sys.stderr)
    cfg0, out0, _ = runs[args.seeds[0]]
    bench, models = baselines(cfg0, out0)
    for seed, (_, out, r) in runs.items():
        if r["rc"] == 0:
            models[f"qsearch seed {seed}"] = onnx.load(str(out / "model.qsearch.onnx"))
    lines = report(bench, models, runs, args)
    from qsearch.engine import isa

    variant = (f"_batch{args.latency_batch}" if args.latency_batch else "") + ("_noparts" if args.no_parts else "")
    path = HERE / f"closed_loop_{args.workload}{variant}_{isa.detect().name}.md"  # one file per int8 path
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def cpu_flags() -> str:
    """The int8 path and the CPU flags that decide it, as every figure must state them."""
    from qsearch.engine import isa

    flags = isa.cpu_flags()
    shown = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"int8 path `{isa.detect().name}`, flags {' '.join(shown) or 'none of avx2/avx512/vnni/amx'}"


def report(bench, models: dict, runs: dict, args) -> list[str]:
    """The table: every model's drops on both splits, its paired speed-up over FP32 with interval,
    and qsearch's share of the fastest plan within budget on both splits from any source."""
    from qsearch.evaluator import Evaluator
    from qsearch.scoring import fusion_check

    ev = Evaluator(bench)
    scores = {k: (ev.evaluate(m, "search", timing=False).drop, ev.evaluate(m, "test", timing=False).drop)
              for k, m in models.items()}
    speed = paired(bench, models, args.rounds)
    allowed = bench.allowed_drop()
    within = {k for k, (sd, td) in scores.items() if sd <= allowed + 1e-12 and td <= allowed + 1e-12}
    rivals = [k for k in within if not k.startswith("qsearch")]
    top = max(rivals, key=lambda k: speed[k][0].value)
    lines = [f"# Closed loop on `{bench.workload.name}` ({date.today()}, {platform.machine()}, "
             f"{__import__('os').cpu_count()} cores, {cpu_flags()}, ONNX Runtime {__import__('onnxruntime').__version__}, "
             "1 thread)", "",
             f"`qsearch optimize --budget {args.budget}`, budget max_drop {allowed:g} on search data, seeds "
             f"{', '.join(map(str, args.seeds))}, latency batch {bench.workload.latency_batch}"
             f"{', score without parts' if args.no_parts else ''}. Every model is timed here in {args.rounds} interleaved "
             "rounds; speed-up = the geometric mean of per-round FP32/model ratios of thread CPU time, with its 90% "
             "interval. Share = the speed-up over that of the fastest plan within budget on *both* splits from any "
             f"other source in this run (here: {top}, {speed[top][0].value:.2f}x).", "",
             "| model | search drop | test drop | within budget (both) | CPU ms (best) | speed-up (90% interval) | share "
             "of fastest within budget | unfused Q/DQ | run s | evaluations |",
             "|---|---:|---:|:-:|---:|---:|---:|---:|---:|---:|"]
    for k, m in models.items():
        (sd, td), (r, best_ms) = scores[k], speed[k]
        sp = r.value  # FP32's time over the model's, per round
        extra = ["", ""]
        if k.startswith("qsearch"):
            res = runs[int(k.rsplit(" ", 1)[1])][2]
            e = res["metrics"]["evaluations"]
            extra = [f"{res['wall']:.0f}", str(e["analysis"] + e["fixing"] + e["trials"] + e.get("final", 0))]
        lines.append(f"| {k} | {sd:.4f} | {td:.4f} | {'yes' if k in within else 'no'} | {best_ms:.2f} | "
                     f"{sp:.2f}x ({r.low:.2f}-{r.high:.2f}) | {sp / speed[top][0].value:.0%} | "
                     f"{fusion_check(m).unfused_qdq} | " + " | ".join(extra) + " |")
    for seed, (_, _, r) in runs.items():
        if r["rc"] == 0:
            lines += ["", f"Seed {seed}, the run's own summary:", "", "```", r["summary"].strip(), "```"]
    return lines


if __name__ == "__main__":
    main()
