"""SmoothQuant as a plan option: activation outliers migrated into the weights of MatMul/Gemm.

A transformer's MatMul inputs have a few channels ~10-20x larger than the rest (MiniLM: LayerNorm
outputs up to 30 where the median channel reaches 1.9, GELU outputs up to 25): one per-tensor
uint8 scale then spends its levels on them. Smoothing divides input channel c by s_c and
multiplies the weight's matching row by s_c, which computes the same product in float, with
s_c = absmax(x_c)^alpha / absmax(w_c)^(1 - alpha).

A *group* is one activation tensor and the weight MatMul/Gemm layers that read it (a LayerNorm's
q, k and v projections): its factors are computed once from all members' weights, so each member
decides alone whether to read the smoothed tensor (one Mul, or folded into a LayerNormalization's
scale and bias when every reader of the tensor is smoothed), and the group's smoothed tensor is
quantized once. alpha is chosen per group by the expected output noise of uniform quantization,
from the calibration pass's per-channel statistics (no extra pass), once for per-channel and once
for per-tensor weights (per-tensor weights take far less range: MiniLM's best alphas are 0.7-0.8
per-channel, lower per-tensor); a plan uses the per-tensor factors where every smoothed reader of
the tensor has per-tensor weights. The smoothed tensor's range
is MinMax, exact from per-channel minima and maxima: smoothing options use MinMax calibration.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from qsearch.calibration import ChannelStats
from qsearch.model.load import Layer, PreparedModel, node_reads

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # migration strengths tried per group (SmoothQuant: 0.5 typical)
SCALE_LIMIT = 1e4


@dataclass(frozen=True)
class Group:
    """An activation tensor and the weight MatMul/Gemm layers reading it as their input."""

    tensor: str
    layers: tuple[str, ...]


@dataclass(frozen=True)
class Smoothing:
    """One group's factors: readers of the smoothed tensor see x / scales; `lo, hi`: its range."""

    group: Group
    alpha: float
    scales: np.ndarray
    lo: float
    hi: float


def input_axis(layer: Layer) -> int:
    """The weight axis that meets the input's channels (MatMul (K, N): 0; Gemm transB: 1)."""
    return 1 - layer.weight_axis


def find_groups(prepared: PreparedModel) -> tuple[Group, ...]:
    """Every tensor read as the input of a 2-D weight MatMul/Gemm whose weight nothing else reads."""
    reads: dict[str, int] = {}
    for n in prepared.proto.graph.node:
        for t in node_reads(n):
            reads[t] = reads.get(t, 0) + 1
    dims = {i.name: tuple(i.dims) for i in prepared.proto.graph.initializer}
    members: dict[str, list[str]] = {}
    for la in prepared.layers:
        if la.op_type in ("MatMul", "Gemm") and la.weight and len(dims[la.weight]) == 2 and reads.get(la.weight) == 1:
            members.setdefault(la.activations[0], []).append(la.name)
    return tuple(Group(t, tuple(names)) for t, names in members.items())


def oriented(layer: Layer, w: np.ndarray) -> np.ndarray:
    """The weight as (input channels, outputs)."""
    return w if input_axis(layer) == 0 else w.T


def scales_for(absmax: np.ndarray, w_absmax: np.ndarray, alpha: float) -> np.ndarray:
    a, w = absmax.astype(np.float64), w_absmax.astype(np.float64)
    ok = (a > 0) & (w > 0)
    s = np.where(ok, np.power(np.where(ok, a, 1.0), alpha) / np.power(np.where(ok, w, 1.0), 1 - alpha), 1.0)
    return np.clip(s, 1 / SCALE_LIMIT, SCALE_LIMIT).astype(np.float32)


def smoothed_range(chan: ChannelStats, s: np.ndarray) -> tuple[float, float]:
    """MinMax range of x / s, zero included (uint8 activations keep an exact zero)."""
    return float(min(0.0, (chan.min / s).min())), float(max(0.0, (chan.max / s).max()))


