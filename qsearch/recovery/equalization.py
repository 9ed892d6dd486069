"""Accuracy recovery as per-layer plan options: cross-layer equalization, bias correction and
smoothing (`smoothing`).

Both are closed form, computed once from the calibration pass and stored with the plan, so `apply`
needs no data and trials never recompute them.

- **Equalization (CLE)** of a pair Conv A -> (Relu | Clip(0, hi) | nothing) -> Conv B whose middle
  tensor only B reads: A's output channel c is divided by s_c and B's matching input channel
  multiplied by it, s_c = sqrt(r1_c / r2_c) from the two weights' channel ranges, so both layers'
  weight ranges meet in the middle (depthwise convs with BatchNorm folded in have channels ~100x
  apart; per-tensor INT8 then rounds the small ones to nothing). Relu and nothing commute with a
  positive scale: the equalized float model computes what the original does. A Clip to [0, hi]
  (Relu6) does not: a channel scaled by 1/s is clipped at hi instead of hi/s. Equalization is then
  *clip-aware*: a channel that reaches hi on the calibration data keeps s = 1, the others get
  s >= max_c / hi, so no calibration value is clipped differently (exact on that data, and said so).
  The pair is one decision: it applies when both layers are INT8 and both choose it.
- **Bias correction**: the mean output error of a layer's quantized weights, (W_q - W) E[x], is
  removed from its bias, E[x] being the per-channel mean of its input on the calibration data.

The arrays (scales per equalized pair, input means per corrected layer) travel in the plan's
`Sidecar` (`plan.sidecar`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qsearch.calibration import CalibrationStats
from qsearch.model.load import Layer, PreparedModel, node_reads
from qsearch.recovery.smoothing import Smoothing, find_groups
from qsearch.recovery.techniques import uses

SCALE_LIMIT = 1e4  # equalization scales kept in [1/SCALE_LIMIT, SCALE_LIMIT]: no denormal weights


@dataclass(frozen=True)
class Pair:
    """Conv `head` -> optional Relu/Clip -> Conv `tail`; `tensors` scale by 1/s per channel."""

    head: str
    tail: str
    conv_out: str  # the head conv's output (before its activation)
    tensors: tuple[str, ...]  # conv_out and, with an activation, its output (the tail's input)
    clip: float | None  # the activation's upper bound (Relu6: 6.0); None: Relu or nothing, exact


def find_pairs(prepared: PreparedModel) -> tuple[Pair, ...]:
    """Every equalizable pair in graph order; weights read by another node are left alone."""
    g = prepared.proto.graph
    reads: dict[str, int] = {}
    for n in g.node:
        for t in node_reads(n):
            reads[t] = reads.get(t, 0) + 1
    by_name = {n.name: n for n in g.node}
    layers_by_input = {la.activations[0]: la for la in prepared.layers if la.op_type == "Conv" and la.activations}
    outputs = {o.name for o in g.output}
    pairs = []
    for a in prepared.layers:
        b = layers_by_input.get(a.output)
        if a.op_type != "Conv" or b is None or a.name == b.name or a.output in outputs or reads.get(a.output) != 1:
            continue
        if any(reads.get(t, 0) != 1 for t in (a.weight, a.bias, b.weight) if t):
            continue
        conv = by_name[a.nodes[0]]
        clip = _clip_bound(by_name[a.nodes[1]], prepared) if len(a.nodes) > 1 else None
        if clip == -1.0:  # an activation that does not commute with a channel scale
            continue
        head_w = next(i for i in g.initializer if i.name == a.weight)
        if int(head_w.dims[0]) != input_channels(prepared, b):
            continue
        tensors = tuple(dict.fromkeys((conv.output[0], a.output)))
        pairs.append(Pair(a.name, b.name, conv.output[0], tensors, clip))
    return tuple(pairs)


def _clip_bound(act: onnx.NodeProto, prepared: PreparedModel) -> float | None:
    """None for Relu; hi for Clip(0, hi) (inf: no upper bound); -1 for anything else."""
    if act.op_type == "Relu":
        return None
    inits = {i.name: i for i in prepared.proto.graph.initializer}

    def bound(k: int, attr: str, default: float) -> float | None:
        if len(act.input) > k and act.input[k]:
            if act.input[k] not in inits:
                return None
            v = numpy_helper.to_array(inits[act.input[k]])
            return float(v.reshape(-1)[0]) if v.size == 1 else None
        return next((float(helper.get_attribute_value(a)) for a in act.attribute if a.name == attr), default)

    lo, hi = bound(1, "min", -np.inf), bound(2, "max", np.inf)
    if lo != 0.0 or hi is None or not hi > 0:
        return -1.0
    return hi


def group(node: onnx.NodeProto) -> int:
    """A Conv's `group` attribute (1 when absent)."""
    return next((int(a.i) for a in node.attribute if a.name == "group"), 1)


