"""Choices per layer + calibration statistics -> a plan: which tensors get Q/DQ, which share a
scale, which calibration method each range comes from, and (with recovery) which pairs are
equalized and which statistics and arrays that implies. The plan *format* lives in `plan`."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import replace

from qsearch.calibration import GRANULARITIES, CalibrationStats, tensor_range
from qsearch.errors import PlanError
from qsearch.model.load import PASSTHROUGH_OPS, Layer, PreparedModel, node_reads
from qsearch.plan.format import LayerChoice, Plan, layer_notes
from qsearch.plan.recovery import (
    check_recovery,
    chosen_smoothing,
    recovery_notes,
    smoothed_layers,
    smoothing_arrays,
)
from qsearch.plan.sidecar import Sidecar
from qsearch.recovery.equalization import RecoveryStats, active_pairs, find_pairs
from qsearch.recovery.techniques import uses


def allowed_granularities(layer: Layer) -> tuple[str, ...]:
    """ONNX Runtime 1.32 fuses a per-channel Gemm into a QGemm that computes wrong results (17% of
    the output range on a 10-class head; its own quantize_static gives the same model), so Gemm
    layers are per-tensor only. A layer without a weight (Add, Concat...) has one activation scale
    per tensor: granularity means nothing there, and plans do not write it."""
    return ("per_tensor",) if layer.op_type == "Gemm" or not layer.has_weight else GRANULARITIES


def normalized(layer: Layer, choice: LayerChoice) -> LayerChoice:
    """The choice as this layer can take it: an allowed granularity; weight codes only with a weight."""
    if choice.quantized and choice.granularity not in allowed_granularities(layer):
        choice = LayerChoice(choice.precision, choice.calibration, allowed_granularities(layer)[0],
                             weights=choice.weights)
    if choice.weights != "int8" and not layer.has_weight:
        choice = replace(choice, weights="int8")
    return choice


def inputs_of(layer: Layer, forms: Mapping[str, str] | None, smoothed: Collection[str]) -> tuple[str, ...]:
    """The activations of an int8 layer that get Q/DQ under their own names (a smoothed layer's
    first input is its group's smoothed tensor, quantized by the rewriter)."""
    ins = layer.quantized_inputs(forms)
    return ins[1:] if layer.name in smoothed else ins


def tensor_methods(prepared: PreparedModel, choices: Mapping[str, LayerChoice],
                   forms: Mapping[str, str] | None = None) -> dict[str, str]:
    """Which activation tensors get Q/DQ, and with which layer's calibration method.

    A layer's method calibrates its *inputs*; a tensor feeding several int8 layers takes the first
    consumer's method (graph order). An int8 layer's output, needed for the fused kernel, takes
    its own method when no int8 layer consumes it.
    """
    methods: dict[str, str] = {}
    absorbed = prepared.absorbed(forms)
    smoothed = smoothed_layers(choices)
    for layer in prepared.layers:
        c = choices.get(layer.name)
        if c is not None and c.quantized and layer.name not in absorbed:
            for t in inputs_of(layer, forms, smoothed):
                methods.setdefault(t, c.calibration)
    for layer in prepared.layers:
        c = choices.get(layer.name)
        if c is not None and c.quantized and layer.name not in absorbed and not layer.float_output:
            methods.setdefault(layer.quantized_output(forms), c.calibration)
    return methods


def _moves_values(node) -> bool:
    """ORT drops the Q/DQ pair around Resize only in nearest mode (linear interpolation stays a
    float op between a DQ and a Q, measured on ORT 1.32)."""
    if node.op_type != "Resize":
        return True
    mode = next((a.s for a in node.attribute if a.name == "mode"), b"nearest")
    return mode == b"nearest"


def quantized_tensors(prepared: PreparedModel, int8_layers: set[str], forms: Mapping[str, str] | None = None,
                      smoothed: Collection[str] = ()) -> tuple[list[str], list[set[str]]]:
    """Which tensors get Q/DQ for these int8 layers, and which of them must share one scale.

    Every int8 layer's activations and output; then, through value-moving ops (MaxPool, Resize,
    Reshape, Slice...; `PASSTHROUGH_OPS`): an op whose output is quantized gets its input quantized
    too when every reader of that input is such an op with a quantized output (one Reshape; the
    q/k/v Slices of one Transpose), and all sides share one scale, so ONNX Runtime drops
    the Q/DQ pair and runs the op on uint8 instead of leaving a float island between two int8
    regions. Returns the tensors in graph order and the groups of tensors that share a scale.
    `smoothed`: layers whose first input is replaced by a smoothed tensor (`inputs_of`).
    """
    graph = prepared.proto.graph
    inits = {i.name for i in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for t in node_reads(node):
            readers[t] = readers.get(t, 0) + 1
    for o in graph.output:
        readers[o.name] = readers.get(o.name, 0) + 1
    quant: set[str] = set()
    absorbed = prepared.absorbed(forms)
    for layer in prepared.layers:
        if layer.name in int8_layers and layer.name not in absorbed:
            quant.update(inputs_of(layer, forms, smoothed))
            if not layer.float_output:
                quant.add(layer.quantized_output(forms))
    moves = [(n.input[0], [n.output[0]]) for n in graph.node
             if n.op_type in PASSTHROUGH_OPS and n.domain in ("", "ai.onnx") and n.input and n.input[0]
             and len(n.output) == 1 and n.input[0] not in inits and _moves_values(n)]
    # Split runs on uint8 when its input and *every* output share one scale (ORT's Split selector)
    splits = [(n.input[0], [t for t in n.output if t]) for n in graph.node
              if n.op_type == "Split" and n.domain in ("", "ai.onnx") and n.input and n.input[0] not in inits]
    links = [(x, y) for x, ys in moves + splits for y in ys]
    movers: dict[str, list[list[str]]] = {}  # tensor -> the outputs of each value-moving op reading it
    for x, ys in moves + splits:
        movers.setdefault(x, []).append(ys)
    changed = True
    while changed:  # backwards through chains of such ops (Reshape -> Transpose -> Reshape)
        changed = False
        for x, outs in movers.items():
            # every reader moves values into a quantized tensor (one Reshape; or q/k/v Slices of one
            # Transpose, as ORT's quantizer does): x joins them, so each op runs on uint8
            if x in quant or readers.get(x, 0) != len(outs):
                continue
            if (len(outs) == 1 and any(y in quant for y in outs[0])) or all(y in quant for ys in outs for y in ys):
                quant.add(x)
                changed = True
        for x, ys in splits:
            if x in quant and any(y in quant for y in ys) and not all(y in quant for y in ys):
                quant.update(ys)
                changed = True
    parent = {t: t for t in quant}

    def root(t: str) -> str:
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    for x, y in links:
        if x in quant and y in quant:
            parent[root(y)] = root(x)
    groups: dict[str, set[str]] = {}
    for t in quant:
        groups.setdefault(root(t), set()).add(t)
    order = {t: i for i, n in enumerate(graph.node) for t in n.output}
    ordered = sorted(quant, key=lambda t: (order.get(t, -1), t))
    return ordered, [g for g in groups.values() if len(g) > 1]


def build_plan(
    prepared: PreparedModel,
    choices: Mapping[str, LayerChoice],
    stats: CalibrationStats | None,
    target: str = "cpu",
    percentile: float = 99.99,
    forms: Mapping[str, str] | None = None,
    recovery: RecoveryStats | None = None,
) -> Plan:
    """Choices per layer (unnamed layers float) + calibration statistics -> a self-contained plan
    listing every layer in graph order. With recovery: the pairs both of whose layers choose
    equalization are equalized, their tensors take the equalized statistics, and the scales and
    the input means of bias-corrected layers go into the plan's sidecar."""
    float_precision = "fp32" if target == "cpu" else "fp16"
    full = {la.name: normalized(la, choices.get(la.name, LayerChoice(float_precision))) for la in prepared.layers}
    forms = {p: f for p, f in (forms or {}).items() if any(la.pattern == p for la in prepared.layers)}
    for name, owner in prepared.absorbed(forms).items():  # a fused pattern's gate follows the pattern
        full[name] = replace(normalized(prepared.layer(name), full[owner]), recovery="none")
    rec = recovery or RecoveryStats(find_pairs(prepared) if any(c.recovery != "none" for c in full.values()) else ())
    check_recovery(prepared, full, rec.pairs, "plan")
    active = active_pairs(rec.pairs, full.__getitem__)
    inside = rec.inside(active)

    def source(t: str) -> CalibrationStats | None:
        return rec.stats if t in inside else stats

    methods = tensor_methods(prepared, full, forms)
    ranges: dict[str, tuple[float, float]] = {}
    for t, method in methods.items():
        src = source(t)
        if src is None or t not in src.tensors:
            raise PlanError(f"no calibration statistics for tensor '{t}' (stale cache?)")
        ranges[t] = tensor_range(src.tensors[t], method, percentile)
    smoothed = smoothed_layers(full)
    _, groups = quantized_tensors(prepared, {n for n, c in full.items() if c.quantized}, forms, smoothed)
    for group in groups:  # one scale per group: the union of its members' ranges (nothing clipped)
        known = [ranges[t] for t in group if t in ranges]
        shared = (min(r[0] for r in known), max(r[1] for r in known))
        for t in group:
            ranges[t] = shared
    arrays = {f"equalize/{p.head}": rec.scales[p.head] for p in active}
    chosen = chosen_smoothing(rec, full)
    arrays.update(smoothing_arrays(chosen))
    absorbed = prepared.absorbed(forms)
    for la in prepared.layers:
        c = full[la.name]
        if c.quantized and uses(c.recovery, "bias") and la.name not in absorbed:
            t, src = la.activations[0], source(la.activations[0])
            if src is None or t not in src.channels:
                raise PlanError(f"no per-channel statistics for tensor '{t}' (stale cache?)")
            sm = chosen.get(t) if la.name in smoothed else None
            arrays[f"mean/{la.name}"] = src.channels[t].mean / (1 if sm is None else sm.scales)
    notes = layer_notes(prepared)
    for name, text in recovery_notes(prepared, rec, full, active, arrays, chosen).items():
        notes[name] = replace(notes[name], recovery=text)
    return Plan(
        model_name=prepared.name,
        fingerprint=prepared.fingerprint,
        target=target,
        layers=full,
        ranges=ranges,
        percentile=percentile,
        notes=notes,
        forms=forms,
        sidecar=Sidecar(arrays),
        preparation=prepared.preparation,
    )


def weight_copies(prepared: PreparedModel, plan: Plan) -> dict[str, tuple[str, ...]]:
    """Weights shared by INT8 layers that quantize them differently (per-tensor here, per-channel
    there): each form is stored, so the model grows. Weight -> its forms, for the report. (A
    shared weight is never equalized: pairs need weights of their own.)"""
    forms: dict[str, set[str]] = {}
    for la in prepared.layers:
        c = plan.choice(la.name)
        if la.weight and c.quantized:
            forms.setdefault(la.weight, set()).add(c.granularity.replace("_", "-"))
    return {w: tuple(sorted(f)) for w, f in forms.items() if len(f) > 1}
