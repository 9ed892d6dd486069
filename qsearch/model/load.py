"""Load an ONNX model and prepare the float graph every later stage works on.

Preparation mirrors what quantizers do first (ORT's `quant_pre_process`): opset 13+ for
per-channel QDQ, ONNX Runtime's basic float optimizations (constant folding, BatchNorm and
bias folding), shape inference. The result also lists the quantizable *layers* (`layers`): a
compute node plus the Relu/Clip that ONNX Runtime folds into its quantized kernel.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from qsearch.errors import ModelError, as_kind
from qsearch.model.folding import fold_affine
from qsearch.model.layers import BINARY_OPS as BINARY_OPS
from qsearch.model.layers import FUSED_ACTIVATIONS as FUSED_ACTIVATIONS
from qsearch.model.layers import LAYER_OPS as LAYER_OPS
from qsearch.model.layers import PASSTHROUGH_OPS as PASSTHROUGH_OPS
from qsearch.model.layers import PATTERN_FORMS as PATTERN_FORMS
from qsearch.model.layers import WEIGHT_OPS as WEIGHT_OPS
from qsearch.model.layers import Layer as Layer
from qsearch.model.layers import find_layers
from qsearch.model.layers import node_reads as node_reads

MIN_OPSET = 13
# How the float graph is prepared; plans record it, so `apply` rebuilds the graph a plan was made
# on. 1: ONNX Runtime's basic optimizations; 2: then constant affine ops folded into Convs (`folding`).
PREPARE_VERSION = 2
PREPARATIONS = (1, 2)


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
    preparation: int = PREPARE_VERSION  # `PREPARATIONS`
    folded: int = 0  # constant Mul/Add ops folded into Convs (`folding`)

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


@as_kind(ModelError)
def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file, with its external weight data, or fail with a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: model file not found")
    try:
        model = onnx.load(str(p))
    except Exception as exc:  # protobuf raises several unrelated types on garbage
        raise ModelError(f"{p}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.graph.node:
        raise ModelError(f"{p}: not a readable ONNX model (the graph has no nodes)")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{p}: invalid ONNX model: {first}") from None
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

    from qsearch.engine.onnxruntime import make_session

    with tempfile.TemporaryDirectory(prefix="qsearch-") as tmp:
        out = os.path.join(tmp, "opt.onnx")
        try:
            make_session(model, level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, optimized_path=out)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0]
            raise ModelError(f"{source}: ONNX Runtime cannot load the model: {msg}") from None
        return onnx.load(out)


def _upgrade_opset(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    if _default_opset(model) >= MIN_OPSET:
        return model
    try:
        return onnx.version_converter.convert_version(model, MIN_OPSET)
    except Exception as exc:
        raise ModelError(f"{source}: cannot upgrade opset {_default_opset(model)} to {MIN_OPSET}: {exc}") from None


def _in_place(step: Callable[[onnx.ModelProto], object]) -> Callable[[onnx.ModelProto], onnx.ModelProto]:
    def run(model: onnx.ModelProto) -> onnx.ModelProto:
        step(model)
        return model

    return run


FOLDING = "constant Mul/Add folded into Convs"


def preparation_passes(source: str, preparation: int = PREPARE_VERSION) -> list[tuple[str, Callable]]:
    """The named steps `prepare` runs, in order, each `ModelProto -> ModelProto` on prepare's private
    copy (steps marked in place edit it, the others return a new one). Preparation 1 (plans made
    before folding) skips the affine folding."""
    passes = [("constant initializers", _in_place(_constant_initializers)),
              ("node names", _in_place(_name_nodes)),
              (f"opset {MIN_OPSET}+", lambda m: _upgrade_opset(m, source)),
              ("ONNX Runtime's basic optimizer", lambda m: _ort_basic_optimize(m, source))]
    if preparation >= 2:
        passes.append((FOLDING, _in_place(fold_affine)))
    # ORT's optimizer adds unnamed nodes (e.g. HardSwish inlined as HardSigmoid + Mul)
    passes += [("node names again", _in_place(_name_nodes)), ("shape inference", onnx.shape_inference.infer_shapes)]
    return passes


def prepare(model: onnx.ModelProto, name: str = "model", source: str | None = None,
            preparation: int = PREPARE_VERSION) -> PreparedModel:
    """The float graph every plan names: `preparation_passes` run on a copy (the caller's model is
    not touched); inputs and outputs stay the same. `source` (the file) is what error messages
    name; `preparation` a plan's (`PREPARATIONS`)."""
    source = source or f"model '{name}'"
    fp = fingerprint(model)
    model = onnx.ModelProto.FromString(model.SerializeToString())
    folded = 0
    for step, run in preparation_passes(source, preparation):
        before = len(model.graph.node)
        model = run(model)
        if step == FOLDING:
            folded = before - len(model.graph.node)
    inputs = tuple(_input_specs(model))
    return PreparedModel(
        name=name,
        fingerprint=fp,
        proto=model,
        layers=tuple(find_layers(model, _shapes(model))),
        inputs=inputs,
        outputs=tuple(o.name for o in model.graph.output),
        preparation=preparation,
        folded=folded,
    )


def with_input_shapes(prepared: PreparedModel, input_shapes: dict[str, tuple[int, ...]]) -> PreparedModel:
    """The same prepared model with layer MACs computed at the data's shapes (per sample): a model
    with symbolic H and W otherwise costs every conv as if its feature map were 1 x 1."""
    per_sample = {k: (1, *v[1:]) if len(v) else v for k, v in input_shapes.items()}
    try:
        layers = tuple(find_layers(prepared.proto, _shapes(_with_fixed_inputs(prepared.proto, per_sample))))
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