def _tail_index(w2: np.ndarray, groups: int) -> list[tuple[slice, int]]:
    """For each input channel c of a grouped conv: (its output rows, its column in the weight)."""
    cin_g, cout_g = w2.shape[1], w2.shape[0] // groups
    return [(slice((c // cin_g) * cout_g, (c // cin_g + 1) * cout_g), c % cin_g) for c in range(cin_g * groups)]


def pair_scales(w1: np.ndarray, w2: np.ndarray, groups: int, clip: float | None,
                conv_max: np.ndarray | None) -> np.ndarray:
    """s per channel: sqrt(r1 / r2), clip-aware under a Clip(0, hi) (module docstring)."""
    r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1).astype(np.float64)
    r2 = np.array([np.abs(w2[rows, j]).max() for rows, j in _tail_index(w2, groups)], dtype=np.float64)
    s = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.where(r2 > 0, r2, 1.0)), 1.0)
    if clip is not None and np.isfinite(clip):
        top = np.asarray(conv_max, np.float64)
        s = np.where(top >= clip, 1.0, np.maximum(s, top / clip))
    return np.clip(s, 1 / SCALE_LIMIT, SCALE_LIMIT).astype(np.float32)


def _apply_pair(w: dict[str, np.ndarray], a: Layer, b: Layer, groups: int, s: np.ndarray) -> None:
    s64 = s.astype(np.float64)
    w[a.weight] = (w[a.weight] / s64.reshape(-1, *[1] * (w[a.weight].ndim - 1))).astype(np.float32)
    if a.bias:
        w[a.bias] = (w[a.bias] / s64).astype(np.float32)
    w2 = w[b.weight].astype(np.float64)
    for (rows, j), sc in zip(_tail_index(w2, groups), s64):
        w2[rows, j] *= sc
    w[b.weight] = w2.astype(np.float32)


def equalized_weights(prepared: PreparedModel, scales: Mapping[str, np.ndarray],
                      pairs: tuple[Pair, ...] | None = None) -> dict[str, np.ndarray]:
    """Initializer -> equalized array for the pairs in `scales` (head layer -> s). Each pair
    scales other axes of its weights, so the order they apply in does not matter. `pairs`: the
    model's (`find_pairs`), when the caller already has them."""
    pairs = {p.head: p for p in (find_pairs(prepared) if pairs is None else pairs)}
    nodes = {n.name: n for n in prepared.proto.graph.node}
    inits = {i.name: i for i in prepared.proto.graph.initializer}
    out: dict[str, np.ndarray] = {}
    for head, s in scales.items():
        p = pairs[head]
        a, b = prepared.layer(p.head), prepared.layer(p.tail)
        for t in (a.weight, a.bias, b.weight):
            if t and t not in out:
                out[t] = numpy_helper.to_array(inits[t]).astype(np.float32)
        _apply_pair(out, a, b, group(nodes[b.nodes[0]]), s)
    return out


def compute_scales(prepared: PreparedModel, conv_max: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Scales of every pair, in graph order, each computed on the weights the earlier pairs left
    (a chain A -> B -> C: B's output channels are equalized after its input channels)."""
    nodes = {n.name: n for n in prepared.proto.graph.node}
    inits = {i.name: i for i in prepared.proto.graph.initializer}
    w: dict[str, np.ndarray] = {}
    scales: dict[str, np.ndarray] = {}
    for p in find_pairs(prepared):
        a, b = prepared.layer(p.head), prepared.layer(p.tail)
        for t in (a.weight, a.bias, b.weight):
            if t and t not in w:
                w[t] = numpy_helper.to_array(inits[t]).astype(np.float32)
        groups = group(nodes[b.nodes[0]])
        s = pair_scales(w[a.weight], w[b.weight], groups, p.clip, conv_max.get(p.conv_out))
        _apply_pair(w, a, b, groups, s)
        scales[p.head] = s
    return scales


def equalized_model(prepared: PreparedModel, scales: Mapping[str, np.ndarray]) -> PreparedModel:
    """A copy of the prepared model (same layers and tensor names) with every pair in `scales`
    equalized; `prepared` is not touched."""
    import dataclasses

    new = equalized_weights(prepared, scales)
    proto = onnx.ModelProto()
    proto.CopyFrom(prepared.proto)
    for init in proto.graph.initializer:
        if init.name in new:
            init.CopyFrom(numpy_helper.from_array(new[init.name], init.name))
    return dataclasses.replace(prepared, proto=proto)


def bias_slot(layer: Layer) -> str:
    """Where a layer's corrected bias goes, the one place that decides it (the probe and the rewrite
    both ask): "add" (a MatMul's bias Add), "replace" (the kernel's own 1-D bias), "append" (a
    Conv or Gemm without a third input), or "" (nowhere: a Gemm whose C is 2-D or computed keeps
    it, and a fourth input would be invalid)."""
    if not layer.has_weight:
        return ""
    if layer.bias_add:
        return "add"
    if layer.op_type in ("Conv", "Gemm"):
        return "replace" if layer.bias else ("" if layer.third_input else "append")
    return ""


def correctable(layer: Layer) -> bool:
    """Bias correction needs a weight and a place for a bias (`bias_slot`)."""
    return bool(bias_slot(layer))


def bias_delta(layer: Layer, w: np.ndarray, w_deq: np.ndarray, mean: np.ndarray, groups: int = 1) -> np.ndarray:
    """-(W_q - W) E[x] per output channel (float64 maths, float32 result). Conv: summed over the
    kernel, padding ignored; Gemm and MatMul: along the weight's input axis."""
    dw = w_deq.astype(np.float64) - w.astype(np.float64)
    m = mean.astype(np.float64)
    if layer.op_type == "Conv":
        per_in = dw.reshape(dw.shape[0], dw.shape[1], -1).sum(axis=2)  # (cout, cin/groups)
        cout_g, cin_g = dw.shape[0] // groups, dw.shape[1]
        delta = np.array([per_in[o] @ m[(o // cout_g) * cin_g:(o // cout_g + 1) * cin_g] for o in range(dw.shape[0])])
    else:  # Gemm, MatMul: weight (K, N) with axis 1 (MatMul; Gemm transB = 0), (N, K) with axis 0
        delta = m @ dw if layer.weight_axis == 1 else dw @ m
    return (-delta).astype(np.float32)


def input_channels(prepared: PreparedModel, layer: Layer) -> int:
    """How many input means bias correction of `layer` needs."""
    w = next(i for i in prepared.proto.graph.initializer if i.name == layer.weight)
    if layer.op_type == "Conv":
        node = next(n for n in prepared.proto.graph.node if n.name == layer.nodes[0])
        return int(w.dims[1]) * group(node)
    return int(w.dims[0] if layer.weight_axis == 1 else w.dims[1])


@dataclass(frozen=True)
class RecoveryStats:
    """What recovery options need, measured once after calibration: the pairs, their scales, the
    calibration statistics of the tensors between pairs in the equalized model (every pair
    equalized: exact, or clip-aware, so each pair's tensors are what they are when that pair alone
    is equalized), and that equalized float model (the analysis probes its layers)."""

    pairs: tuple[Pair, ...] = ()
    scales: Mapping[str, np.ndarray] = field(default_factory=dict)
    stats: CalibrationStats | None = None
    prepared: PreparedModel | None = None
    smoothing: Mapping[str, Smoothing] = field(default_factory=dict)  # input tensor -> its group's factors
    smoothing_pt: Mapping[str, Smoothing] = field(default_factory=dict)  # ... with alpha for per-tensor weights

    def smoothing_of(self, layer: str, granularity: str = "per_channel") -> Smoothing | None:
        """The layer's group's factors, alpha chosen for these weights' granularity."""
        variant = self.smoothing_pt if granularity == "per_tensor" and self.smoothing_pt else self.smoothing
        return next((s for s in variant.values() if layer in s.group.layers), None)

    def inside(self, active: list[Pair]) -> set[str]:
        return {t for p in active for t in p.tensors}


def active_pairs(pairs: tuple[Pair, ...], choice_of) -> list[Pair]:
    """Pairs equalized by these choices: both layers INT8, both with cle."""
    return [p for p in pairs if all(choice_of(n).quantized and uses(choice_of(n).recovery, "cle") for n in (p.head, p.tail))]


def channel_tensors(prepared: PreparedModel) -> dict[str, int]:
    """Tensors whose per-channel mean and max the calibration pass records (tensor -> axis): the
    inputs of layers bias correction may apply to, the conv outputs of pair heads, the inputs of
    smoothing groups."""
    out = {la.activations[0]: (1 if la.op_type == "Conv" else -1) for la in prepared.layers if correctable(la)}
    for p in find_pairs(prepared):
        out.setdefault(p.conv_out, 1)
    for g in find_groups(prepared):
        out.setdefault(g.tensor, -1)
    return out
