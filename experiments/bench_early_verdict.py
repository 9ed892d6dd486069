"""The early verdict on a model where INT8 cannot pay on this machine: `qsearch optimize --budget 50`
with the verdict on (the default) and off (what every run did before it), same workload, same
machine, one after the other. Reports each run's wall time, trials, model evaluations and what
shipped. Writes early_verdict_<workload>.md.

    python experiments/bench_early_verdict.py --workload orientation --latency-batch 1
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
sys.path.insert(0, str(HERE))

from bench_closed_loop import cpu_flags  # noqa: E402


def config(workload: str, latency_batch: int | None, verdict: bool) -> Path:
    src = importlib.import_module(f"qsearch.examples.{workload}").build()
    text = src.read_text()
    if latency_batch is not None:
        text = re.sub(r"latency_batch: \d+", f"latency_batch: {latency_batch}", text)
    space = re.search(r"^search_space: (.*)$", text, flags=re.M)
    inner = space.group(1).strip()
    inner = inner[1:-1] if inner.startswith("{") else f"extends: {inner}"
    text = text.replace(space.group(0), f"search_space: {{{inner}, early_verdict: {str(verdict).lower()}}}")
    path = src.with_name(f"workload-verdict-{'on' if verdict else 'off'}.yaml")
    path.write_text(text)
    return path


def run(cfg: Path, out: Path, budget: int) -> dict:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "qsearch", "optimize", "--config", str(cfg), "--budget", str(budget),
                        "--out", str(out)], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        return {"wall": wall, "rc": r.returncode, "err": r.stderr.strip().splitlines()[-1:]}
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    m = plan["metrics"]
    e = m["evaluations"]
    n8 = sum(1 for entry in plan["layers"] if entry.get("precision") == "int8")
    summary = (out / "report.md").read_text()
    verdict = next((ln for ln in summary.splitlines() if "Early verdict" in ln or "early verdict" in ln), "")
    chosen = next((ln for ln in summary.splitlines() if ln.startswith(("Chosen plan", "No INT8 plan"))), "")
    return {"wall": wall, "rc": 0, "evals": e["analysis"] + e["fixing"] + e["trials"] + e.get("final", 0),
            "trials": e["trials"], "int8": n8, "test_drop": m["test_drop"], "verdict": verdict, "chosen": chosen}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="orientation")
    ap.add_argument("--latency-batch", type=int)
    ap.add_argument("--budget", type=int, default=50)
    args = ap.parse_args()
    root = HERE / ".cache" / "early_verdict" / args.workload
    rows = {}
    for verdict in (True, False):
        out = root / ("on" if verdict else "off")
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        rows[verdict] = run(config(args.workload, args.latency_batch, verdict), out, args.budget)
        print(f"verdict {'on' if verdict else 'off'}: {rows[verdict]}", file=sys.stderr)
    lines = [f"# The early verdict on `{args.workload}` ({date.today()}, {platform.machine()}, {cpu_flags()}, "
             f"ONNX Runtime {__import__('onnxruntime').__version__}, 1 thread)", "",
             f"`qsearch optimize --budget {args.budget}`, latency batch {args.latency_batch or 'as configured'}; "
             "`early_verdict` on (the default) and off (what every run did before it), one after the other.", "",
             "| early_verdict | exit | run s | trials | model evaluations | INT8 layers shipped | test drop |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for verdict, r in rows.items():
        if r["rc"]:
            lines.append(f"| {'on' if verdict else 'off'} | {r['rc']} | {r['wall']:.0f} | | | | |")
            continue
        lines.append(f"| {'on' if verdict else 'off'} | 0 | {r['wall']:.0f} | {r['trials']} | {r['evals']} | {r['int8']} | "
                     f"{r['test_drop']:.4f} |")
    on, off = rows[True], rows[False]
    if not on["rc"] and not off["rc"]:
        lines += ["", f"The verdict's run took {on['wall'] / off['wall']:.0%} of the full run's time."]
        if on["verdict"]:
            lines += ["", f"Its summary: {on['verdict'].strip()}"]
        else:
            lines += ["", "The verdict did not fire here: the analysis found a way INT8 could pay beyond the noise. What "
                      "each run shipped:", "", f"- on: {on['chosen'].strip()}", f"- off: {off['chosen'].strip()}"]
    (HERE / f"early_verdict_{args.workload}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
