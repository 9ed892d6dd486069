"""The recovery side of a plan: which layers read smoothed inputs, the arrays that go into the
sidecar, the reviewer's note per layer, and the check that the recovery a plan's layers ask for
exists in the model (`check` checks the sidecar's arrays against it)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from qsearch.errors import PlanError
from qsearch.model.load import PreparedModel
from qsearch.plan.format import LayerChoice
from qsearch.recovery.equalization import RecoveryStats, correctable
from qsearch.recovery.smoothing import Smoothing, find_groups, fold_target
from qsearch.recovery.techniques import BUILT_IN, split, technique, uses


def smoothed_layers(choices: Mapping[str, LayerChoice]) -> set[str]:
    """INT8 layers that read their group's smoothed input (`smoothing`) instead of the tensor."""
    return {n for n, c in choices.items() if c.quantized and uses(c.recovery, "smooth")}


def chosen_smoothing(rec: RecoveryStats, full: Mapping[str, LayerChoice]) -> dict[str, Smoothing]:
    """Input tensor -> the factors this plan uses, for each group with a smoothed member: alpha
    for per-tensor weights where every smoothed member is per-tensor, else for per-channel."""
    smoothed = smoothed_layers(full)
    have = {n for sm in rec.smoothing.values() for n in sm.group.layers}
    if smoothed - have:
        name = sorted(smoothed - have)[0]
        raise PlanError(f"no smoothing factors for layer '{name}': smoothing was not computed for it "
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
            raise PlanError(f"{path}: layer '{la.name}' ({la.op_type}) asks for recovery cle but has no "
                               "equalization partner (Conv -> Relu/Clip(0, hi)/nothing -> Conv, the middle tensor "
                               "read by the second Conv alone)")
        if uses(c.recovery, "bias") and not correctable(la):
            raise PlanError(f"{path}: layer '{la.name}' ({la.op_type}) asks for recovery bias but bias "
                               "correction needs a Conv or Gemm with a weight, or a MatMul with a weight and a bias Add")
        if uses(c.recovery, "smooth"):
            if la.name not in smoothable:
                raise PlanError(f"{path}: layer '{la.name}' ({la.op_type}) asks for recovery smooth but smoothing "
                                   "needs a MatMul or Gemm with a 2-D weight of its own")
            if c.calibration != "minmax":
                raise PlanError(f"{path}: layer '{la.name}' asks for recovery smooth with calibration "
                                   f"{c.calibration}: a smoothed input's range is MinMax (use calibration minmax)")
        for name in split(c.recovery):  # a registered technique's own rule
            t = technique(name)
            if name not in BUILT_IN and (not la.has_weight or (t.applies is not None and not t.applies(la))):
                raise PlanError(f"{path}: layer '{la.name}' ({la.op_type}) asks for recovery {name}, which does "
                                "not apply to it")
