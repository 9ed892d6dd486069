"""Accuracy recovery on real workloads: the all-INT8 drop (MinMax, per-tensor and per-channel
weights) with no recovery, bias correction, cross-layer equalization, smoothing and their
combinations, on search and test
data, every model from one calibration; then (`--optimize`) `qsearch optimize` with recovery
(the default search space) against `recovery: [none]`, both timed side by side with FP32 in
interleaved rounds in this run. Writes recovery_<workload>.md.

    python experiments/bench_recovery.py --workload digits --optimize --seeds 0 1 2
    python experiments/bench_recovery.py --workload ocr_det_lines
"""

from __future__ import annotations

import argparse
import platform
import re
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_closed_loop import workload_config  # noqa: E402

from qsearch.recovery.techniques import recoveries  # noqa: E402


def drops(cfg: Path, cache: Path) -> tuple[list[str], object]:
    from qsearch.config import load_workload
    from qsearch.evaluator import Evaluator
    from qsearch.recovery.equalization import correctable
    from qsearch.workbench import open_workbench

    t = time.perf_counter()
    bench = open_workbench(load_workload(cfg), cache_dir=cache, log=lambda *a: None)
    setup = time.perf_counter() - t
    ev = Evaluator(bench)
    pairs = bench.recovery.pairs if bench.recovery else ()
    searched = {la.name for la in bench.candidates()}  # a group of layers the space does not search smooths nothing
    smooth = {t: sm for t, sm in (bench.recovery.smoothing if bench.recovery else {}).items()
              if set(sm.group.layers) & searched}
    alphas = sorted(sm.alpha for sm in smooth.values())
    lines = [f"Equalizable pairs: {len(pairs)} ({sum(p.clip is not None for p in pairs)} through a Clip, clip-aware); "
             f"smoothing groups: {len(smooth)} inputs of {sum(len(sm.group.layers) for sm in smooth.values())} layers"
             + (f" (alpha chosen per group: {alphas[0]:g}-{alphas[-1]:g}, median {alphas[len(alphas) // 2]:g})"
                if alphas else "") + "; "
             f"layers bias correction applies to: {sum(correctable(la) for la in bench.candidates())} of "
             f"{len(bench.candidates())}. Setup with both calibration passes: {setup:.1f} s "
             f"({bench.calibration_passes} passes).", "",
             "| all-INT8 (MinMax) | weights | recovery | search drop | test drop | within budget (search / test) |",
             "|---|---|---|---:|---:|:-:|"]
    fp = (ev.fp32_score("search"), ev.fp32_score("test"))
    allowed = bench.allowed_drop()
    for gran in ("per_tensor", "per_channel"):
        for rec in recoveries():
            plan = bench.uniform_plan("minmax", gran, recovery=rec)
            s = fp[0] - ev.evaluate(plan, "search", timing=False).score
            t = fp[1] - ev.evaluate(plan, "test", timing=False).score
            ok = f"{'yes' if s <= allowed + 1e-12 else 'no'} / {'yes' if t <= allowed + 1e-12 else 'no'}"
            lines.append(f"| naive | {gran} | {rec} | {s:.4f} | {t:.4f} | {ok} |")
            print(f"{gran} {rec}: search {s:.4f} test {t:.4f}", file=sys.stderr)
    return lines, bench


def optimize(name: str, seeds: list[int], budget: int, rounds: int, root: Path) -> list[str]:
    """optimize with the default space (recovery on) and with `recovery: [none]`, timed together."""
    import onnx

    from qsearch.config import load_workload
    from qsearch.engine.onnxruntime import make_session
    from qsearch.evaluator import Evaluator
    from qsearch.workbench import open_workbench

    models, meta = {}, {}
    for seed in seeds:
        for variant in ("recovery", "no recovery"):
            out = root / f"{variant.replace(' ', '_')}-seed{seed}"
            shutil.rmtree(out, ignore_errors=True)
            cfg = workload_config(name, None, seed, out)
            if variant == "no recovery":
                cfg.write_text(re.sub(r"(  seed: \d+)", r"\1\n  recovery: [none]", cfg.read_text()))
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "qsearch", "optimize", "--config", str(cfg), "--budget",
                                str(budget), "--out", str(out)], capture_output=True, text=True)
            wall = time.perf_counter() - t
            print(f"{variant} seed {seed}: rc {r.returncode}, {wall:.0f} s", file=sys.stderr)
            if r.returncode == 0:
                key = f"qsearch, {variant}, seed {seed}"
                models[key] = onnx.load(str(out / "model.qsearch.onnx"))
                meta[key] = (wall, next((ln for ln in r.stdout.splitlines() if ln.startswith("Recovery:")), ""))
    bench = open_workbench(load_workload(cfg), cache_dir=root / "cache", log=lambda *a: None)
    models = {"fp32": bench.rewriter(bench.plan({})), **models}
    sessions = {k: make_session(m, bench.workload.threads) for k, m in models.items()}
    cpu: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for k, s in sessions.items():
            cpu[k].append(bench.engine.time(s, bench.latency_feed, repeat=10).cpu_ms)
    ev = Evaluator(bench)
    fp = (ev.fp32_score("search"), ev.fp32_score("test"))
    lines = [f"`qsearch optimize --budget {budget}`, seeds {', '.join(map(str, seeds))}: the default search space "
             "(recovery on) against `recovery: [none]`; every model timed here in "
             f"{rounds} interleaved rounds (thread CPU time, best round; spread = (worst - best) / best).", "",
             "| model | search drop | test drop | CPU ms | spread | speed-up | run s | recovery in the plan |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for k, m in models.items():
        s = fp[0] - ev.evaluate(m, "search", timing=False).score
        t = fp[1] - ev.evaluate(m, "test", timing=False).score
        best, worst = min(cpu[k]), max(cpu[k])
        wall, rec = meta.get(k, ("", ""))
        lines.append(f"| {k} | {s:.4f} | {t:.4f} | {best:.3f} | {(worst - best) / best:.0%} | "
                     f"{min(cpu['fp32']) / best:.2f}x | {wall if wall == '' else f'{wall:.0f}'} | "
                     f"{rec.removeprefix('Recovery: ')} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="digits")
    ap.add_argument("--optimize", action="store_true", help="also run optimize with and without recovery")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--budget", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    root = HERE / ".cache" / "recovery" / args.workload
    shutil.rmtree(root, ignore_errors=True)
    cfg = workload_config(args.workload, None, 0, root / "drops")
    lines, bench = drops(cfg, root / "cache")
    head = [f"# Accuracy recovery on `{bench.workload.name}` ({date.today()}, {platform.machine()}, 2 cores, ONNX "
            f"Runtime {__import__('onnxruntime').__version__}, 1 thread)", "",
            f"Metric {bench.workload.metric.name}, budget max_drop {bench.allowed_drop():g}. All-INT8 = every candidate "
            "layer INT8 with MinMax ranges; recovery applied where a layer can take it (equalization in Conv pairs, "
            "smoothing of MatMul/Gemm inputs, bias correction on Conv/Gemm and MatMul with a bias Add).", ""]
    if args.optimize:
        lines += ["", *optimize(args.workload, args.seeds, args.budget, args.rounds, root)]
    (HERE / f"recovery_{args.workload}.md").write_text("\n".join(head + lines) + "\n")
    print("\n".join(head + lines))


if __name__ == "__main__":
    main()
