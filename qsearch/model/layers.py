"""The quantizable *layers* of a prepared graph: a compute node ONNX Runtime runs as an int8
kernel in QDQ form, plus the Relu/Clip it folds into that kernel, named after the node; which of
its inputs are activations, weight and bias; its MACs and output size; a MatMul's bias Add."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from qsearch.model.patterns import hardswish_gates, readable_name

# Ops whose int8 form ONNX Runtime's CPU provider runs as a kernel when wrapped in QDQ (its QDQ
# selectors: Conv/MatMul/Gemm, binary Add/Mul -> QLinearAdd/Mul, unary -> QLinearSigmoid,
# QLinearGlobalAveragePool..., variadic Concat -> QLinearConcat).
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
BINARY_OPS = ("Add", "Mul")
UNARY_OPS = ("Sigmoid", "GlobalAveragePool", "AveragePool", "LeakyRelu", "Softmax")
VARIADIC_OPS = ("Concat",)
LAYER_OPS = (*WEIGHT_OPS, *BINARY_OPS, *VARIADIC_OPS, *UNARY_OPS)
# A single-consumer activation after a layer is quantized at its output (ORT drops it into the Q).
FUSED_ACTIVATIONS = ("Relu", "Clip")
# Ops that only move or select values (ORT's "drop Q/DQ" selectors): with the same scale on their
# input and output, ONNX Runtime removes the pair and runs the op on uint8 data. Their output
# range lies within their input's, so both sides may share it without clipping what they pass on.
# Patterns ONNX Runtime has no int8 kernel for, and the forms a plan may give them inside an int8
# region (measured per model; see `sensitivity`). decomposed: the gate in float between Q/DQ, the
# product a QLinearMul. fused: one float HardSwish (opset 14) between one DequantizeLinear and one
# QuantizeLinear.
PATTERN_FORMS = {"hardswish": ("decomposed", "fused")}
PASSTHROUGH_OPS = ("MaxPool", "Resize", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice",
                   "Gather", "Expand", "Tile", "Identity")


@dataclass(frozen=True)
class Layer:
    """One deployable quantization unit (what becomes a QLinearConv, QGemm, QLinearAdd...)."""

    name: str
    op_type: str
    nodes: tuple[str, ...]  # the compute node, then a fused activation if any
    activations: tuple[str, ...]  # float activation inputs that get Q/DQ
    output: str  # tensor whose Q/DQ follows the unit
    weight: str | None = None
    bias: str | None = None
    weight_axis: int = 0  # output-channel axis of the weight, for per-channel scales
    macs: int = 0  # multiply-accumulates per sample
    weight_bytes: int = 0  # FP32 bytes of weight + bias
    constant: str | None = None  # Add/Mul by a float initializer: quantized uint8 like an activation
    output_bytes: int = 0  # FP32 bytes of the output per sample (0: shape unknown)
    readable: str = ""  # the source module's path from the exporter's node metadata, if any
    pattern: str = ""  # "hardswish": this Mul computes x * gate(x); activations are (x, gate)
    gate: tuple[str, ...] = ()  # the nodes computing the gate from x (HardSigmoid; Add, Clip, Div)
    tail: tuple[str, ...] = ()  # nodes after the product that belong to the pattern (paddle2onnx's /6)
    fused_output: str = ""  # the tensor the whole pattern writes (the tail's output, else the Mul's)
    bias_add: str = ""  # a weight MatMul's bias: the Add of a 1-D initializer that alone reads its output
    third_input: bool = False  # Conv/Gemm reads a third input that is not `bias` (a 2-D or computed C)

    def fused(self, forms: Mapping[str, str] | None) -> bool:
        """Whether this pattern layer runs as one op (its gate absorbed) under `forms`."""
        return bool(self.pattern) and (forms or {}).get(self.pattern) == "fused"

    def quantized_inputs(self, forms: Mapping[str, str] | None = None) -> tuple[str, ...]:
        """The activations that get Q/DQ: a pattern in its fused form reads only x."""
        return self.activations[:1] if self.fused(forms) else self.activations

    def quantized_output(self, forms: Mapping[str, str] | None = None) -> str:
        """The output that gets Q/DQ: a fused pattern's is the whole pattern's (after a tail /6)."""
        return self.fused_output if self.fused(forms) and self.fused_output else self.output

    @property
    def has_weight(self) -> bool:
        return self.weight is not None

    @property
    def float_output(self) -> bool:
        """ONNX Runtime runs DQ -> MatMul with a float output as one int8 kernel
        (MatMulIntegerToFloat), and a QGemm without an output scale: these outputs get no Q/DQ
        of their own (a FFN's pre-bias output spans [-4, 195] in MiniLM: quantizing it cost 0.05
        cosine). A consumer that is INT8 still quantizes it as its input."""
        return self.op_type in ("MatMul", "Gemm")


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Every tensor a node reads: its inputs and, for If/Loop/Scan, the outer-scope tensors its
    subgraphs use (implicit inputs). Sorting, dead-node sweeps and reader counts must see both,
    or a rewrite moves or deletes what a branch reads."""
    reads = [t for t in node.input if t]
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in graphs:
            reads.extend(_outer_reads(sub))
    return reads


