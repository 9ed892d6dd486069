"""Latency attribution: ONNX Runtime's per-node profile, grouped by layer and by kind of work.

Whether INT8 pays is a property of the kernels ONNX Runtime actually runs: a QLinearConv may be
twice as fast as its float Conv while the float glue around it (DequantizeLinear, an activation ORT
has no int8 kernel for, QuantizeLinear) costs more than the gain. Profiling the FP32 model and an
INT8 model once each and attributing every kernel to a layer measures that per layer, for the
price of two model runs.

Attribution works on names, which survive ORT's fusions as prefixes: a fused QLinearConv is
named after the Conv it replaced (plus a suffix such as `_token_3` or `_nchwc`), the rewriter names
each Q/DQ node after its tensor. A node with no known name (ORT-created glue) is charged to the
layer that ran just before it, which is where glue sits in a chain.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from qsearch.engine.base import Engine, NodeTime
from qsearch.model.load import PreparedModel

INT8_KERNELS = ("QLinear", "QGemm", "MatMulInteger", "ConvInteger", "DynamicQuantize", "QAttention")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
KINDS = ("int8 kernel", "float op", "Q/DQ glue")
OTHER = "(outside layers)"


@dataclass(frozen=True)
class LatencyProfile:
    """Per-layer and per-kind milliseconds of one model on one batch (means over runs)."""

    total_ms: float
    by_layer: Mapping[str, Mapping[str, float]]  # layer -> kind -> ms
    by_kind: Mapping[str, float]
    by_op: Mapping[str, float]

    def layer_ms(self, name: str) -> float:
        return float(sum(self.by_layer.get(name, {}).values()))


def kind_of(op_type: str) -> str:
    if op_type in QDQ_OPS:
        return "Q/DQ glue"
    if op_type.startswith(INT8_KERNELS):
        return "int8 kernel"
    return "float op"


def attribute(prepared: PreparedModel, times: Sequence[NodeTime]) -> LatencyProfile:
    """Group node times by layer (see module docstring) and by kind of work."""
    owner: dict[str, str] = {}
    for layer in prepared.layers:
        for n in layer.nodes:
            owner[n] = layer.name
    # Q/DQ nodes are named after their tensor (and ORT names some fused float kernels after their
    # output): a layer's output belongs to it, so does an input no other layer produces
    tensor_owner: dict[str, str] = {}
    for layer in prepared.layers:
        for t in layer.activations:
            tensor_owner.setdefault(t, layer.name)
    for layer in prepared.layers:
        tensor_owner[layer.output] = layer.name
    by_layer: dict[str, dict[str, float]] = {}
    by_kind = dict.fromkeys(KINDS, 0.0)
    by_op: dict[str, float] = {}
    current = OTHER
    for t in times:
        kind = t.kind or kind_of(t.op_type)
        layer = _match(t.name, owner, tensor_owner)
        if layer is None:
            # glue ORT created or a float op between layers: the chain's previous layer. Kept so on
            # purpose for a hardswish gate after a conv: FP32 fuses Conv+HardSwish, so the float gate
            # an int8 conv leaves behind is that conv's cost. Charging it to the hardswish layer
            # instead made PP-LCNet's plan 1.05x FP32 rather than 1.11x (measured, reverted).
            layer = current
        else:
            current = layer
        slot = by_layer.setdefault(layer, dict.fromkeys(KINDS, 0.0))
        slot[kind] += t.ms
        by_kind[kind] += t.ms
        by_op[t.op_type] = by_op.get(t.op_type, 0.0) + t.ms
    return LatencyProfile(sum(by_kind.values()), by_layer, by_kind, dict(sorted(by_op.items())))


def _match(name: str, owner: dict[str, str], tensor_owner: dict[str, str]) -> str | None:
    for suffix in ("_QuantizeLinear", "_DequantizeLinear"):
        base = name.split("/")[0]
        if base.endswith(suffix):
            return tensor_owner.get(base[: -len(suffix)])
    if name in owner:
        return owner[name]
    for table in (owner, tensor_owner):  # fused kernels keep a node's or its output's name as a prefix
        for n in sorted(table, key=len, reverse=True):
            if n and name.startswith(n) and name[len(n):len(n) + 1] in ("_", "/", ""):
                return table[n]
    return None


def profile(prepared: PreparedModel, model: onnx.ModelProto, feed: Mapping[str, np.ndarray], engine: Engine,
            runs: int = 5) -> LatencyProfile:
    """The engine's per-node profile of `model`, attributed to the layers of `prepared`."""
    return attribute(prepared, engine.profile(model, feed, runs))

