"""The search against its baselines, in one run: `qsearch optimize`'s study (TPE, sensitivity-guided
space, warm start) vs TPE without warm start, random search in the same guided space, and random
search in the raw space (every layer, every option: what a search without the analyzer faces),
all with the same trial budget and several seeds; plus naive INT8 and the greedy fallback; trials
until the first within-budget plan; the share of trial time that is not scoring. Writes
search_<workload>.md.

    python experiments/bench_search.py --workload digits [--budget 50]
    python experiments/bench_search.py --workload minilm --budget 40 --samples 100 --seeds 2
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

from bench_peers import context, evaluator, require

from qsearch.analysis.sensitivity import analyze
from qsearch.evaluator import Evaluator
from qsearch.finalize import greedy_fallback
from qsearch.plan.format import LayerChoice
from qsearch.search.framing import problem_for
from qsearch.search.strategy import Dimensions, build_dimensions
from qsearch.search.study import Search

HERE = Path(__file__).resolve().parent


def first_feasible(search: Search) -> int | None:
    for r in sorted(search.results(), key=lambda r: r.number):
        if r.feasible:
            return r.number + 1
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=3, help="sampler seeds per strategy for the trials-to-budget count")
    ap.add_argument("--workload", choices=["digits", "minilm"], default="digits")
    ap.add_argument("--samples", type=int, help="sensitivity analysis on the first N search samples")
    args = ap.parse_args()
    require(args.workload)
    ctx = context(args.workload, args.samples)
    wl = ctx.workload
    t0 = time.perf_counter()
    profile = analyze(ctx, samples=args.samples, cache_dir=HERE / ".cache" / "profiles")
    ctx = ctx.with_forms(profile.forms)
    t_analyze = time.perf_counter() - t0
    rows = []
    fp32_lat = ctx.baseline.fp32_latency_ms
    naive = evaluator(ctx).evaluate(ctx.uniform_plan("minmax", "per_tensor"), "test")
    naive_s = evaluator(ctx).evaluate(ctx.uniform_plan("minmax", "per_tensor"), "search", timing=False).score
    rows.append(("naive int8 (minmax, per-tensor)", naive_s, naive, 1, None, None))
    greedy, evals, _ = greedy_fallback(ctx, evaluator(ctx), problem_for(ctx, profile))
    g = evaluator(ctx).evaluate(greedy, "test")
    rows.append(("greedy fallback", evaluator(ctx).evaluate(greedy, "search", timing=False).score, g, evals, None, None))
    seeds_summary = []
    space = wl.space
    raw = Dimensions({}, {la.name: (*(LayerChoice("int8", m, g).label() for m in space.calibration
                                      for g in space.granularity), LayerChoice(ctx.float_precision).label())
                          for la in ctx.candidates()})
    for label, sampler, warm, guided in (("qsearch (TPE, warm start)", "tpe", True, True),
                                         ("TPE, no warm start", "tpe", False, True),
                                         ("random search, guided space", "random", False, True),
                                         ("random search, raw space", "random", False, False)):
        firsts, costs = [], []
        for seed in range(args.seeds):
            bench = replace(ctx, workload=replace(wl, space=replace(wl.space, sampler=sampler, warm_start=warm, seed=seed)))
            with tempfile.TemporaryDirectory() as tmp:
                s = Search(bench, profile, Evaluator(bench), Path(tmp), budget=args.budget).start()
                if not guided:
                    s.dims = raw
                t1 = time.perf_counter()
                s.run(args.budget)
                wall = time.perf_counter() - t1
                best = s.best()
                firsts.append(first_feasible(s))
                costs.append(best.cost if best else float("nan"))
                if seed:
                    continue
                if best is None:
                    rows.append((label, float("nan"), None, args.budget, None, wall))
                    continue
                ev = evaluator(ctx).evaluate(s.evaluator.plan(best.choices), "test")
                nonscore = 1 - s.evaluator.seconds / max(s.trial_seconds, 1e-9)
                rows.append((label, best.score, ev, len(s.study.trials), (first_feasible(s), nonscore), wall))
        seeds_summary.append((label, firsts, costs))
    lines = [f"# Search vs baselines, `{wl.name}` ({date.today()}, {platform.machine()}, 2 cores, 1 ORT thread)",
             "", f"FP32: search {ctx.baseline.fp32_search:.4f}, test {evaluator(ctx).fp32_test():.4f}, "
             f"latency {fp32_lat:.3f} ms; allowed drop {ctx.allowed_drop():.4f}; analysis "
             f"{'cached' if t_analyze < 1 else f'{t_analyze:.1f}s'} "
             f"({profile.meta['evaluations']} evaluations, proxy Spearman {profile.spearman:.2f}); guided space: "
             f"{len(build_dimensions(problem_for(ctx, profile)).searched)} of {len(ctx.candidates())} layers searched", "",
             "| plan | search | test | test drop | latency ms | speed-up | size KiB | trials | first within budget | non-scoring share | search wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, ss, ev, n, extra, wall in rows:
        if ev is None:
            lines.append(f"| {name} | no plan within budget | | | | | | {n} | | | {wall:.1f} |")
            continue
        ff, ns = extra if extra else ("", None)
        lines.append(f"| {name} | {ss:.4f} | {ev.score:.4f} | {evaluator(ctx).fp32_test() - ev.score:.4f} | "
                     f"{ev.latency_ms:.3f} | {fp32_lat / ev.latency_ms:.2f}x | {ev.size_bytes / 1024:.1f} | {n} | {ff} | "
                     f"{'' if ns is None else f'{ns:.0%}'} | {'' if wall is None else f'{wall:.1f}'} |")
    lines += ["", f"Over {args.seeds} sampler seeds (search data; latency of the best plan within budget):", "",
              "| strategy | trial of the first plan within budget, per seed | best latency ms, per seed |", "|---|---|---|"]
    for label, firsts, costs in seeds_summary:
        lines.append(f"| {label} | {', '.join(str(f) if f else 'none' for f in firsts)} | "
                     f"{', '.join(f'{c:.3f}' for c in costs)} |")
    if args.workload == "digits":  # the main command as users run it, end to end
        import subprocess
        import sys

        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "qsearch", "optimize", "--budget", str(args.budget),
                                "--out", tmp], capture_output=True, text=True)
            total = time.perf_counter() - t
        lines += ["", f"`qsearch optimize --budget {args.budget}` on the embedded default, end to end (fresh output "
                  f"folder: calibration, analysis, search, baselines, report): {total:.1f} s wall, exit {r.returncode}."]
    text = "\n".join(lines) + "\n"
    (HERE / f"search_{args.workload}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
