"""Markdown / HTML report of a search: the chosen plan against FP32, naive INT8 and hybrid."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qsearch.files import atomic_write_text, save_figure


@dataclass(frozen=True)
class Row:
    name: str
    search_score: float
    test_score: float
    latency_ms: float
    size_bytes: int
    int8_layers: int
    evaluations: int | None = None
    note: str = ""
    latency_spread: float = 0.0  # (second-best - best) / best of the interleaved timing rounds
    cpu_ms: float | None = None  # thread CPU time (one intra-op thread: the model's own work)
    cpu_spread: float = 0.0
    interval: str = ""  # the search drop with its bootstrap interval, where the metric has parts
    resolution: float | None = None  # smallest drop difference the search split resolves (None: unknown)
    wall_rounds: tuple[float, ...] = ()  # its median wall ms in each interleaved round (`timing`)
    cpu_rounds: tuple[float, ...] = ()
    why: str = ""  # a finalist that lost: why
    bitops: float | None = None  # GBOPs with the border charge (`evaluator.bitops`), for analytic objectives


def rows_markdown(rows: list[Row], metric: str, fp32_latency: float, fp32_size: int) -> str:
    """The plans side by side; a GBOPs column where the objective is bit-operations (FP16/NPU
    targets: this CPU's latency is not the device's)."""
    bops = any(r.bitops is not None for r in rows)
    lines = [f"| plan | {metric} search | {metric} test | latency ms (spread) | speed-up | size KiB | size ratio | "
             f"{'GBOPs | ' if bops else ''}quantized layers | evaluations |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if bops else "")]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.search_score:.4f} | {_test(r)} | {r.latency_ms:.3f} (±{r.latency_spread:.0%}) | "
            f"{fp32_latency / r.latency_ms:.2f}x | {r.size_bytes / 1024:.1f} | {r.size_bytes / fp32_size:.2f} | "
            + (f"{r.bitops:.4g} | " if bops else "")
            + f"{r.int8_layers} | {'' if r.evaluations is None else r.evaluations} |"
        )
    return "\n".join(lines)


def fmt_drop(x: float) -> str:
    """A drop in the metric's units, 2-4 significant digits (0.0012, -0.00125, 0.083)."""
    if x != x:
        return "n/a"
    if x == 0:
        return "0"
    return f"{x:.3g}" if abs(x) >= 1e-4 else f"{x:.2g}"


def speed(ratio: float) -> str:
    """A speed ratio against FP32 as words that cannot be misread ("0.55x faster" was)."""
    return f"{ratio:.2f}x faster than FP32" if ratio >= 1 else f"{1 / ratio:.2f}x slower than FP32"


def verdict_line(fp32: Row, chosen: Row, allowed: float, metric: str, fp32_ships: bool, edge: bool = False,
                 ratio=None, alternative: str = "") -> str:
    """The report in one sentence: speed, then the drop on search and test data against the budget.
    `edge`: the search split cannot tell whether the plan is within budget (said first); `ratio`:
    the paired speed-up (`timing.Ratio`), stated with its interval; `alternative`: where the plan is
    over budget on test, the fastest plan within on both splits and its file."""
    def side(drop: float, split: str) -> str:
        if drop != drop:
            return f"not scored on {split} data"
        word = "below" if drop > 0 else "above"
        return "equal to FP32" + f" on {split} data" if drop == 0 else f"{fmt_drop(abs(drop))} {word} it on {split} data"
    head = "FP32 ships (no INT8 plan within budget beats it)" if fp32_ships else speed(
        ratio.value if ratio is not None else fp32.latency_ms / chosen.latency_ms)
    if ratio is not None and not fp32_ships:
        head += f" (90% interval {ratio.low:.2f}-{ratio.high:.2f}x over {ratio.rounds} interleaved rounds)"
    if chosen.bitops and fp32.bitops:  # an analytic objective decided: this CPU's time is not the target's
        head = (f"{fp32.bitops / chosen.bitops:.2f}x fewer bit-operations than the float model ({chosen.bitops:.4g} "
                f"GBOPs against {fp32.bitops:.4g}, conversions charged; on this CPU {head})")
    test_drop = fp32.test_score - chosen.test_score
    miss = "" if fp32_ships or not test_drop > allowed + 1e-12 else (
        f" OVER THE BUDGET ON TEST DATA: it loses {fmt_drop(test_drop)} there against the {fmt_drop(allowed)} "
        "allowed; the search split did not represent the test data (a larger or more varied search split, "
        "or a tighter budget, is the fix). " + (f"The fastest plan within budget on both splits: {alternative}."
                                                if alternative else "No other plan timed that beats FP32 is within "
                                                "budget on both splits: the float model is the safe choice."))
    warn = "The search split cannot tell whether this plan is within budget (its drop is within the split's " \
        "resolution of it): " if edge and not fp32_ships else ""
    return (f"{warn}{head}; {metric} {side(fp32.search_score - chosen.search_score, 'search')} (budget: lose at most "
            f"{fmt_drop(allowed)}) and {side(test_drop, 'test')}.{miss}")


