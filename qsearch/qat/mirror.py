"""The plan's own graph in PyTorch: `Rewriter.training_graph` (the prepared float graph with a
FakeQuant node where `apply` writes each Q/DQ) converted by onnx2torch, then every INT8 layer's
weight fake-quantized through a parametrization, and every trainable initializer made one
`nn.Parameter` named after the ONNX initializer (so training writes back by name)."""

from __future__ import annotations

import contextlib
import sys
import types
import warnings
from collections.abc import Mapping

import numpy as np
import onnx
import torch
from onnx import numpy_helper, version_converter
from torch import nn
from torch.nn.utils import parametrize

from qsearch.errors import QsearchError
from qsearch.model.load import PreparedModel
from qsearch.qat.fakequant import RangeQuant, WeightFake
from qsearch.rewrite import TrainingGraph
from qsearch.rewrite.graph import MARK_DOMAIN
from qsearch.torchcompat import torchvision_works

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
MAX_OPSET = 17
# ops newer than MAX_OPSET with no earlier version to convert to, and a torch module computing the same
# (so is Reshape with allowzero=1, which onnx2torch refuses)
TORCH_OPS = ("Gelu",)  # the newest default-domain opset onnx2torch 1.5 has converters for (Resize 19, ReduceMean 18 lack them)


def _stand_in() -> dict:
    """onnx2torch imports torchvision for its NMS and RoiAlign converters only. Where torchvision
    cannot load (`torchcompat`), onnx2torch imports against this stand-in, which refuses in one
    line if a model ever needs those ops; torchvision stays absent for everyone else."""
    def missing(*args, **kwargs):
        raise QsearchError("this model needs torchvision's NMS/RoiAlign, which cannot load beside CPU torch")

    tv, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
    ops.nms = ops.roi_align = ops.box_convert = missing
    tv.ops = ops
    return {"torchvision": tv, "torchvision.ops": ops}


def require() -> None:
    """Import what fine-tuning needs; ImportError (naming the module) when the train extra is missing."""
    _onnx2torch()


def _onnx2torch():
    if "onnx2torch" not in sys.modules and not torchvision_works():
        sys.modules.update(_stand_in())
        try:
            import onnx2torch
        finally:  # torchvision absent again for transformers and the rest
            sys.modules["torchvision"] = None  # type: ignore[assignment]
            sys.modules.pop("torchvision.ops", None)
    import onnx2torch
    from onnx2torch.node_converters.registry import add_converter, get_converter
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    try:
        get_converter(operation_type="FakeQuant", version=1, domain=MARK_DOMAIN)
    except NotImplementedError:
        @add_converter(operation_type="FakeQuant", version=1, domain=MARK_DOMAIN)
        def _fake_quant(node, graph):
            a = node.attributes
            module = RangeQuant(a["tensor"], float(a["lo"]), float(a["hi"]), bool(a.get("learn", 0)),
                                int(a.get("group", 0)))
            return OperationConverterResult(torch_module=module, onnx_mapping=OnnxMapping(
                inputs=node.input_values, outputs=node.output_values))
        @add_converter(operation_type="Reshape", version=1, domain=MARK_DOMAIN)
        def _reshape(node, graph):  # allowzero=1: ONNX's Reshape is then exactly torch.reshape
            return OperationConverterResult(torch_module=TorchReshape(), onnx_mapping=OnnxMapping(
                inputs=node.input_values, outputs=node.output_values))

        @add_converter(operation_type="Gelu", version=1, domain=MARK_DOMAIN)
        def _gelu(node, graph):
            mode = node.attributes.get("approximate", "none")
            return OperationConverterResult(torch_module=nn.GELU(approximate=mode), onnx_mapping=OnnxMapping(
                inputs=node.input_values, outputs=node.output_values))
    return onnx2torch, get_converter


