"""Load an ONNX model and prepare the float graph every later stage works on.

Preparation mirrors what quantizers do first (ORT's `quant_pre_process`): opset 13+ for
per-channel QDQ, ONNX Runtime's basic float optimizations (constant folding, BatchNorm and
bias folding), shape inference. The result also lists the quantizable *layers*: a compute node
plus the Relu/Clip that ONNX Runtime folds into its quantized kernel, named after the node.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from qsearch.errors import QsearchError
from qsearch.patterns import hardswish_gates, readable_name

MIN_OPSET = 13
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


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]  # None for symbolic dims (usually the batch)


@dataclass(frozen=True)
class PreparedModel:
    """The optimized float graph plus what every stage needs to know about it."""

    name: str
    fingerprint: str  # of the model as the user gave it, so plans bind to the user's file
    proto: onnx.ModelProto
    layers: tuple[Layer, ...]
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    def absorbed(self, forms: Mapping[str, str] | None) -> dict[str, str]:
        """Layers inside the gate of a pattern layer that `forms` fuses (hardswish's +3 and /6 when
        they are Add/Mul layers) -> that pattern layer: they follow its choice and get no Q/DQ."""
        owner = {n: la.name for la in self.layers if la.fused(forms) for n in la.gate}
        return {la.name: owner[la.name] for la in self.layers if la.name in owner}


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file, with its external weight data, or fail with a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise QsearchError(f"{p}: model file not found")
    try:
        model = onnx.load(str(p))
    except Exception as exc:  # protobuf raises several unrelated types on garbage
        raise QsearchError(f"{p}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.graph.node:
        raise QsearchError(f"{p}: not a readable ONNX model (the graph has no nodes)")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QsearchError(f"{p}: invalid ONNX model: {first}") from None
    return model


def fingerprint(model: onnx.ModelProto) -> str:
    """Content hash of the graph (weights included) and opsets; names the model in plans."""
    h = hashlib.sha256()
    h.update(model.graph.SerializeToString(deterministic=True))
    for op in sorted((o.domain, o.version) for o in model.opset_import):
        h.update(repr(op).encode())
    return "sha256:" + h.hexdigest()[:16]


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _constant_initializers(model: onnx.ModelProto) -> None:
    """IR < 4 lists every initializer as a graph input too (an overridable default). Inference
    never overrides them: drop them from the inputs so they are constants that ONNX Runtime folds
    and a quantized model needs no feed for (before: "Required inputs missing")."""
    inits = {i.name for i in model.graph.initializer}
    if not any(i.name in inits for i in model.graph.input):
        return
    keep = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    model.ir_version = max(model.ir_version, 4)


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique, stable name: layer names in plans depend on it."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


def _ort_basic_optimize(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    import onnxruntime as ort

    from qsearch.runtime import make_session

    with tempfile.TemporaryDirectory(prefix="qsearch-") as tmp:
        out = os.path.join(tmp, "opt.onnx")
        try:
            make_session(model, level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, optimized_path=out)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0]
            raise QsearchError(f"{source}: ONNX Runtime cannot load the model: {msg}") from None
        return onnx.load(out)


def prepare(model: onnx.ModelProto, name: str = "model", source: str | None = None) -> PreparedModel:
    """Opset upgrade, float optimizations and shape inference; inputs/outputs stay the same.
    `source` (the file) is what error messages name."""
    source = source or f"model '{name}'"
    fp = fingerprint(model)
    model = onnx.ModelProto.FromString(model.SerializeToString())
    _constant_initializers(model)
    _name_nodes(model)
    if _default_opset(model) < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as exc:
            raise QsearchError(f"{source}: cannot upgrade opset {_default_opset(model)} to {MIN_OPSET}: {exc}") from None
    model = _ort_basic_optimize(model, source)
    _name_nodes(model)  # ORT's optimizer adds unnamed nodes (e.g. HardSwish inlined as HardSigmoid + Mul)
    model = onnx.shape_inference.infer_shapes(model)
    inputs = tuple(_input_specs(model))
    return PreparedModel(
        name=name,
        fingerprint=fp,
        proto=model,
        layers=tuple(find_layers(model)),
        inputs=inputs,
        outputs=tuple(o.name for o in model.graph.output),
    )


def with_input_shapes(prepared: PreparedModel, input_shapes: dict[str, tuple[int, ...]]) -> PreparedModel:
    """The same prepared model with layer MACs computed at the data's shapes (per sample): a model
    with symbolic H and W otherwise costs every conv as if its feature map were 1 x 1."""
    per_sample = {k: (1, *v[1:]) if len(v) else v for k, v in input_shapes.items()}
    try:
        layers = tuple(find_layers(prepared.proto, per_sample))
    except Exception:  # shape inference refused the concrete shapes: keep the symbolic estimate
        return prepared
    if [la.name for la in layers] != [la.name for la in prepared.layers]:
        return prepared
    return dataclasses.replace(prepared, layers=layers)


def _with_fixed_inputs(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    m = onnx.ModelProto.FromString(model.SerializeToString())
    for vi in m.graph.input:
        shape = input_shapes.get(vi.name)
        if shape is None or len(shape) != len(vi.type.tensor_type.shape.dim):
            continue
        for d, v in zip(vi.type.tensor_type.shape.dim, shape):
            d.Clear()
            d.dim_value = int(v)
    del m.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(m)


def load_prepared(path: str | os.PathLike) -> PreparedModel:
    return prepare(load_model(path), name=Path(path).stem, source=str(path))


def _input_specs(model: onnx.ModelProto):
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        yield InputSpec(vi.name, dtype, shape)


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Known tensor shapes, symbolic dims (the batch) counted as 1: MACs are per sample."""
    out: dict[str, tuple[int, ...]] = {}
    for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in dims)
    for init in model.graph.initializer:
        out[init.name] = tuple(init.dims)
    return out


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


def find_layers(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None) -> list[Layer]:
    """Every node ONNX Runtime can run as an int8 kernel in QDQ form, in graph order. MACs count
    symbolic dimensions as 1 unless `input_shapes` (from the data) give them."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for t in node_reads(node):
            consumers.setdefault(t, []).append(node)
    graph_outputs = {o.name for o in g.output}
    shapes = _shapes(_with_fixed_inputs(model, input_shapes) if input_shapes else model)
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