def _test(r: Row) -> str:
    return "not scored (over budget on search data)" if r.test_score != r.test_score else f"{r.test_score:.4f}"


def zoom(fp32: float, allowed: float, scores: list[float]) -> tuple[float, float]:
    """The score axis around the budget: from two budgets below FP32 (or the lowest plan within
    budget) to just above the best score, so plans that matter do not sit in one flat line."""
    budget = fp32 - allowed
    inside = [s for s in scores if s >= budget]
    span = max(allowed, (max(inside + [fp32]) - budget)) or 1e-3
    return min(budget - span, min(inside, default=budget)), max(inside + [fp32]) + 0.15 * span


def plot_pareto(results, allowed: float, fp32: float, objective: str, path: Path,
                marks: list[tuple[str, float, float]] = ()) -> None:
    """Trials (cost measured inside the trial) and, when the axis is latency or size, the report's
    table rows `marks` (name, cost, search score) at the table's own figures: FP32, naive, hybrid
    and the chosen plan, timed side by side in the final stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    feas = [r for r in results if r.feasible]
    infeas = [r for r in results if not r.feasible]
    ax.scatter([r.cost for r in infeas], [r.score for r in infeas], s=14, c="#bbbbbb", label="trial, over budget",
               clip_on=True)
    ax.scatter([r.cost for r in feas], [r.score for r in feas], s=18, c="#2166ac", label="trial, within budget")
    front = sorted(results, key=lambda r: (r.cost, -r.score))
    fx, fy, best_s = [], [], -1e300
    for r in front:
        if r.score > best_s:
            fx.append(r.cost)
            fy.append(r.score)
            best_s = r.score
    ax.step(fx, fy, where="post", c="#2166ac", lw=1, alpha=0.6, label="Pareto front (trials)")
    ax.axhline(fp32 - allowed, c="#b2182b", ls="--", lw=1, label="accuracy budget")
    styles = [("s", "#4d4d4d"), ("v", "#e08214"), ("D", "#1b7837"), ("*", "#b2182b")]
    lo, hi = zoom(fp32, allowed, [r.score for r in feas] + [m[2] for m in marks])
    for (name, cost, score), (marker, color) in zip(marks, styles):
        off = score < lo  # far below the budget (naive INT8 at 0.33): drawn at the edge, said so
        ax.scatter([cost], [max(score, lo)], s=130 if marker == "*" else 60, marker=marker, c=color, edgecolors="k",
                   linewidths=0.5, label=f"{name}" + (f" (off scale: {score:.3g})" if off else ""), zorder=5,
                   clip_on=False)
    ax.set_ylim(lo, hi)
    ax.set_xlabel({"latency": "latency (ms / batch)", "size": "size (bytes)", "bitops": "GBOPs"}[objective])
    ax.set_ylabel("score on search data")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


def write_report(out: Path, title: str, summary: list[str], rows: list[Row], metric: str, fp32_latency: float,
                 fp32_size: int, images: list[tuple[str, Path]], tables: list[tuple[str, str]] = (),
                 page: str | None = None) -> None:
    """report.md (the summary, the plan comparison, each (heading, markdown table) in `tables`,
    the figures) and report.html (`page`, from `htmlreport.render`)."""
    table = rows_markdown(rows, metric, fp32_latency, fp32_size)
    md = [f"# {title}", "", *summary, "", table, ""]
    for heading, t in tables:
        md += [f"## {heading}", "", t, ""]
    for caption, img in images:
        md += [f"![{caption}]({img.name})", ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    if page is not None:
        atomic_write_text(out / "report.html", page)


def plot_attribution(kinds: dict[str, dict[str, float]], path: Path) -> None:
    """Stacked bars, one per plan: milliseconds in int8 kernels, float ops and Q/DQ glue (ORT's
    per-node profile), so the reader sees what an INT8 plan saved and what its glue cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"int8 kernel": "#2166ac", "float op": "#bbbbbb", "Q/DQ glue": "#d6604d"}
    names = list(kinds)
    fig, ax = plt.subplots(figsize=(7, 0.55 * len(names) + 1.4))
    left = [0.0] * len(names)
    for kind, color in colors.items():
        widths = [kinds[n].get(kind, 0.0) for n in names]
        ax.barh(names, widths, left=left, color=color, label=kind)
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel("ms per batch (ONNX Runtime per-node profile)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


def forms_line(profile) -> str:
    """How patterns without an int8 kernel run in this model's int8 regions, and the timings that chose it."""
    parts = []
    for pattern, form in sorted(profile.forms.items()):
        ms = profile.meta.get("form_ms", {}).get(pattern, {})
        timed = ", ".join(f"{f} {v:.2f} ms" for f, v in ms.items())
        parts.append(f"{pattern} {form}" + (f" (all-INT8 model: {timed})" if timed else ""))
    return "Forms inside int8 regions, measured: " + "; ".join(parts) + "."


def recovery_line(plan, pairs: int) -> str:
    """What accuracy recovery the chosen plan uses, out of what the model offers."""
    cle = sum("cle" in c.recovery for c in plan.layers.values() if c.quantized)
    bias = len(plan.sidecar.means())
    if not plan.sidecar:
        return (f"Recovery: none in the chosen plan ({pairs} equalizable Conv pairs in the model; "
                f"{cle} layers chose equalization without their partner)." if cle else
                f"Recovery: none in the chosen plan ({pairs} equalizable Conv pairs in the model).")
    smoothed = sum("smooth" in c.recovery for c in plan.layers.values() if c.quantized)
    return (f"Recovery: {len(plan.sidecar.scales())} of {pairs} Conv pairs equalized, {smoothed} layers smoothed "
            f"({len(plan.sidecar.of('smooth'))} inputs), {bias} layers bias corrected "
            f"(arrays in plan.recovery.onnx, sha256 {plan.sidecar.sha256[:12]}).")


def layer_table(chosen, naive, profile) -> str:
    """One row per layer in graph order: op, MACs, sensitivity rank and SQNR, the measured INT8
    saving (glue included), naive's and the chosen plan's option, and whether it changed."""
    ranked = {x.name: (i, x) for i, x in enumerate(profile.layers, 1)}
    lines = ["| # | layer | name | op | MMACs | sensitivity rank (SQNR dB) | INT8 saves ms | naive | chosen | changed |",
             "|---:|---|---|---|---:|---:|---:|---|---|---|"]
    for k, name in enumerate(chosen.layers, 1):
        note = chosen.notes.get(name)
        rank, x = ranked.get(name, (None, None))
        sens = "" if x is None else f"{rank}/{len(ranked)} ({x.output_sqnr:.1f})"
        saves = "" if x is None else f"{x.gain_ms:+.3f}"
        macs = "" if x is None else f"{x.macs / 1e6:.2f}"
        a, b = naive.choice(name).label(), chosen.choice(name).label()
        lines.append(f"| {k} | {name} | {note.readable if note else ''} | {note.op if note else ''} | {macs} | {sens} | "
                     f"{saves} | {a} | {b} | {'yes' if a != b else ''} |")
    return "\n".join(lines)


def fusion_table(checks) -> str:
    """(plan name, `scoring.FusionCheck`) pairs: what ONNX Runtime's optimizer fused."""
    lines = ["| plan | int8 kernels | Q/DQ left unfused | int8 kernels by op |", "|---|---:|---:|---|"]
    for name, f in checks:
        by_op = ", ".join(f"{op} {n}" for op, n in f.ops.items() if op.startswith(("QLinear", "QGemm", "MatMulInteger",
                                                                                     "ConvInteger")))
        lines.append(f"| {name} | {f.int8_kernels} | {f.unfused_qdq} | {by_op} |")
    return "\n".join(lines)


def attribution_table(kinds: dict[str, dict[str, float]]) -> str:
    """Per-kind milliseconds (int8 kernels, float ops, Q/DQ glue) of each plan, from ORT's profile."""
    from qsearch.analysis.profiling import KINDS

    lines = ["| plan | " + " | ".join(f"{k} ms" for k in KINDS) + " | total ms |", "|---|" + "---:|" * (len(KINDS) + 1)]
    for name, k in kinds.items():
        lines.append(f"| {name} | " + " | ".join(f"{k[x]:.3f}" for x in KINDS) + f" | {sum(k.values()):.3f} |")
    return "\n".join(lines)


def finalists_table(rows: Sequence[Row], metric: str, fp32: Row) -> str:
    """The search's finalists that did not ship: their final-stage time and drop, and why each lost."""
    lines = [f"| finalist | {metric} drop (search) | best ms | rounds | why it did not ship |", "|---|---:|---:|---:|---|"]
    if not rows:
        return "\n".join([*lines, "| (none) | | | | no other finalist: the plans compared are in the table above |"])
    for r in rows:
        drop = r.interval or fmt_drop(fp32.search_score - r.search_score)  # the interval's text starts with the drop
        lines.append(f"| {r.name} | {drop} | {r.latency_ms:.3f} | {sum(map(math.isfinite, r.wall_rounds))} | {r.why} |")
    return "\n".join(lines)
