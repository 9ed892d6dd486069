"""Reviewing plans: a terminal table of one plan (`qsearch show`) and what changed between two
(`qsearch diff`), per layer, so a deployment team can read a plan in a pull request."""

from __future__ import annotations

from dataclasses import dataclass

from qsearch.errors import QsearchError
from qsearch.plan.format import Plan


@dataclass(frozen=True)
class LayerChange:
    layer: str
    readable: str
    before: str  # option label: 'int8/entropy/per_channel', 'fp32'
    after: str
    ranges: tuple[tuple[str, tuple[float, float] | None, tuple[float, float] | None], ...] = ()

    @property
    def option_changed(self) -> bool:
        return self.before != self.after


@dataclass(frozen=True)
class PlanDiff:
    header: tuple[tuple[str, str, str], ...]  # (field, before, after) of plan-wide settings that differ
    layers: tuple[LayerChange, ...]  # only layers whose option or ranges differ, in graph order

    @property
    def same(self) -> bool:
        return not self.header and not self.layers


def _label(plan: Plan, name: str) -> str:
    return plan.choice(name).label()


def _readable(a: Plan, b: Plan, name: str) -> str:
    for p in (b, a):
        note = p.notes.get(name)
        if note is not None and note.readable:
            return note.readable
    return ""


def _tensors(plan: Plan, name: str) -> tuple[str, ...]:
    note = plan.notes.get(name)
    return note.tensors if note is not None else ()


def diff(a: Plan, b: Plan, where: tuple[str, str] = ("A", "B")) -> PlanDiff:
    """Per-layer differences of two plans for the same model: option changes, then the ranges of
    int8 layers that changed (a re-calibration). Plans for different models are refused."""
    if a.fingerprint != b.fingerprint:
        raise QsearchError(f"{where[1]}: plan is for model '{b.model_name}' ({b.fingerprint}), {where[0]} for "
                           f"'{a.model_name}' ({a.fingerprint}): a per-layer diff needs plans of one model")
    def dflt(p: Plan) -> str:
        return "(every layer listed)" if p.defaults is None else p.defaults.label()

    # partial plans (schema 1, hand-written) leave unlisted layers to `defaults`: a change there is shown
    # as such, unless one plan lists every layer (schema 2): then the per-layer comparison below covers
    # every layer, and two plans that build the same model are the same
    complete = a.defaults is None or b.defaults is None
    header = tuple((k, str(x), str(y)) for k, x, y in (("target", a.target, b.target),
                                                       ("calibration.percentile", a.percentile, b.percentile),
                                                       ("defaults", dflt(a), dflt(a) if complete else dflt(b)),
                                                       *((f"forms.{k}", a.form(k), b.form(k))
                                                         for k in sorted({*a.forms, *b.forms})),
                                                       ("recovery sidecar", _sidecar(a), _sidecar(b))) if x != y)
    names = list(a.layers) + [n for n in b.layers if n not in a.layers]
    changes = []
    for name in names:
        before, after = _label(a, name), _label(b, name)
        ranges = []
        if a.choice(name).quantized and b.choice(name).quantized:
            for t in dict.fromkeys((*_tensors(a, name), *_tensors(b, name))):
                ra, rb = a.ranges.get(t), b.ranges.get(t)
                if ra != rb:
                    ranges.append((t, ra, rb))
        if before != after or ranges:
            changes.append(LayerChange(name, _readable(a, b, name), before, after, tuple(ranges)))
    return PlanDiff(header, tuple(changes))


def _sidecar(p: Plan) -> str:
    """What the plan's recovery arrays are, briefly (a change of factors without a change of option
    is a re-calibration, and diff says so)."""
    if not p.sidecar:
        return "none"
    return f"{len(p.sidecar.scales())} equalized pairs, {len(p.sidecar.of('smooth'))} smoothed inputs, " \
           f"{len(p.sidecar.means())} bias corrections (sha256 {p.sidecar.sha256[:12]})"


def _fmt_range(r: tuple[float, float] | None) -> str:
    return "-" if r is None else f"[{r[0]:.4g}, {r[1]:.4g}]"


def diff_text(d: PlanDiff, where: tuple[str, str] = ("A", "B")) -> str:
    if d.same:
        return f"{where[0]} and {where[1]}: the same choices and ranges for every layer"
    lines = [f"--- {where[0]}", f"+++ {where[1]}"]
    lines += [f"{k}: {x} -> {y}" for k, x, y in d.header]
    moved = [c for c in d.layers if c.option_changed]

    def width(label: str) -> str:  # int8, int16 or float
        return label.split("/")[0] if label.startswith(("int8/", "int16/")) else "float"

    counts = {w: sum(width(c.after) == w for c in moved if width(c.before) != w) for w in ("int8", "int16", "float")}
    same = len(moved) - sum(counts.values())
    lines.append(f"{len(moved)} layer(s) changed option ({counts['int8']} to INT8, "
                 + (f"{counts['int16']} to int16, " if counts["int16"] else "")
                 + f"{counts['float']} to float, {same} option changes at the same precision); "
                 f"{sum(bool(c.ranges) for c in d.layers)} quantized layer(s) with other ranges")
    rows = [("layer", "name", "before", "after", "ranges")]
    for c in d.layers:
        rng = "; ".join(f"{t} {_fmt_range(x)} -> {_fmt_range(y)}" for t, x, y in c.ranges)
        rows.append((c.layer, c.readable, c.before, c.after if c.option_changed else "(same)", rng))
    return "\n".join(lines + [""] + _table(rows))


def show_text(plan: Plan, why_width: int = 70) -> str:
    """The plan as a reviewer reads it: header, then one row per layer in graph order."""
    lines = [f"plan for '{plan.model_name}' ({plan.fingerprint}{', ' + plan.model_file if plan.model_file else ''}), "
             f"target {plan.target}"]
    n8 = sum(c.precision == "int8" for c in plan.layers.values())
    n16 = sum(c.precision == "int16" for c in plan.layers.values())
    lines.append(f"{len(plan.layers)} layers listed: {n8} INT8, " + (f"{n16} int16, " if n16 else "")
                 + f"{len(plan.layers) - n8 - n16} float"
                 + ("" if plan.defaults is None else f"; layers not listed: {plan.defaults.label()}"))
    figures = plan.figures.text()
    if figures:
        lines.append(figures)
    if plan.sidecar:
        lines.append(f"recovery: {_sidecar(plan)}")
    if plan.forms:
        lines.append("forms (measured, inside int8 regions): " + ", ".join(f"{k} {v}" for k, v in sorted(plan.forms.items())))
    prov = plan.provenance
    made = ", ".join(f"{k} {prov[k]}" for k in ("created", "qsearch", "onnxruntime", "study", "trial", "baseline")
                     if prov.get(k) is not None)
    if made:
        lines.append(f"made: {made}")
    rows = [("#", "layer", "name", "op", "precision", "calibration", "granularity", "recovery", "why")]
    for k, (name, c) in enumerate(plan.layers.items(), 1):
        note = plan.notes.get(name)
        weighted = note.weighted if note is not None else True
        why = note.why if note is not None else ""
        rows.append((str(k), name, note.readable if note else "", note.op if note else "", c.precision,
                     c.calibration if c.quantized else "", c.granularity if c.quantized and weighted else "",
                     c.recovery if c.recovery != "none" else "", why if len(why) <= why_width else why[:why_width - 3] + "..."))
    return "\n".join(lines + [""] + _table(rows))


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out
