"""The closed loop to the budget on a real workload, as a user runs it: `qsearch optimize --budget N`
with several sampler seeds, then every shipped model timed side by side with FP32, naive INT8
(MinMax, per-tensor) and all-INT8 (every candidate at its best option, in the measured forms) in
interleaved rounds in this run. Reports each plan's speed-up over FP32 as a share of all-INT8's
(the issue's 90% rule), its drops on search and test data, the run's wall time, the final stage's
share and the model evaluations. Writes closed_loop_<workload>.md.

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
    """FP32, naive INT8 and all-INT8 at each layer's best option, built from the run's analysis."""
    from qsearch.analysis.sensitivity import SensitivityProfile
    from qsearch.config import load_workload
    from qsearch.workbench import open_workbench

    profile = SensitivityProfile.from_yaml((out / "sensitivity.yaml").read_text())
    bench = open_workbench(load_workload(cfg), cache_dir=out / "cache", log=lambda *a: None).with_forms(profile.forms)
    best = {x.name: x.best_option for x in profile.layers}
    return bench, {"fp32": bench.rewriter(bench.plan({})),
                   "naive int8 (minmax, per-tensor)": bench.rewriter(bench.uniform_plan("minmax", "per_tensor")),
                   "all-INT8 (best option per layer)": bench.rewriter(bench.plan(best))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="ocr_rec")
    ap.add_argument("--budget", type=int, default=50)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-drop", help="another accuracy budget than the workload's")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--latency-batch", type=int, help="another latency batch than the workload's (e.g. 1)")
    ap.add_argument("--no-parts", action="store_true", help="score functions that return one number")
    args = ap.parse_args()
    from qsearch.evaluator import Evaluator
    from qsearch.scoring import fusion_check

    root = HERE / ".cache" / "closed_loop" / args.workload
    runs = {}
    for seed in args.seeds:
        out = root / f"seed{seed}"
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        cfg = workload_config(args.workload, args.max_drop, seed, out, args.latency_batch, args.no_parts)
        runs[seed] = (cfg, out, run(cfg, out, args.budget))
        print(f"seed {seed}: rc {runs[seed][2]['rc']}, {runs[seed][2]['wall']:.0f} s", file=sys.stderr)
    cfg0, out0, _ = runs[args.seeds[0]]
    bench, models = baselines(cfg0, out0)
    import onnx

    for seed, (_, out, r) in runs.items():
        if r["rc"] == 0:
            models[f"qsearch seed {seed}"] = onnx.load(str(out / "model.qsearch.onnx"))
    ev = Evaluator(bench)
    sessions = {k: bench.engine.session(m) for k, m in models.items()}
    cpu: dict[str, list[float]] = {k: [] for k in models}
    wall: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.rounds):
        for k, s in sessions.items():
            t = bench.engine.time(s, bench.latency_feed, repeat=10)
            w, c = t.wall_ms, t.cpu_ms
            wall[k].append(w)
            cpu[k].append(c)
    scores = {k: (ev.evaluate(m, "search", timing=False).score, ev.evaluate(m, "test", timing=False).score)
              for k, m in models.items()}
    fp_cpu, fp_wall = min(cpu["fp32"]), min(wall["fp32"])
    all8 = fp_cpu / min(cpu["all-INT8 (best option per layer)"])
    allowed = bench.allowed_drop()
    lines = [f"# Closed loop on `{bench.workload.name}` ({date.today()}, {platform.machine()}, 2 cores, ONNX Runtime "
             f"{__import__('onnxruntime').__version__}, 1 thread)", "",
             f"`qsearch optimize --budget {args.budget}`, budget max_drop {allowed:g} on search data, seeds "
             f"{', '.join(map(str, args.seeds))}. Every model timed here side by side in {args.rounds} interleaved "
             f"rounds (thread CPU time, best median; wall time beside it). Speed-up share = the plan's speed-up "
             "over FP32 divided by all-INT8's, both from this run.", "",
             "| model | search drop | test drop | within budget (test) | CPU ms | wall ms | speed-up | share of all-INT8 | "
             "unfused Q/DQ | run s | final stage s (share) | evaluations |",
             "|---|---:|---:|:-:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, m in models.items():
        sd, td = scores["fp32"][0] - scores[k][0], scores["fp32"][1] - scores[k][1]
        sp = fp_cpu / min(cpu[k])
        seed = int(k.rsplit(" ", 1)[1]) if k.startswith("qsearch") else None
        extra = ["", "", ""]
        if seed is not None:
            r = runs[seed][2]
            sec = r["metrics"]["seconds"]
            final = sec.get("final stage", 0.0) + sec.get("report", 0.0)
            e = r["metrics"]["evaluations"]
            extra = [f"{r['wall']:.0f}", f"{final:.0f} ({final / r['wall']:.0%})",
                     str(e["analysis"] + e["fixing"] + e["trials"] + e.get("final", 0))]
        lines.append(f"| {k} | {sd:.4f} | {td:.4f} | {'yes' if td <= allowed + 1e-12 else 'no'} | {min(cpu[k]):.2f} | "
                     f"{min(wall[k]):.2f} | {sp:.2f}x | {sp / all8:.0%} | {fusion_check(m).unfused_qdq} | "
                     + " | ".join(extra) + " |")
    spreads = [fp_cpu / min(cpu[k]) for k in models if k.startswith("qsearch")]
    if spreads:
        lines += ["", f"qsearch speed-ups across seeds: {min(spreads):.2f}x to {max(spreads):.2f}x "
                  f"({min(spreads) / all8:.0%} to {max(spreads) / all8:.0%} of all-INT8's {all8:.2f}x); FP32 "
                  f"{fp_cpu:.2f} ms CPU, {fp_wall:.2f} ms wall."]
    for seed, (_, _, r) in runs.items():
        if r["rc"] == 0:
            lines += ["", f"Seed {seed}, the run's own summary:", "", "```", r["summary"].strip(), "```"]
    variant = (f"_batch{args.latency_batch}" if args.latency_batch else "") + ("_noparts" if args.no_parts else "")
    path = HERE / f"closed_loop_{args.workload}{variant}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
