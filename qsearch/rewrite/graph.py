"""The graph a rewrite edits: every name it creates unique (`Names`), producers and consumers,
Q/DQ insertion, quantized constants, FP16 regions, the final sort and sweep. Only `Rewriter`
(this package's `__init__`) drives it: the package is the one place graphs are edited."""

from __future__ import annotations

import heapq
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qsearch.errors import QsearchError
from qsearch.model.load import Layer, node_reads
from qsearch.rewrite.names import Names

MARK_DOMAIN = "qsearch"  # the custom domain of `EditGraph.mark` nodes (never in a model qsearch ships)

# Non-layer ops that may join an FP16 region when all their float inputs are already FP16.
FP16_FOLLOWERS = {
    "Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean", "Flatten", "Reshape",
    "Transpose", "Squeeze", "Unsqueeze", "Softmax", "Sigmoid", "Tanh", "Erf", "Gelu", "Div", "Sub", "Mul",
    "Add", "Concat", "LayerNormalization", "Identity", "Sqrt", "Pow",
}


class EditGraph:
    """A mutable view of a graph for one rewrite: nodes by name, producers, consumers."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.names = Names(model.graph)
        self.nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in model.graph.node]
        self.by_name = {n.name: n for n in self.nodes}
        self.position = {n.name: i for i, n in enumerate(self.nodes)}
        self.producer = {t: n for n in self.nodes for t in n.output}
        self.graph_inputs = {i.name for i in model.graph.input}
        self.graph_outputs = {o.name for o in model.graph.output}
        self.inits = {i.name: i for i in model.graph.initializer}
        self.new_inits: dict[str, TensorProto] = {}
        self._consts: dict[tuple, str] = {}  # quantized constants already added, by what they hold
        self.extra: list[onnx.NodeProto] = []
        self.min_opset = 0  # default-domain opset the rewritten ops need (HardSwish: 14)
        self.removed: set[str] = set()  # nodes a rewrite replaced (a fused pattern's tail)
        # nodes already dead in the source are the user's business: keep them. Sweeping them would
        # change which Conv ONNX Runtime fuses a residual Add into, and float results by a few ulps.
        used = set(self.graph_outputs)
        self.dead_in_source: set[str] = set()
        for n in reversed(self.nodes):
            if any(t in used for t in n.output):
                used.update(node_reads(n))
            else:
                self.dead_in_source.add(n.name)

    def node(self, name: str) -> onnx.NodeProto:
        return self.by_name[name]

    def order_of(self, tensor: str) -> int:
        p = self.producer.get(tensor)
        return -1 if p is None else self.position.get(p.name, len(self.nodes))

    @staticmethod
    def replace_input(node: onnx.NodeProto, old: str, new: str) -> None:
        for i, t in enumerate(node.input):
            if t == old:
                node.input[i] = new

    def fuse_hardswish(self, layer: Layer) -> None:
        """x * gate(x) as one HardSwish node (opset 14) under the Mul's name: between the DQ of x
        and the Q of the output it is one float op instead of a gate and a QLinearMul. The gate
        nodes lose their reader and are swept."""
        node = self.by_name[layer.name]
        node.op_type, node.domain = "HardSwish", ""
        del node.input[:]
        node.input.append(layer.activations[0])
        del node.attribute[:]
        if layer.tail:  # the /6 after the product: the HardSwish writes the tail's output instead
            out = self.by_name[layer.tail[-1]].output[0]
            self.removed.update(layer.tail)
            self.producer[out] = node
            node.output[0] = out
        self.min_opset = max(self.min_opset, 14)

    def _rename_inlined(self, nodes: list[onnx.NodeProto], inits: list[TensorProto]) -> list[TensorProto]:
        """ONNX Runtime inlines a HardSwish (no CPU kernel) into tensors named '_inlfunc_HardSwish_...'
        counting from zero in each session, and the prepared graph already holds such names from its
        own float optimization: a model with new HardSwish nodes would define them twice. Renamed in
        the written model only (plans keep the prepared graph's names)."""
        def fresh(t: str) -> str:
            return self.names.of(("inlined", t), f"qsearch{t}") if t.startswith("_inlfunc_") else t

        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in nodes for a in n.attribute):
            return inits  # a subgraph may read them by name: leave the graph as it is
        for n in nodes:
            for i, t in enumerate(n.input):
                n.input[i] = fresh(t)
            for i, t in enumerate(n.output):
                n.output[i] = fresh(t)
        out = []
        for init in inits:
            if init.name.startswith("_inlfunc_"):
                init = TensorProto.FromString(init.SerializeToString())
                init.name = fresh(init.name)
            out.append(init)
        return out

    def _init(self, name: str, array: np.ndarray) -> str:
        if name not in self.new_inits:
            self.new_inits[name] = numpy_helper.from_array(np.asarray(array), name)
        return name

    def set_initializer(self, name: str, array: np.ndarray) -> None:
        """A new value for an existing initializer, same name (a corrected bias, a LayerNorm scale
        with the smoothing divisor folded in); the caller knows nothing else reads it."""
        self.new_inits[name] = numpy_helper.from_array(np.ascontiguousarray(array, np.float32), name)

    def scale_channels(self, tensor: str, factors: np.ndarray) -> str:
        """A Mul of `tensor` by per-channel (last axis) factors, into a new tensor (returned)."""
        return self._channel_op("Mul", tensor, factors, "smoothed")

    def add_channels(self, tensor: str, values: np.ndarray) -> str:
        """An Add of per-channel (last axis) values to `tensor`, into a new tensor (returned)."""
        return self._channel_op("Add", tensor, values, "corrected")

    def _channel_op(self, op: str, tensor: str, values: np.ndarray, what: str) -> str:
        names = self.names
        out = names.fresh(f"{tensor}_{what}")
        fn = self._init(names.fresh(f"{tensor}_{what}_{op.lower()}"), np.ascontiguousarray(values, np.float32))
        self.extra.append(helper.make_node(op, [tensor, fn], [out], name=names.fresh(f"{tensor}_{op}_{what}")))
        self.producer[out] = self.extra[-1]
        return out

    def add_dequantized_init(self, base: str, q, scale, zp, axis: int | None, key: tuple | None = None) -> str:
        """A quantized constant behind its DequantizeLinear, once per `base` or `key` (a weight
        shared by layers is stored once); returns the dequantized tensor's name."""
        key = key or ("const", base)
        if key in self._consts:
            return self._consts[key]
        names = self.names
        out = names.fresh(f"{base}_dequantized")
        qn = self._init(names.fresh(f"{base}_quantized"), q)
        sn = self._init(names.fresh(f"{base}_scale"), scale if axis is not None else np.asarray(scale).reshape(()))
        zn = self._init(names.fresh(f"{base}_zero_point"), zp if axis is not None else np.asarray(zp).reshape(()))
        attrs = {"axis": axis} if axis is not None else {}
        self.extra.append(helper.make_node("DequantizeLinear", [qn, sn, zn], [out],
                                           name=names.fresh(f"{base}_DequantizeLinear"), **attrs))
        self._consts[key] = out
        return out

    def insert_qdq(self, tensor: str, scale: np.float32, zp: np.unsignedinteger) -> str:
        """Q/DQ after `tensor`; the DQ output keeps the tensor's name (see module docstring; a
        graph input's is new), returned. The zero point's dtype is the codes' (uint8; uint16 needs
        opset 21)."""
        names = self.names
        sn = self._init(names.fresh(f"{tensor}_scale"), np.asarray(scale, np.float32).reshape(()))
        zn = self._init(names.fresh(f"{tensor}_zero_point"), self._zero_point(zp))
        q_out, dq_out = names.fresh(f"{tensor}_quantized"), tensor
        src = tensor
        prod = self.producer.get(tensor)
        if prod is not None:
            src = names.fresh(f"{tensor}_prequant")
            for i, t in enumerate(prod.output):
                if t == tensor:
                    prod.output[i] = src
            self.producer[src] = prod
        elif tensor in self.graph_inputs:
            dq_out = names.fresh(f"{tensor}_dequantized")
            for n in self.nodes:
                self.replace_input(n, tensor, dq_out)
        else:
            raise QsearchError(f"cannot quantize tensor '{tensor}': it has no producer")
        self.extra.append(helper.make_node("QuantizeLinear", [src, sn, zn], [q_out],
                                           name=names.fresh(f"{tensor}_QuantizeLinear")))
        self.extra.append(helper.make_node("DequantizeLinear", [q_out, sn, zn], [dq_out],
                                           name=names.fresh(f"{tensor}_DequantizeLinear")))
        self.producer[dq_out] = self.extra[-1]
        return dq_out

    def mark(self, tensor: str, op: str, **attrs) -> None:
        """One node of the `qsearch` domain in place of a Q/DQ pair (the fine-tuning mirror's fake
        quantization, `Rewriter.training_graph`): it reads the producer's renamed output and writes
        `tensor`, so consumers read it exactly where they would read the DequantizeLinear; its
        `tensor` attribute keeps the plan's name (a graph input's mark writes a new one)."""
        src, out = tensor, tensor
        prod = self.producer.get(tensor)
        if prod is not None:
            src = self.names.fresh(f"{tensor}_prequant")
            for i, t in enumerate(prod.output):
                if t == tensor:
                    prod.output[i] = src
            self.producer[src] = prod
        elif tensor in self.graph_inputs:  # the input keeps its name; its readers read the mark
            out = self.names.fresh(f"{tensor}_marked")
            for n in self.nodes + self.extra:
                self.replace_input(n, tensor, out)
        else:
            raise QsearchError(f"cannot mark tensor '{tensor}': it has no producer in the graph")
        self.extra.append(helper.make_node(op, [src], [out], name=self.names.fresh(f"{tensor}_{op}"),
                                           domain=MARK_DOMAIN, tensor=tensor, **attrs))
        self.producer[out] = self.extra[-1]

    def keep_float_weights(self) -> None:
        """A float Conv/ConvTranspose/Gemm between a per-tensor DQ and a Q runs as int8 in ONNX
        Runtime 1.21+: its WeightBiasQuantization quantizes the float weight per tensor (a
        depthwise Conv the plan keeps float lost more than its int8 per-channel form). Each such op
        reads its input through a DQ of its own with the same scale given per channel: the same
        values, and no longer the per-tensor DQ that transformation looks for."""
        for n in self.nodes:
            if n.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(n.input) < 2 or n.input[1] not in self.inits:
                continue
            dq = self.producer.get(n.input[0])
            if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3 or dq.input[1] not in self.new_inits:
                continue
            axis, channels = _float_input_channels(n, self.inits[n.input[1]])
            scale = numpy_helper.to_array(self.new_inits[dq.input[1]])
            zp = numpy_helper.to_array(self.new_inits[dq.input[2]])
            if scale.size != 1 or channels < 2:
                continue
            base = n.input[0]
            sn = self._init(self.names.fresh(f"{base}_{n.name}_scale"), np.full(channels, scale.reshape(-1)[0]))
            zn = self._init(self.names.fresh(f"{base}_{n.name}_zero_point"), np.full(channels, zp.reshape(-1)[0]))
            out = self.names.fresh(f"{base}_{n.name}_float_input")
            self.extra.append(helper.make_node("DequantizeLinear", [dq.input[0], sn, zn], [out], axis=axis,
                                               name=self.names.fresh(f"{base}_{n.name}_DequantizeLinear")))
            self.producer[out] = self.extra[-1]
            n.input[0] = out

    def _zero_point(self, zp: np.unsignedinteger) -> np.ndarray:
        """A scalar zero point of the codes' dtype; 16-bit codes need opset 21's Q/DQ."""
        zp = np.asarray(zp)
        if zp.dtype == np.uint16:
            self.min_opset = max(self.min_opset, 21)
        return zp.reshape(())

    def convert(self, tensor: str, readers: Iterable[onnx.NodeProto], scale: np.float32,
                zp: np.unsignedinteger) -> str:
        """Where an int8 region meets an int16 one: `readers` read `tensor` (a DQ's output) through a
        Q/DQ of the other width, as ONNX Runtime's QNN flow converts (Q1 DQ1 Q2 DQ2)."""
        bits = np.asarray(zp).dtype.itemsize * 8
        out = self.fake_quant(tensor, f"{tensor}_as_u{bits}", scale, zp)
        for n in readers:
            self.replace_input(n, tensor, out)
        self.producer[out] = self.extra[-1]
        return out

    def fake_quant(self, tensor: str, base: str, scale: np.float32, zp: np.unsignedinteger) -> str:
        """Q/DQ reading `tensor` into a new tensor (named from `base`), leaving existing consumers
        alone (probes); returns the new tensor's name."""
        names = self.names
        out, q = names.fresh(base), names.fresh(f"{base}_q")
        sn = self._init(names.fresh(f"{base}_scale"), np.asarray(scale, np.float32).reshape(()))
        zn = self._init(names.fresh(f"{base}_zero_point"), self._zero_point(zp))
        self.extra.append(helper.make_node("QuantizeLinear", [tensor, sn, zn], [q], name=names.fresh(f"{base}_Q")))
        self.extra.append(helper.make_node("DequantizeLinear", [q, sn, zn], [out], name=names.fresh(f"{base}_DQ")))
        return out

    def reduce_pair(self, tag: str, reference: str, twin: str) -> tuple[str, str]:
        """In-graph scalars of a probe: sum of squares of `reference` and of `twin - reference`."""
        names = self.names
        sig, err, noise = names.fresh(f"{tag}_signal"), names.fresh(f"{tag}_error"), names.fresh(f"{tag}_noise")
        self.extra.append(helper.make_node("ReduceSumSquare", [reference], [sig], name=names.fresh(f"{tag}_Signal"),
                                           keepdims=0))
        self.extra.append(helper.make_node("Sub", [twin, reference], [err], name=names.fresh(f"{tag}_Sub")))
        self.extra.append(helper.make_node("ReduceSumSquare", [err], [noise], name=names.fresh(f"{tag}_Noise"),
                                           keepdims=0))
        return sig, noise

    def convert_fp16(self, seeds: set[str]) -> None:
        """Run `seeds` (and float ops fed only by them) in FP16; Cast only at region borders."""
        order = self._sorted(self.nodes + self.extra)
        fp16: set[str] = set()
        for n in order:
            float_ins = [t for t in n.input if t and t not in self.inits and t not in self.new_inits]
            if n.name in seeds or (
                n.op_type in FP16_FOLLOWERS and float_ins
                and all(self.producer.get(t) is not None and self.producer[t].name in fp16 for t in float_ins)
            ):
                fp16.add(n.name)
        if not fp16:
            return
        float_inits = {**{k: v for k, v in self.inits.items() if v.data_type == TensorProto.FLOAT},
                       **{k: v for k, v in self.new_inits.items() if v.data_type == TensorProto.FLOAT}}
        renamed: dict[str, str] = {}
        casts_in: dict[str, str] = {}
        for n in order:
            if n.name not in fp16:
                continue
            for i, t in enumerate(n.input):
                if not t:
                    continue
                if t in float_inits:
                    name = self.names.of(("fp16", t), f"{t}_fp16")
                    if name not in self.new_inits:
                        arr = numpy_helper.to_array(float_inits[t]).astype(np.float16)
                        self.new_inits[name] = numpy_helper.from_array(arr, name)
                    n.input[i] = name
                elif t in renamed:
                    n.input[i] = renamed[t]
                elif t in self.inits or t in self.new_inits:
                    continue  # non-float constants (shapes, axes) stay as they are
                elif self._is_float(t):
                    if t not in casts_in:
                        casts_in[t] = self.names.fresh(f"{t}_to_fp16")
                        self.extra.append(helper.make_node("Cast", [t], [casts_in[t]],
                                                           name=self.names.fresh(f"{t}_CastToFp16"),
                                                           to=TensorProto.FLOAT16))
                    n.input[i] = casts_in[t]
            for j, t in enumerate(n.output):
                renamed[t] = self.names.of(("fp16", t), f"{t}_fp16")
                n.output[j] = renamed[t]
        consumers_outside = {t for n in self.nodes + self.extra if n.name not in fp16 for t in node_reads(n)}
        for t, t16 in renamed.items():
            if t in consumers_outside or t in self.graph_outputs:
                self.extra.append(helper.make_node("Cast", [t16], [t], name=self.names.fresh(f"{t}_CastToFp32"),
                                                   to=TensorProto.FLOAT))

    def _is_float(self, t: str) -> bool:
        # Every activation the FP16 region reads is float unless shape inference said otherwise.
        for vi in [*self.model.graph.value_info, *self.model.graph.input]:
            if vi.name == t:
                return vi.type.tensor_type.elem_type == TensorProto.FLOAT
        return True

    @staticmethod
    def _sorted(nodes: Iterable[onnx.NodeProto]) -> list[onnx.NodeProto]:
        """Kahn's topological sort, stable in the given order."""
        nodes = list(nodes)
        produced_by = {t: i for i, n in enumerate(nodes) for t in n.output}
        deps = [{produced_by[t] for t in node_reads(n) if t in produced_by} for n in nodes]
        users: dict[int, list[int]] = {}
        for i, d in enumerate(deps):
            for j in d:
                users.setdefault(j, []).append(i)
        waiting = [len(d) for d in deps]
        ready = [i for i, w in enumerate(waiting) if w == 0]
        heapq.heapify(ready)
        out = []
        while ready:
            i = heapq.heappop(ready)
            out.append(nodes[i])
            for u in users.get(i, ()):
                waiting[u] -= 1
                if waiting[u] == 0:
                    heapq.heappush(ready, u)
        if len(out) != len(nodes):
            raise QsearchError("rewritten graph has a cycle (internal error)")
        return out

    def build(self, extra_outputs: Iterable[str] = ()) -> onnx.ModelProto:
        extra_outputs = [t for t in extra_outputs if t not in self.graph_outputs]
        nodes = self._sorted([n for n in self.nodes if n.name not in self.removed] + self.extra)
        used = set(self.graph_outputs) | set(extra_outputs)
        alive = []
        for n in reversed(nodes):  # drop nodes the rewrite left without readers
            if any(t in used for t in n.output) or n.name in self.dead_in_source:
                alive.append(n)
                used.update(node_reads(n))
        nodes = alive[::-1]
        inits = [i for name, i in {**self.inits, **self.new_inits}.items() if name in used]
        if self.min_opset >= 14:
            inits = self._rename_inlined(nodes, inits)
        g = self.model.graph
        graph = helper.make_graph(
            nodes, g.name, list(g.input),
            list(g.output) + [helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in extra_outputs], inits,
        )
        opsets = [helper.make_opsetid(o.domain, max(o.version, self.min_opset) if o.domain in ("", "ai.onnx")
                                      else o.version) for o in self.model.opset_import]
        if any(n.domain == MARK_DOMAIN for n in nodes):
            opsets.append(helper.make_opsetid(MARK_DOMAIN, 1))
        m = helper.make_model(graph, opset_imports=opsets, ir_version=self.model.ir_version)
        m.producer_name = "qsearch"
        for p in self.model.metadata_props:
            m.metadata_props.append(p)
        return m


def _float_input_channels(node: onnx.NodeProto, weight: TensorProto) -> tuple[int, int]:
    """(axis, size) of the channels of a Conv/ConvTranspose/Gemm's input, from its weight."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    dims = list(weight.dims)
    if node.op_type == "Conv":
        return 1, (dims[1] * int(attrs.get("group", 1)) if len(dims) > 1 else 0)
    if node.op_type == "ConvTranspose":
        return 1, dims[0]
    k = dims[1] if attrs.get("transB", 0) else dims[0]
    return (0 if attrs.get("transA", 0) else 1), k