def output_noise(ws: list[np.ndarray], chan: ChannelStats, s: np.ndarray, per_channel: bool) -> float:
    """Expected squared output error summed over the outputs, uniform-rounding model: activation
    steps through the scaled weights plus weight steps through the smoothed inputs' power."""
    s64 = s.astype(np.float64)
    lo, hi = smoothed_range(chan, s)
    step_x = (hi - lo) / 255
    power = float((chan.square.astype(np.float64) / s64**2).sum())
    total = 0.0
    for w in ws:
        ws_ = w.astype(np.float64) * s64[:, None]
        total += step_x**2 / 12 * float((ws_**2).sum())
        top = np.abs(ws_).max(axis=0) if per_channel else np.full(ws_.shape[1], np.abs(ws_).max())
        total += float(((top / 127) ** 2 / 12).sum()) * power
    return total


def choose(group: Group, prepared: PreparedModel, chan: ChannelStats, per_channel: bool) -> Smoothing:
    """The alpha (of `ALPHAS`) whose factors leave the least expected output noise."""
    inits = {i.name: i for i in prepared.proto.graph.initializer}
    layers = [prepared.layer(n) for n in group.layers]
    ws = [oriented(la, numpy_helper.to_array(inits[la.weight]).astype(np.float32)) for la in layers]
    w_absmax = np.max([np.abs(w).max(axis=1) for w in ws], axis=0)
    best = min(ALPHAS, key=lambda a: output_noise(ws, chan, scales_for(chan.absmax, w_absmax, a), per_channel))
    s = scales_for(chan.absmax, w_absmax, best)
    return Smoothing(group, best, s, *smoothed_range(chan, s))


def compute(prepared: PreparedModel, channels: Mapping[str, ChannelStats], per_channel: bool) -> dict[str, Smoothing]:
    """Every group's smoothing (tensor -> Smoothing); groups whose statistics do not match the
    weights (a dynamic shape the calibration did not see) are left out."""
    out = {}
    for g in find_groups(prepared):
        chan = channels.get(g.tensor)
        if chan is not None and chan.absmax.size == width(prepared, g):
            out[g.tensor] = choose(g, prepared, chan, per_channel)
    return out


def scaled_weight(layer: Layer, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The weight with its input rows multiplied by s (float64 maths)."""
    shape = [1, 1]
    shape[input_axis(layer)] = -1
    return (w.astype(np.float64) * s.astype(np.float64).reshape(shape)).astype(np.float32)


def fold_target(prepared: PreparedModel, group: Group, smoothed: set[str]) -> onnx.NodeProto | None:
    """The LayerNormalization that can take the divisor into its scale and bias (no Mul): it
    writes the tensor, over the last axis, from initializers nothing else reads, and every reader
    of the tensor is a smoothed member (a residual Add reading it too needs the original)."""
    g = prepared.proto.graph
    members = {prepared.layer(n).nodes[0] for n in group.layers if n in smoothed}
    readers = [n for n in g.node if group.tensor in node_reads(n)]
    if not members or any(n.name not in members for n in readers) or group.tensor in {o.name for o in g.output}:
        return None
    prod = next((n for n in g.node if group.tensor in n.output), None)
    if prod is None or prod.op_type != "LayerNormalization" or prod.output[0] != group.tensor:
        return None
    if len([t for t in prod.output if t]) != 1 or _int_attr(prod, "axis", -1) != -1:
        return None
    inits = {i.name: i for i in g.initializer}
    params = [t for t in prod.input[1:3] if t]
    k = width(prepared, group)
    for t in params:
        if t not in inits or list(inits[t].dims) != [k] or sum(t in node_reads(n) for n in g.node) != 1:
            return None
    return prod


def _int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def width(prepared: PreparedModel, group: Group) -> int:
    """The group's channel count (the weights' input width)."""
    k = prepared.layer(group.layers[0])
    return int(next(i.dims[input_axis(k)] for i in prepared.proto.graph.initializer if i.name == k.weight))
