"""The recovery side of a plan: which layers read smoothed inputs, the arrays that go into the
sidecar, the reviewer's note per layer, and the checks that a plan's recovery and its sidecar agree
with each other and with the model (`apply` refuses anything else in one line)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from qsearch.errors import QsearchError
from qsearch.model import PreparedModel
from qsearch.plan import LayerChoice, Plan, closest
from qsearch.recovery import RecoveryStats, active_pairs, correctable, find_pairs, input_channels, uses
from qsearch.smoothing import Smoothing, find_groups, fold_target, width


def smoothed_layers(choices: Mapping[str, LayerChoice]) -> set[str]:
    """INT8 layers that read their group's smoothed input (`smoothing`) instead of the tensor."""
    return {n for n, c in choices.items() if c.is_int8 and uses(c.recovery, "smooth")}


def chosen_smoothing(rec: RecoveryStats, full: Mapping[str, LayerChoice]) -> dict[str, Smoothing]:
    """Input tensor -> the factors this plan uses, for each group with a smoothed member: alpha
    for per-tensor weights where every smoothed member is per-tensor, else for per-channel."""
    smoothed = smoothed_layers(full)
    have = {n for sm in rec.smoothing.values() for n in sm.group.layers}
    if smoothed - have:
        name = sorted(smoothed - have)[0]
        raise QsearchError(f"no smoothing factors for layer '{name}': smoothing was not computed for it "
                           "(the search space does not allow smooth, or its input has no per-channel statistics)")
    out = {}
    for tensor, sm in rec.smoothing.items():
        members = [n for n in sm.group.layers if n in smoothed]
        if members:
            per_tensor = all(full[n].granularity == "per_tensor" for n in members) and tensor in rec.smoothing_pt
            out[tensor] = rec.smoothing_pt[tensor] if per_tensor else sm
    return out


def smoothing_arrays(chosen: Mapping[str, Smoothing]) -> dict[str, np.ndarray]:
    """The factors and smoothed range of every group one of whose members reads it smoothed."""
    arrays = {}
    for tensor, sm in chosen.items():
        arrays[f"smooth/{tensor}"] = sm.scales
        arrays[f"smooth_range/{tensor}"] = np.array([sm.lo, sm.hi], np.float32)
    return arrays


def recovery_notes(prepared: PreparedModel, rec: RecoveryStats, full: Mapping[str, LayerChoice], active: list,
                   arrays: Mapping, chosen: Mapping[str, Smoothing]) -> dict[str, str]:
    """What each layer's recovery does in this plan, for the reviewer: equalized with whom and
    the scales' span, or dropped and why; smoothed with which alpha, factors, where the divisor
    goes; bias corrected from how many input means."""
    notes: dict[str, list[str]] = {}
    smoothed = smoothed_layers(full)
    for tensor, sm in chosen.items():
        members = [n for n in sm.group.layers if n in smoothed]
        s = arrays[f"smooth/{tensor}"]
        fold = fold_target(prepared, sm.group, set(members))
        where = f"folded into {fold.op_type} '{fold.name}'" if fold is not None else "one Mul inserted"
        for n in members:
            notes.setdefault(n, []).append(
                f"smoothed (alpha {sm.alpha:g}): {s.size} factors in [{float(s.min()):.3g}, {float(s.max()):.3g}], "
                f"input '{tensor}' shared by {len(members)} layer{'s' if len(members) > 1 else ''}, {where}")
    for p in rec.pairs:
        if p in active:
            s = arrays[f"equalize/{p.head}"]
            how = ", clip-aware: no calibration value clipped differently" if p.clip is not None and \
                np.isfinite(p.clip) else ""
            notes.setdefault(p.head, []).append(f"equalized with {p.tail}: {s.size} scales in "
                                                f"[{float(s.min()):.3g}, {float(s.max()):.3g}]{how}")
            notes.setdefault(p.tail, []).append(f"equalized with {p.head}")
        else:
            for me, other in ((p.head, p.tail), (p.tail, p.head)):
                if uses(full[me].recovery, "cle"):
                    notes.setdefault(me, []).append(f"equalization with {other} dropped: {other} is not int8 with cle")
    for name in full:
        if f"mean/{name}" in arrays:
            notes.setdefault(name, []).append(f"bias corrected from {arrays[f'mean/{name}'].size} input means")
    return {n: "; ".join(v) for n, v in notes.items()}


