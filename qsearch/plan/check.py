"""Checking a plan against a model, as `onnx.checker` checks a graph: the fingerprint, every layer
and tensor it names, what its int8 layers need, and the recovery it asks for (pairs, groups,
sidecar arrays of the right sizes). A function, not a method: the format knows no model."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from qsearch.errors import PlanError
from qsearch.model.load import PreparedModel
from qsearch.plan.build import allowed_granularities, inputs_of, quantized_tensors
from qsearch.plan.format import LayerChoice, Plan, closest
from qsearch.plan.recovery import check_recovery, smoothed_layers
from qsearch.recovery.equalization import active_pairs, find_pairs, input_channels
from qsearch.recovery.smoothing import find_groups, width
from qsearch.recovery.techniques import uses


def check_plan(plan: Plan, prepared: PreparedModel, path: str | os.PathLike = "plan") -> None:
    """Refuse a plan for another model, or one naming layers/tensors the model lacks."""
    if plan.fingerprint != prepared.fingerprint:
        raise PlanError(
            f"{path}: plan is for model '{plan.model_name}' ({plan.fingerprint}), "
            f"not for '{prepared.name}' ({prepared.fingerprint})"
        )
    if plan.preparation != prepared.preparation:
        raise PlanError(f"{path}: plan names layers of the graph of preparation {plan.preparation}, the model was "
                           f"prepared with {prepared.preparation}: prepare it with the plan's")
    known = set(prepared.layer_names)
    for name, c in plan.layers.items():
        if name not in known:
            raise PlanError(f"{path}: layer '{name}' does not exist in model '{prepared.name}'"
                               + closest(name, known))
        if c.precision == "fp16" and plan.target == "cpu":
            raise PlanError(f"{path}: layer '{name}' is fp16 but target '{plan.target}' runs float layers in FP32")
    tensors_of_model = {t for n in prepared.proto.graph.node for t in (*n.input, *n.output)} | \
        {i.name for i in prepared.proto.graph.input}
    for t in plan.ranges:  # a misspelled tensor's range would be ignored without a word
        if t not in tensors_of_model:
            raise PlanError(f"{path}: a range is given for tensor '{t}', which model '{prepared.name}' does "
                               "not have" + closest(t, tensors_of_model))
    patterns = {la.pattern for la in prepared.layers if la.pattern}
    for k in plan.forms:
        if k not in patterns:
            raise PlanError(f"{path}: forms.{k}: model '{prepared.name}' has no {k} pattern")
    absorbed = prepared.absorbed(plan.forms)
    smoothed = smoothed_layers({la.name: plan.choice(la.name) for la in prepared.layers})
    for layer in prepared.layers:
        c = plan.choice(layer.name)
        if c.quantized and layer.has_weight and c.granularity not in allowed_granularities(layer):
            raise PlanError(f"{path}: layer '{layer.name}' ({layer.op_type}) cannot be {c.precision} {c.granularity}: "
                               "ONNX Runtime's fused per-channel QGemm computes wrong results; use per_tensor")
        if c.quantized and layer.name not in absorbed:
            for t in (*inputs_of(layer, plan.forms, smoothed), *([] if layer.float_output else
                                                                   [layer.quantized_output(plan.forms)])):
                if t not in plan.ranges:
                    raise PlanError(f"{path}: no activation range for tensor '{t}' of int8 layer '{layer.name}'")
    tensors, _ = quantized_tensors(prepared, {la.name for la in prepared.layers if plan.choice(la.name).quantized},
                                   plan.forms, smoothed)
    for t in tensors:
        if t not in plan.ranges:
            raise PlanError(f"{path}: no activation range for tensor '{t}' (it feeds a value-moving op whose "
                               "output is quantized; plans record a range for it)")
    check_sidecar(plan, prepared, path)


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
            raise PlanError(f"{path}: layers '{p.head}' and '{p.tail}' are equalized (both int8 with cle) but the "
                               f"sidecar has no {want} scales for them")
    for head in scales:
        if head not in active:
            raise PlanError(f"{path}: the sidecar has equalization scales for layer '{head}', which this plan does "
                               "not equalize (its ranges were calibrated equalized): re-run optimize instead of "
                               "editing the pair's layers")
    absorbed = prepared.absorbed(plan.forms)
    wanted = {n for n, c in full.items() if c.quantized and uses(c.recovery, "bias") and n not in absorbed}
    for name in wanted:
        n = input_channels(prepared, prepared.layer(name))
        if name not in means or means[name].size != n:
            raise PlanError(f"{path}: layer '{name}' is bias corrected but the sidecar has no {n} input means "
                               "for it")
    for name in means:
        if name not in wanted:
            raise PlanError(f"{path}: the sidecar has input means for layer '{name}', which is not an int8 "
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
            raise PlanError(f"{path}: layer '{sorted(smoothed & set(g.layers))[0]}' is smoothed but the sidecar "
                               f"has no {n} smoothing factors and range for its input '{t}'")
    for t in {*factors, *ranges}:
        if t not in wanted:
            raise PlanError(f"{path}: the sidecar smooths tensor '{t}', which no int8 layer with recovery smooth "
                               "reads in this plan")


def _check_rounding(plan: Plan, prepared: PreparedModel, full: Mapping[str, LayerChoice], path) -> None:
    """Learned codes for exactly the INT8 layers with `round`, one per weight value."""
    codes = plan.sidecar.of("round")
    wanted = {n for n, c in full.items() if c.quantized and uses(c.recovery, "round")}
    sizes = {i.name: int(np.prod(i.dims)) for i in prepared.proto.graph.initializer}
    for name in wanted:
        la = prepared.layer(name)
        if la.weight is None:
            raise PlanError(f"{path}: layer '{name}' ({la.op_type}) asks for recovery round but has no weight "
                               "to round")
        if name not in codes or codes[name].size != sizes[la.weight]:
            raise PlanError(f"{path}: layer '{name}' has learned rounding but the sidecar has no "
                               f"{sizes[la.weight]} weight codes for it")
    for name in codes:
        if name not in wanted:
            raise PlanError(f"{path}: the sidecar has learned weight codes for layer '{name}', which is not an "
                               "int8 layer with recovery round" + closest(name, wanted))
