"""The same plans' accuracy on two int8 paths: reads two closed-loop result files of one workload
(`bench_closed_loop.py` on two machines, e.g. closed_loop_ocr_rec_avx2.md and closed_loop_ocr_rec_amx.md)
and writes paths_<workload>.md: each model both files name, its search and test drop on each path.

Rows built without a search (FP32, naive INT8, ORT quantize_static) are the same model on both
machines (one deterministic recipe on the same data; only calibration ranges computed by each
machine's FP32 kernels may differ in their last bits), so a difference is the CPU's int8 arithmetic. Rows built from the analysis
(all-INT8 best option, minus k, greedy fallback, qsearch) are the same recipe with options chosen
on each machine: they show what a user gets there, not one model on two kernels.

    python experiments/compare_paths.py closed_loop_ocr_rec_avx2.md closed_loop_ocr_rec_amx.md
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAME_MODEL = ("fp32", "naive int8", "ORT quantize_static")


def rows(path: Path) -> tuple[str, dict[str, tuple[str, str, str]]]:
    """(the file's title line, model -> (search drop, test drop, speed-up)) from its first table."""
    text = path.read_text().splitlines()
    out = {}
    for line in text:
        if out and not line.startswith("|"):
            break  # the first table only (the runs' own summaries below hold scores, not drops)
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 6 and re.fullmatch(r"-?\d+\.\d+", cells[1]) and re.fullmatch(r"-?\d+\.\d+", cells[2]):
            out[cells[0]] = (cells[1], cells[2], cells[5])
    return text[0].lstrip("# "), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("a", help="result file on one path")
    ap.add_argument("b", help="the same workload's file on another path")
    args = ap.parse_args()
    (ta, a), (tb, b) = rows(HERE / args.a), rows(HERE / args.b)
    na, nb = (re.search(r"int8 path `(\w+)`", t).group(1) for t in (ta, tb))
    workload = re.search(r"`([^`]+)`", ta).group(1)
    lines = [f"# `{workload}`: the same plans on the int8 paths `{na}` and `{nb}`", "",
             f"- `{na}`: {args.a} ({ta})", f"- `{nb}`: {args.b} ({tb})", "",
             "Same model: built without a search by one deterministic recipe from the same data (a difference is the "
             "CPU's int8 arithmetic). Same recipe: options chosen by each machine's own analysis and search.", "",
             f"| model | kind | search drop {na} | search drop {nb} | test drop {na} | test drop {nb} | "
             f"speed-up {na} | speed-up {nb} |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in (k for k in a if k in b):
        kind = "same model" if name.startswith(SAME_MODEL) else "same recipe"
        (sa, ea, pa), (sb, eb, pb) = a[name], b[name]
        lines.append(f"| {name} | {kind} | {sa} | {sb} | {ea} | {eb} | {pa} | {pb} |")
    out = HERE / f"paths_{args.a.removeprefix('closed_loop_').rsplit('_', 1)[0]}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