class TorchReshape(nn.Module):
    def forward(self, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        return torch.reshape(x, tuple(int(d) for d in shape.tolist()))


class Mirror(nn.Module):
    """The fake-quantized model: `forward(feeds)` -> outputs in the ONNX graph's order. `params`:
    ONNX initializer name -> its one trainable tensor (ONNX layout); `quantizers`: tensor name ->
    its activation fake quantizer."""

    def __init__(self, module: nn.Module, inputs: tuple[str, ...], params: Mapping[str, nn.Parameter],
                 quantizers: Mapping[str, RangeQuant]):
        super().__init__()
        self.module, self.inputs = module, inputs
        self.params = nn.ParameterDict({_key(k): v for k, v in params.items()})
        self.names = dict(zip((_key(k) for k in params), params))
        self.quantizers = dict(quantizers)
        self.train()

    def train(self, mode: bool = True) -> Mirror:
        """Always inference semantics: an ONNX BatchNormalization or Dropout computes what it computes
        in the deployed model (onnx2torch's modules would use batch statistics and drop activations
        in torch's training mode). Training changes parameters through gradients only."""
        return super().train(False)

    def forward(self, feeds: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        with warnings.catch_warnings():  # onnx2torch's Slice indexes with a list: torch warns on every call
            warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)
            out = self.module(*(feeds[n] for n in self.inputs))
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def values(self) -> dict[str, np.ndarray]:
        """Every trainable initializer's current float value, by ONNX name."""
        return {self.names[k]: p.detach().cpu().numpy().astype(np.float32) for k, p in self.params.items()}

    def load(self, values: Mapping[str, np.ndarray], ranges: Mapping[str, tuple[float, float]]) -> None:
        """Set every trainable initializer and learned range back to a checkpoint's."""
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(torch.from_numpy(np.asarray(values[self.names[k]], dtype=np.float32)))
            for t, (lo, hi) in ranges.items():
                self.quantizers[t].bounds.copy_(torch.tensor([lo, hi], dtype=torch.float32))

    def ranges(self) -> dict[str, tuple[float, float]]:
        """Learned ranges, by tensor (fixed ones are not listed)."""
        return {t: q.range() for t, q in self.quantizers.items() if q.learn}


def _key(name: str) -> str:
    return "p" + name.encode().hex()  # ParameterDict keys may not hold '.'


def build(tg: TrainingGraph, prepared: PreparedModel, learn_ranges: bool) -> Mirror:
    onnx2torch, get_converter = _onnx2torch()
    model = _marked(tg, prepared, learn_ranges)
    if _opset(model) > MAX_OPSET:
        # an op with no earlier version keeps the opset: the coverage check names it if no converter takes it
        with contextlib.suppress(Exception):
            model = version_converter.convert_version(model, MAX_OPSET)
    _check_coverage(model, prepared, get_converter)
    try:
        gm = onnx2torch.convert(model, attach_onnx_mapping=True)
    except QsearchError:
        raise
    except Exception as exc:
        raise QsearchError(f"model '{prepared.name}': onnx2torch cannot mirror it: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]) from None
    for p in gm.parameters():
        p.requires_grad_(False)  # what trains is what is written back: the layers' weights and biases
    quantizers = {m.tensor: m for m in gm.modules() if isinstance(m, RangeQuant)}
    _tie_groups(quantizers.values())
    params = _bind(gm, model, tg, prepared)
    inputs = tuple(i.name for i in prepared.inputs)
    return Mirror(gm, inputs, params, quantizers)


def _marked(tg: TrainingGraph, prepared: PreparedModel, learn: bool) -> onnx.ModelProto:
    """The training graph with each FakeQuant told whether its range learns (a smoothed tensor's
    range is the sidecar's and stays), and the prepared graph's shapes on both sides of it (shape
    inference cannot see through a custom op; the converters of the ops after it need them). A
    converter adaptation on the mirror's copy only: `TORCH_OPS` and Reshape with allowzero=1 move
    into qsearch's domain."""
    model = onnx.ModelProto.FromString(tg.model.SerializeToString())
    shapes = {v.name: v for v in prepared.proto.graph.value_info}
    for n in model.graph.node:
        allowzero = n.op_type == "Reshape" and any(a.name == "allowzero" and a.i for a in n.attribute)
        if (n.op_type in TORCH_OPS or allowzero) and n.domain in ("", "ai.onnx"):
            n.domain = MARK_DOMAIN  # converted by qsearch's converter, and kept as it is by the opset conversion
        if n.op_type != "FakeQuant" or n.domain != MARK_DOMAIN:
            continue
        n.attribute.append(onnx.helper.make_attribute("learn", int(learn and n.output[0] not in tg.smoothed_tensors)))
        known = shapes.get(n.output[0]) or shapes.get(n.input[0])
        for t in (n.input[0], n.output[0]) if known is not None else ():
            vi = onnx.ValueInfoProto.FromString(known.SerializeToString())
            vi.name = t
            model.graph.value_info.append(vi)
    if any(n.domain == MARK_DOMAIN for n in model.graph.node) and MARK_DOMAIN not in {o.domain for o in
                                                                                    model.opset_import}:
        model.opset_import.append(onnx.helper.make_opsetid(MARK_DOMAIN, 1))
    return model


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _check_coverage(model: onnx.ModelProto, prepared: PreparedModel, get_converter) -> None:
    """One line naming the first op (and its node, and layer) onnx2torch cannot mirror."""
    opset = {o.domain: o.version for o in model.opset_import}
    layer_of = {n: la.name for la in prepared.layers for n in la.nodes}
    for n in model.graph.node:
        try:
            get_converter(operation_type=n.op_type, version=opset.get(n.domain, 1), domain=n.domain)
        except NotImplementedError:
            where = f" (layer '{layer_of[n.name]}')" if n.name in layer_of else ""
            raise QsearchError(f"model '{prepared.name}': op {n.op_type} (opset {opset.get(n.domain, 1)}) at node "
                               f"'{n.name}'{where} cannot be mirrored in PyTorch: onnx2torch has no converter "
                               "for it") from None


def _tie_groups(quantizers) -> None:
    """Tensors that must share one scale (Concat inputs, value-moving ops) share one range."""
    first: dict[int, RangeQuant] = {}
    for q in quantizers:
        if q.group:
            lead = first.setdefault(q.group, q)
            if lead is not q:
                q.bounds = lead.bounds


def _owners(gm, model: onnx.ModelProto) -> dict[str, list[tuple[nn.Module, str]]]:
    """ONNX initializer -> the (module, attribute) pairs that hold it in the converted graph: a
    Conv/Linear module's weight and bias, or a constant the graph reads (onnx2torch keeps one
    buffer per reading node)."""
    nodes = {(f"{n.domain}/" + n.name.replace(".", "/")).lstrip("/"): n for n in model.graph.node}  # its module names
    owners: dict[str, list[tuple[nn.Module, str]]] = {}
    for fx_node in gm.graph.nodes:
        if fx_node.op != "call_module" or fx_node.target not in nodes:
            continue
        module, node = gm.get_submodule(fx_node.target), nodes[fx_node.target]
        if isinstance(module, nn.Sequential):  # a Conv behind its asymmetric padding
            module = next((m for m in module if isinstance(m, WEIGHTED)), module)
        if isinstance(module, WEIGHTED):
            for attr, idx in (("weight", 1), ("bias", 2)):
                if len(node.input) > idx and node.input[idx] and getattr(module, attr, None) is not None:
                    owners.setdefault(node.input[idx], []).append((module, attr))
            continue
        for arg, name in zip(fx_node.args, module.onnx_mapping.inputs):
            if getattr(arg, "op", None) == "get_attr":
                path, _, attr = arg.target.rpartition(".")
                owners.setdefault(name, []).append((gm.get_submodule(path), attr))
    return owners


def _bind(gm, model: onnx.ModelProto, tg: TrainingGraph, prepared: PreparedModel) -> dict[str, nn.Parameter]:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    owners = _owners(gm, model)
    params: dict[str, nn.Parameter] = {}
    for name in [*tg.trainable, *(t for t in tg.quant if t not in tg.trainable)]:
        holders = owners.get(name, [])
        if not holders:
            if name in tg.trainable and name not in tg.quant:
                continue  # a float layer's weight the converter folded into its module: it stays as it is
            raise QsearchError(f"model '{prepared.name}': initializer '{name}' cannot be fake-quantized in the "
                               "PyTorch mirror (the converter keeps no tensor for it)")
        value = torch.from_numpy(np.array(inits[name], dtype=np.float32))
        shared = nn.Parameter(value.clone(), requires_grad=name in tg.trainable)
        for module, attr in holders:
            held = getattr(module, attr).detach()
            transposed = _layout(held, value, name)
            parametrize.register_parametrization(module, attr, WeightFake(tg.quant.get(name), transposed), unsafe=True)
            module.parametrizations[attr].original = shared
        if name in tg.trainable:
            params[name] = shared
    return params


def _layout(held: torch.Tensor, value: torch.Tensor, name: str) -> bool:
    """Whether the converter holds the initializer transposed (checked on the values, not assumed)."""
    if held.shape == value.shape and torch.equal(held.float(), value):
        return False
    if value.dim() == 2 and held.shape == value.T.shape and torch.equal(held.float(), value.T):
        return True
    raise QsearchError(f"initializer '{name}': the PyTorch mirror holds other values than the ONNX graph")