def _outer_reads(graph: onnx.GraphProto) -> list[str]:
    local = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    out: list[str] = []
    for n in graph.node:
        out.extend(t for t in node_reads(n) if t not in local)
        local.update(n.output)
    out.extend(o.name for o in graph.output if o.name not in local)
    return out


def find_layers(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> list[Layer]:
    """Every node ONNX Runtime can run as an int8 kernel in QDQ form, in graph order. MACs count
    with `shapes` (inferred; `model._shapes`, with the data's input shapes where the model's are symbolic)."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for t in node_reads(node):
            consumers.setdefault(t, []).append(node)
    graph_outputs = {o.name for o in g.output}
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.value_info, *g.input, *g.output]}
    elem.update({i.name: i.data_type for i in g.initializer})
    patterns = hardswish_gates(g, inits, consumers, graph_outputs)
    layers = []
    for node in g.node:
        if node.op_type not in LAYER_OPS or node.domain not in ("", "ai.onnx"):
            continue
        ins = [t for t in node.input if t]
        if any(elem.get(t, onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT for t in (*ins, *node.output)):
            continue  # integer shape arithmetic, bool masks, float16 islands: no int8 kernel
        roles = _roles(node, ins, inits, patterns)
        if roles is None:
            continue
        acts, weight, bias, axis, constant = roles
        unit, out = _unit(node, consumers, graph_outputs, inits)
        layers.append(
            Layer(
                name=node.name,
                op_type=node.op_type,
                nodes=tuple(unit),
                activations=acts,
                output=out,
                weight=weight,
                bias=bias,
                weight_axis=axis,
                macs=_macs(node, shapes, inits),
                weight_bytes=4 * sum(int(np.prod(inits[t].dims)) for t in (weight, bias) if t),
                constant=constant,
                output_bytes=4 * int(np.prod(shapes[out])) if out in shapes else 0,
                readable=readable_name(node),
                pattern="hardswish" if node.name in patterns else "",
                gate=patterns[node.name][0] if node.name in patterns else (),
                tail=patterns[node.name][2] if node.name in patterns else (),
                fused_output=patterns[node.name][3] if node.name in patterns else "",
                bias_add=_bias_add(node, weight, out, consumers, inits, graph_outputs),
                third_input=len(ins) > 2 and bias is None and node.op_type in ("Conv", "Gemm"),
            )
        )
    return layers


def _bias_add(node: onnx.NodeProto, weight: str | None, out: str, consumers: dict, inits: dict,
              graph_outputs: set[str]) -> str:
    """The Add that gives a weight MatMul its bias (exporters write MatMul + Add): the output's only
    reader, adding a 1-D initializer of the output width that nothing else reads. Bias correction
    of the MatMul adjusts that initializer."""
    if node.op_type != "MatMul" or weight is None or out != node.output[0] or out in graph_outputs:
        return ""
    nxt = consumers.get(out, [])
    if len(nxt) != 1 or nxt[0].op_type != "Add" or len(nxt[0].input) != 2 or len(set(nxt[0].input)) != 2:
        return ""
    other = next(t for t in nxt[0].input if t != out)
    b = inits.get(other)
    if b is None or list(b.dims) != [inits[weight].dims[1]] or len(consumers.get(other, [])) != 1:
        return ""
    return nxt[0].name


def _roles(node: onnx.NodeProto, ins: list[str], inits: dict, patterns: dict) -> tuple | None:
    """(activations, weight, bias, weight axis, constant) of a node ORT can run in int8, or None
    when this node's inputs rule its int8 kernel out."""
    weight = bias = constant = None
    axis = 0
    if node.op_type == "Conv":
        if len(ins) < 2 or ins[1] not in inits:
            return None
        acts, weight = (ins[0],), ins[1]
        bias = ins[2] if len(ins) > 2 and ins[2] in inits else None
    elif node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if ins[1] not in inits or attrs.get("transA", 0) or ins[0] in inits:
            return None
        acts, weight = (ins[0],), ins[1]
        axis = 0 if attrs.get("transB", 0) else 1
        bias = ins[2] if len(ins) > 2 and ins[2] in inits and len(inits[ins[2]].dims) == 1 else None
        if bias is not None and (attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            return None
    elif node.op_type == "MatMul":
        if ins[0] in inits:
            return None
        if ins[1] in inits:
            if len(inits[ins[1]].dims) != 2:
                return None
            acts, weight, axis = (ins[0],), ins[1], 1
        else:
            acts = (ins[0], ins[1])
    elif node.op_type in BINARY_OPS:  # residuals, gates; or by a constant (hardswish's +3, scales)
        if len(ins) != 2 or len(set(ins)) != 2 or all(t in inits for t in ins):
            return None
        const = [t for t in ins if t in inits]
        acts = tuple(t for t in ins if t not in inits)
        constant = const[0] if const else None
        if node.name in patterns:
            acts = (patterns[node.name][1], *(t for t in acts if t != patterns[node.name][1]))
    elif node.op_type in VARIADIC_OPS:  # QLinearConcat: every input an activation
        if len(ins) < 2 or any(t in inits for t in ins) or len(set(ins)) != len(ins):
            return None
        acts = tuple(ins)
    else:  # unary: one float activation in, one out
        if not ins or ins[0] in inits or len(node.output) != 1:
            return None
        acts = (ins[0],)
    return acts, weight, bias, axis, constant


def _unit(node: onnx.NodeProto, consumers: dict, graph_outputs: set[str], inits: dict) -> tuple[list[str], str]:
    """The node and the activation ORT folds into its int8 kernel (Relu, Clip), and the unit's output."""
    out = node.output[0]
    unit = [node.name]
    nxt = consumers.get(out, [])
    if (
        len(nxt) == 1
        and nxt[0].op_type in FUSED_ACTIVATIONS
        and out not in graph_outputs
        and all(t in inits or t == out for t in nxt[0].input if t)
    ):
        unit.append(nxt[0].name)
        out = nxt[0].output[0]
    return unit, out


def _macs(node: onnx.NodeProto, shapes: dict, inits: dict) -> int:
    out = shapes.get(node.output[0])
    if out is None:
        return 0
    n_out = int(np.prod(out))
    if node.op_type == "Conv":
        w = tuple(inits[node.input[1]].dims)
        return n_out * int(np.prod(w[1:]))
    if node.op_type in ("Gemm", "MatMul"):
        a = shapes.get(node.input[0])
        if not a:
            return 0
        attrs = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        k = a[0] if attrs.get("transA", 0) else a[-1]
        return n_out * int(k)
    return n_out

