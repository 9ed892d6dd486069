"""Fold constant affine ops (Mul/Add by a scalar or per-channel constant) into the Conv next to
them, before anything is quantized.

Exporters write learnable scales as their own ops: PP-LCNetV3 (the PP-OCRv4 backbones) wraps
every Conv and activation in `x * a + b` with scalar a, b. ONNX Runtime's own fusions skip
them (its ConvMulFusion takes only a true scalar or a [C, 1, 1] constant in the second input;
paddle2onnx writes a [1] constant first). Left in the graph, each becomes a QLinearMul/QLinearAdd
of its own: a second rounding of a tensor its Conv already rounded (on the hard-pages detector
one such pair cost 0.1 box F1) and a kernel that costs time. Folded, the Conv computes them.

Every fold is exact up to float rounding:
- Conv -> Mul(k) / Add(k), k per output channel: scale the weight and bias / shift the bias;
- Mul(k) -> Conv, k a scalar: scale the weight (zero padding stays zero);
- Add(k) -> Conv, k a scalar, Conv unpadded: bias += k * sum(W) per output channel (with padding
  the border would see 0 instead of k, so a padded Conv keeps its Add);
- Mul(c) -> Add(d) -> padded Conv: rewritten Add(d / c) -> Mul(c), so the scale still folds.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qsearch.model.layers import node_reads

_AFFINE = ("Mul", "Add")


def fold_affine(model: onnx.ModelProto) -> int:
    """Fold in place until nothing more folds; returns how many ops were removed. The index is
    rebuilt after every fold (0.8 s for the recognizer's 93): a fold rewrites the graph's repeated
    fields, which copies their protos, so any node or initializer held from before is detached."""
    before = len(model.graph.node)
    while True:
        g = _Graph(model.graph)
        if not any(n.op_type in _AFFINE and g.fold(n) for n in list(model.graph.node)):
            return before - len(model.graph.node)


class _Graph:
    """Readers, producers and float constants of one graph, as of now (rebuilt after each fold)."""

    def __init__(self, graph: onnx.GraphProto):
        self.g = graph
        self.inits = {i.name: i for i in graph.initializer}
        self.producer = {t: n for n in graph.node for t in n.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for t in node_reads(n):
                self.readers.setdefault(t, []).append(n)
        self.outputs = {o.name for o in graph.output}

    def fold(self, node: onnx.NodeProto) -> bool:
        split = self._split(node)
        if split is None:
            return False
        x, k = split
        conv = self.producer.get(x)
        if conv is not None and conv.op_type == "Conv" and self._only_reader(x, node) and self._own_params(conv):
            return self._into_producer(conv, node, k)
        convs = self.readers.get(node.output[0], [])
        if k.size != 1 or k.ndim > 1 or node.output[0] in self.outputs or not convs:
            return False  # a [1, 1, 1, 1] constant could widen x's rank: the Conv reads the widened tensor
        readers_ok = all(c.op_type == "Conv" and c.input[0] == node.output[0] and self._own_params(c) for c in convs)
        if readers_ok and (node.op_type == "Mul" or all(not _padded(c) for c in convs)):
            folded = [self._into_reader(c, node, float(k.reshape(-1)[0])) for c in convs]
            if all(_finite(*wb) for wb in folded):
                for c, (w, b) in zip(convs, folded):
                    self._set(c, w, b)
                self._drop(node, rename=(node.output[0], x))
                return True
        return self._reorder(node, x, k)

    def _split(self, node: onnx.NodeProto) -> tuple[str, np.ndarray] | None:
        """(activation, constant) of a float Mul/Add by a constant, else None."""
        ins = [t for t in node.input if t]
        if node.domain not in ("", "ai.onnx") or len(ins) != 2 or len(node.output) != 1:
            return None
        const = [t for t in ins if t in self.inits]
        if len(const) != 1 or self.inits[const[0]].data_type != onnx.TensorProto.FLOAT:
            return None
        k = numpy_helper.to_array(self.inits[const[0]])
        if not np.all(np.isfinite(k)) or (node.op_type == "Mul" and k.size == 1 and float(k.reshape(-1)[0]) == 0):
            return None
        return next(t for t in ins if t not in self.inits), k

    def _only_reader(self, t: str, node: onnx.NodeProto) -> bool:
        return t not in self.outputs and [r.name for r in self.readers.get(t, [])] == [node.name]

    def _own_params(self, conv: onnx.NodeProto) -> bool:
        """A float Conv whose weight (and bias) are initializers nothing else reads."""
        params = [t for t in conv.input[1:] if t]
        return bool(params) and all(t in self.inits and self.inits[t].data_type == onnx.TensorProto.FLOAT
                                    and len(self.readers.get(t, [])) == 1 for t in params)

    def _into_producer(self, conv: onnx.NodeProto, node: onnx.NodeProto, k: np.ndarray) -> bool:
        w = numpy_helper.to_array(self.inits[conv.input[1]])
        per = _per_channel(k, w.shape[0], w.ndim)
        if per is None:
            return False
        b = self._bias(conv, w)
        if node.op_type == "Mul":
            w = w * per.reshape(-1, *([1] * (w.ndim - 1)))
            b = b * per
        else:
            b = b + per
        w, b = w.astype(np.float32), b.astype(np.float32)
        if not _finite(w, b):
            return False
        self._set(conv, w, b)
        conv.output[0] = node.output[0]
        self._drop(node)
        return True

    def _into_reader(self, conv: onnx.NodeProto, node: onnx.NodeProto, k: float) -> tuple[np.ndarray, np.ndarray]:
        """The weight and bias of `conv` once it computes `node` (a scalar Mul/Add) on its input."""
        w = numpy_helper.to_array(self.inits[conv.input[1]])
        b = self._bias(conv, w)
        if node.op_type == "Mul":
            w = w * np.float32(k)
        else:
            b = b + k * w.reshape(w.shape[0], -1).sum(axis=1, dtype=np.float64)
        return w.astype(np.float32), b.astype(np.float32)

    def _reorder(self, mul: onnx.NodeProto, x: str, c: np.ndarray) -> bool:
        """Mul(c) -> Add(d) -> padded Conv(s) becomes Add(d / c) -> Mul(c): the scale then folds."""
        add = self.readers.get(mul.output[0], [None])[0]
        if mul.op_type != "Mul" or add is None or add.op_type != "Add" or not self._only_reader(mul.output[0], add):
            return False
        split = self._split(add)
        if split is None or split[1].size != 1 or split[1].ndim > 1 or add.output[0] in self.outputs:
            return False
        convs = self.readers.get(add.output[0], [])
        if not convs or not all(r.op_type == "Conv" and r.input[0] == add.output[0] and self._own_params(r)
                                for r in convs):
            return False
        d_name = next(t for t in add.input if t in self.inits)
        shifted = self._new_init(add.name + "_shift", (split[1] / c.reshape(-1)[0]).astype(np.float32))
        if len(self.readers.get(d_name, [])) == 1:
            self.g.initializer.remove(self.inits.pop(d_name))
        mid = mul.output[0]
        add.input[:] = [x, shifted]
        add.output[0], mul.output[0] = mid, add.output[0]
        mul.input[:] = [mid, next(t for t in mul.input if t in self.inits)]
        nodes = list(self.g.node)
        i, j = nodes.index(mul), nodes.index(add)
        nodes[i], nodes[j] = nodes[j], nodes[i]
        del self.g.node[:]
        self.g.node.extend(nodes)
        return True

    def _bias(self, conv: onnx.NodeProto, w: np.ndarray) -> np.ndarray:
        if len(conv.input) > 2 and conv.input[2]:
            return numpy_helper.to_array(self.inits[conv.input[2]]).astype(np.float64)
        return np.zeros(w.shape[0], dtype=np.float64)

    def _set(self, conv: onnx.NodeProto, w: np.ndarray, b: np.ndarray) -> None:
        self.inits[conv.input[1]].CopyFrom(numpy_helper.from_array(w, conv.input[1]))
        if len(conv.input) > 2 and conv.input[2]:
            self.inits[conv.input[2]].CopyFrom(numpy_helper.from_array(b, conv.input[2]))
        else:
            name = self._new_init(conv.name + "_bias", b)
            while len(conv.input) < 3:
                conv.input.append("")
            conv.input[2] = name

    def _new_init(self, base: str, value: np.ndarray) -> str:
        name, i = base, 0
        taken = set(self.inits) | set(self.producer) | {i.name for i in self.g.input}
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        t = numpy_helper.from_array(value, name)
        self.g.initializer.append(t)
        self.inits[name] = t
        return name

    def _drop(self, node: onnx.NodeProto, rename: tuple[str, str] | None = None) -> None:
        """Remove `node`; readers of its output read `rename[1]` instead, when given."""
        if rename is not None:
            for r in self.readers.get(rename[0], []):
                r.input[:] = [rename[1] if t == rename[0] else t for t in r.input]
        gone = {t for t in node.input if t in self.inits and len(self.readers.get(t, [])) == 1}
        self.g.node.remove(node)
        keep = [i for i in self.g.initializer if i.name not in gone]
        del self.g.initializer[:]
        self.g.initializer.extend(keep)
        stale = {node.output[0]} if rename is not None else set(node.input) - gone
        keep_vi = [v for v in self.g.value_info if v.name not in stale]
        del self.g.value_info[:]
        self.g.value_info.extend(keep_vi)


def _per_channel(k: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """k as one value per output channel of an N, C, spatial... tensor, or None when k broadcasts
    along any other axis (or would widen the output's rank)."""
    if k.size == 1 and k.ndim <= rank:
        return np.full(channels, float(k.reshape(-1)[0]))
    if k.ndim > rank or k.ndim < rank - 1 or k.size != channels:
        return None
    shape = (1,) * (rank - k.ndim) + k.shape
    return k.reshape(-1).astype(np.float64) if shape[1] == channels else None


def _finite(*arrays: np.ndarray) -> bool:
    return all(bool(np.all(np.isfinite(a))) for a in arrays)


def _padded(conv: onnx.NodeProto) -> bool:
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    return auto in ("SAME_UPPER", "SAME_LOWER") or any(int(p) != 0 for p in attrs.get("pads", []))