def check_recovery(prepared: PreparedModel, full: Mapping[str, LayerChoice], pairs, path) -> None:
    """A layer asking for recovery it cannot have: cle without a partner, bias without a weight,
    smooth without a weight MatMul/Gemm (or with a range that is not MinMax)."""
    partners = {n for p in pairs for n in (p.head, p.tail)}
    smoothable = {n for g in find_groups(prepared) for n in g.layers} \
        if any(uses(c.recovery, "smooth") for c in full.values()) else set()
    for la in prepared.layers:
        c = full.get(la.name)
        if c is None or c.recovery == "none":
            continue
        if uses(c.recovery, "cle") and la.name not in partners:
            raise QsearchError(f"{path}: layer '{la.name}' ({la.op_type}) asks for recovery cle but has no "
                               "equalization partner (Conv -> Relu/Clip(0, hi)/nothing -> Conv, the middle tensor "
                               "read by the second Conv alone)")
        if uses(c.recovery, "bias") and not correctable(la):
            raise QsearchError(f"{path}: layer '{la.name}' ({la.op_type}) asks for recovery bias but bias "
                               "correction needs a Conv or Gemm with a weight, or a MatMul with a weight and a bias Add")
        if uses(c.recovery, "smooth"):
            if la.name not in smoothable:
                raise QsearchError(f"{path}: layer '{la.name}' ({la.op_type}) asks for recovery smooth but smoothing "
                                   "needs a MatMul or Gemm with a 2-D weight of its own")
            if c.calibration != "minmax":
                raise QsearchError(f"{path}: layer '{la.name}' asks for recovery smooth with calibration "
                                   f"{c.calibration}: a smoothed input's range is MinMax (use calibration minmax)")


def check_sidecar(plan: Plan, prepared: PreparedModel, path) -> None:
    """The plan's recovery and its sidecar agree: scales for exactly the pairs it equalizes (their
    ranges were calibrated equalized), means for exactly its bias-corrected INT8 layers."""
    full = {la.name: plan.choice(la.name) for la in prepared.layers}
    pairs = find_pairs(prepared) if any(c.recovery != "none" for c in full.values()) or plan.sidecar else ()
    check_recovery(prepared, full, pairs, path)
    active = {p.head: p for p in active_pairs(pairs, full.__getitem__)}
    scales, means = plan.sidecar.scales(), plan.sidecar.means()
    for head, p in active.items():
        want = input_channels(prepared, prepared.layer(p.tail))
        if head not in scales or scales[head].size != want:
            raise QsearchError(f"{path}: layers '{p.head}' and '{p.tail}' are equalized (both int8 with cle) but the "
                               f"sidecar has no {want} scales for them")
    for head in scales:
        if head not in active:
            raise QsearchError(f"{path}: the sidecar has equalization scales for layer '{head}', which this plan does "
                               "not equalize (its ranges were calibrated equalized): re-run optimize instead of "
                               "editing the pair's layers")
    absorbed = prepared.absorbed(plan.forms)
    wanted = {n for n, c in full.items() if c.is_int8 and uses(c.recovery, "bias") and n not in absorbed}
    for name in wanted:
        n = input_channels(prepared, prepared.layer(name))
        if name not in means or means[name].size != n:
            raise QsearchError(f"{path}: layer '{name}' is bias corrected but the sidecar has no {n} input means "
                               "for it")
    for name in means:
        if name not in wanted:
            raise QsearchError(f"{path}: the sidecar has input means for layer '{name}', which is not an int8 "
                               "layer with bias correction" + closest(name, wanted))
    _check_smoothing(plan, prepared, full, path)
    _check_rounding(plan, prepared, full, path)


def _check_smoothing(plan: Plan, prepared: PreparedModel, full: Mapping[str, LayerChoice], path) -> None:
    """Factors and a range for exactly the groups the plan smooths, one factor per channel."""
    smoothed = smoothed_layers(full)
    factors, ranges = plan.sidecar.of("smooth"), plan.sidecar.of("smooth_range")
    groups = {g.tensor: g for g in find_groups(prepared)} if smoothed or factors or ranges else {}
    wanted = {t: g for t, g in groups.items() if smoothed & set(g.layers)}
    for t, g in wanted.items():
        n = width(prepared, g)
        if t not in factors or factors[t].size != n or t not in ranges:
            raise QsearchError(f"{path}: layer '{sorted(smoothed & set(g.layers))[0]}' is smoothed but the sidecar "
                               f"has no {n} smoothing factors and range for its input '{t}'")
    for t in {*factors, *ranges}:
        if t not in wanted:
            raise QsearchError(f"{path}: the sidecar smooths tensor '{t}', which no int8 layer with recovery smooth "
                               "reads in this plan")


def _check_rounding(plan: Plan, prepared: PreparedModel, full: Mapping[str, LayerChoice], path) -> None:
    """Learned codes for exactly the INT8 layers with `round`, one per weight value."""
    codes = plan.sidecar.of("round")
    wanted = {n for n, c in full.items() if c.is_int8 and uses(c.recovery, "round")}
    sizes = {i.name: int(np.prod(i.dims)) for i in prepared.proto.graph.initializer}
    for name in wanted:
        la = prepared.layer(name)
        if la.weight is None:
            raise QsearchError(f"{path}: layer '{name}' ({la.op_type}) asks for recovery round but has no weight "
                               "to round")
        if name not in codes or codes[name].size != sizes[la.weight]:
            raise QsearchError(f"{path}: layer '{name}' has learned rounding but the sidecar has no "
                               f"{sizes[la.weight]} weight codes for it")
    for name in codes:
        if name not in wanted:
            raise QsearchError(f"{path}: the sidecar has learned weight codes for layer '{name}', which is not an "
                               "int8 layer with recovery round" + closest(name, wanted))
