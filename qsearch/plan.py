"""The mixed-precision plan: what to do with each layer, and the ranges to do it with.

A plan is self-contained (activation ranges included, so `apply` needs no data and is
deterministic), bound to one model by fingerprint, and written with a stable key order so two
plans diff cleanly in review.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import yaml

from qsearch import __version__
from qsearch.calibration import GRANULARITIES, METHODS, CalibrationStats, tensor_range
from qsearch.errors import QsearchError
from qsearch.files import atomic_write_text, check_keys, load_yaml, where
from qsearch.model import PASSTHROUGH_OPS, Layer, PreparedModel, node_reads

MAX_RANGE = float(np.finfo(np.float32).max)  # a plan's range must be float32: its scale then stays finite
SCHEMA_VERSION = 1
PRECISIONS = ("int8", "fp16", "fp32")
TARGETS = ("cpu", "fp16")  # cpu: float layers run FP32; fp16: GPU/NPU, float layers run FP16


@dataclass(frozen=True)
class LayerChoice:
    precision: str = "int8"
    calibration: str = "minmax"
    granularity: str = "per_channel"

    @property
    def is_int8(self) -> bool:
        return self.precision == "int8"

    def label(self) -> str:
        return f"int8/{self.calibration}/{self.granularity}" if self.is_int8 else self.precision

    @classmethod
    def parse(cls, label: str) -> LayerChoice:
        parts = label.split("/")
        if parts[0] == "int8" and len(parts) == 3:
            return cls("int8", parts[1], parts[2])
        return cls(parts[0])


@dataclass(frozen=True)
class Plan:
    model_name: str
    fingerprint: str
    target: str = "cpu"
    defaults: LayerChoice = LayerChoice()
    layers: Mapping[str, LayerChoice] = field(default_factory=dict)  # overrides, graph order
    ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    percentile: float = 99.99
    metrics: Mapping[str, Any] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def choice(self, layer: str) -> LayerChoice:
        return self.layers.get(layer, self.defaults)

    def with_info(self, metrics: Mapping[str, Any] | None = None, **provenance: Any) -> Plan:
        return replace(
            self,
            metrics={**self.metrics, **(metrics or {})},
            provenance={**self.provenance, **provenance},
        )

    # ------------------------------------------------------------------ YAML
    def to_yaml(self) -> str:
        doc = {
            "qsearch_plan": SCHEMA_VERSION,
            "model": {"name": self.model_name, "fingerprint": self.fingerprint},
            "target": self.target,
            "defaults": _choice_dict(self.defaults, None),
            "layers": {n: _choice_dict(c, self.defaults) for n, c in self.layers.items()},
            "calibration": {"percentile": self.percentile},
            # lossless (YAML writes a float's shortest round-trip repr): apply must rebuild the exact scales
            "activation_ranges": {t: [float(a), float(b)] for t, (a, b) in sorted(self.ranges.items())},
            "metrics": _plain(self.metrics),
            "provenance": _plain({"qsearch": __version__, **self.provenance}),
        }
        return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100)

    def write(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, self.to_yaml())

    @classmethod
    def read(cls, path: str | os.PathLike) -> Plan:
        doc = load_yaml(path, "plan")
        return cls.from_doc(doc, path)

    @classmethod
    def from_doc(cls, doc: Any, path: str | os.PathLike = "<plan>") -> Plan:
        if not isinstance(doc, dict) or "qsearch_plan" not in doc:
            raise QsearchError(f"{path}: not a qsearch plan (missing 'qsearch_plan' version key)")
        version = doc["qsearch_plan"]
        if not isinstance(version, int) or version > SCHEMA_VERSION or version < 1:
            raise QsearchError(
                f"{where(path, doc, 'qsearch_plan')}: plan schema version {version!r} is not supported "
                f"by qsearch {__version__} (supports 1..{SCHEMA_VERSION})"
            )
        check_keys(path, doc, {"qsearch_plan", "model", "target", "defaults", "layers", "calibration",
                               "activation_ranges", "metrics", "provenance"}, "")
        model = doc.get("model") or {}
        check_keys(path, model, {"name", "fingerprint"}, "model")
        if not isinstance(model.get("fingerprint"), str):
            raise QsearchError(f"{where(path, doc, 'model')}: 'model.fingerprint' is missing")
        target = doc.get("target", "cpu")
        if target not in TARGETS:
            raise QsearchError(f"{where(path, doc, 'target')}: target {target!r} is not one of {', '.join(TARGETS)}")
        defaults = _parse_choice(path, doc.get("defaults") or {}, LayerChoice(), "defaults")
        layers_doc = doc.get("layers") or {}
        if not isinstance(layers_doc, dict):
            raise QsearchError(f"{where(path, doc, 'layers')}: 'layers' must be a mapping")
        layers = {str(n): _parse_choice(path, c or {}, defaults, f"layers.{n}") for n, c in layers_doc.items()}
        calib = doc.get("calibration") or {}
        check_keys(path, calib, {"percentile"}, "calibration")
        pct = calib.get("percentile", 99.99)
        if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 50.0 <= pct <= 100.0:
            raise QsearchError(f"{where(path, calib, 'percentile')}: calibration.percentile must be a number in "
                               f"[50, 100], got {pct!r}")
        for key in ("metrics", "provenance"):
            if doc.get(key) is not None and not isinstance(doc[key], dict):
                raise QsearchError(f"{where(path, doc, key)}: '{key}' must be a mapping, got {doc[key]!r}"[:300])
        ranges_doc = doc.get("activation_ranges") or {}
        if not isinstance(ranges_doc, dict):
            raise QsearchError(f"{where(path, doc, 'activation_ranges')}: must be a mapping")
        ranges = {}
        for t, r in ranges_doc.items():
            ok = isinstance(r, list) and len(r) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                             for v in r)
            # beyond float32 the scale of a uint8 tensor is inf (and the model computes NaN)
            if not ok or not (r[0] <= 0 <= r[1]) or any(v != v or abs(v) > MAX_RANGE for v in r):
                raise QsearchError(
                    f"{where(path, ranges_doc, t)}: activation_ranges.{t} must be [min <= 0, max >= 0] with "
                    f"|values| <= {MAX_RANGE:g}, got {r!r}"[:300]
                )
            ranges[str(t)] = (float(r[0]), float(r[1]))
        return cls(
            model_name=str(model.get("name", "model")),
            fingerprint=model["fingerprint"],
            target=target,
            defaults=defaults,
            layers=layers,
            ranges=ranges,
            percentile=float(pct),
            metrics=dict(doc.get("metrics") or {}),
            provenance=dict(doc.get("provenance") or {}),
        )

    def validate(self, prepared: PreparedModel, path: str | os.PathLike = "plan") -> None:
        """Refuse a plan for another model, or one naming layers/tensors the model lacks."""
        if self.fingerprint != prepared.fingerprint:
            raise QsearchError(
                f"{path}: plan is for model '{self.model_name}' ({self.fingerprint}), "
                f"not for '{prepared.name}' ({prepared.fingerprint})"
            )
        known = set(prepared.layer_names)
        for name, c in self.layers.items():
            if name not in known:
                raise QsearchError(f"{path}: layer '{name}' does not exist in model '{prepared.name}'")
            if c.precision == "fp16" and self.target != "fp16":
                raise QsearchError(f"{path}: layer '{name}' is fp16 but target '{self.target}' runs float layers in FP32")
        for layer in prepared.layers:
            c = self.choice(layer.name)
            if c.is_int8 and c.granularity not in allowed_granularities(layer):
                raise QsearchError(f"{path}: layer '{layer.name}' ({layer.op_type}) cannot be int8 {c.granularity}: "
                                   "ONNX Runtime's fused per-channel QGemm computes wrong results; use per_tensor")
            if c.is_int8:
                for t in (*layer.activations, layer.output):
                    if t not in self.ranges:
                        raise QsearchError(f"{path}: no activation range for tensor '{t}' of int8 layer '{layer.name}'")
        tensors, _ = quantized_tensors(prepared, {la.name for la in prepared.layers if self.choice(la.name).is_int8})
        for t in tensors:
            if t not in self.ranges:
                raise QsearchError(f"{path}: no activation range for tensor '{t}' (it feeds a value-moving op whose "
                                   "output is quantized; plans record a range for it)")


def _f(v: float) -> float:
    return float(f"{v:.8g}")


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item"):
        obj = obj.item()
    if isinstance(obj, float):
        return _f(obj)
    return obj


def _choice_dict(c: LayerChoice, defaults: LayerChoice | None) -> dict:
    d = {"precision": c.precision}
    if c.is_int8:
        if defaults is None or c.calibration != defaults.calibration or not defaults.is_int8:
            d["calibration"] = c.calibration
        if defaults is None or c.granularity != defaults.granularity or not defaults.is_int8:
            d["granularity"] = c.granularity
    return d


def _parse_choice(path, d: Any, base: LayerChoice, section: str) -> LayerChoice:
    check_keys(path, d, {"precision", "calibration", "granularity"}, section)
    for key, allowed in (("precision", PRECISIONS), ("calibration", METHODS), ("granularity", GRANULARITIES)):
        if key in d and d[key] not in allowed:
            raise QsearchError(
                f"{where(path, d, key)}: {section}.{key} is {d[key]!r}, expected one of {', '.join(allowed)}"
            )
    return LayerChoice(
        d.get("precision", base.precision), d.get("calibration", base.calibration), d.get("granularity", base.granularity)
    )


# ---------------------------------------------------------------------- building plans


def allowed_granularities(layer: Layer) -> tuple[str, ...]:
    """ONNX Runtime 1.32 fuses a per-channel Gemm into a QGemm that computes wrong results (17% of
    the output range on a 10-class head; its own quantize_static gives the same model), so Gemm
    layers are per-tensor only."""
    return ("per_tensor",) if layer.op_type == "Gemm" else GRANULARITIES


def normalized(layer: Layer, choice: LayerChoice) -> LayerChoice:
    if choice.is_int8 and choice.granularity not in allowed_granularities(layer):
        return LayerChoice(choice.precision, choice.calibration, allowed_granularities(layer)[0])
    return choice


def tensor_methods(prepared: PreparedModel, choices: Mapping[str, LayerChoice]) -> dict[str, str]:
    """Which activation tensors get Q/DQ, and with which layer's calibration method.

    A layer's method calibrates its *inputs*; a tensor feeding several int8 layers takes the first
    consumer's method (graph order). An int8 layer's output, needed for the fused kernel, takes
    its own method when no int8 layer consumes it.
    """
    methods: dict[str, str] = {}
    for layer in prepared.layers:
        c = choices.get(layer.name)
        if c is not None and c.is_int8:
            for t in layer.activations:
                methods.setdefault(t, c.calibration)
    for layer in prepared.layers:
        c = choices.get(layer.name)
        if c is not None and c.is_int8:
            methods.setdefault(layer.output, c.calibration)
    return methods


def _moves_values(node) -> bool:
    """ORT drops the Q/DQ pair around Resize only in nearest mode (linear interpolation stays a
    float op between a DQ and a Q, measured on ORT 1.32)."""
    if node.op_type != "Resize":
        return True
    mode = next((a.s for a in node.attribute if a.name == "mode"), b"nearest")
    return mode == b"nearest"


def quantized_tensors(prepared: PreparedModel, int8_layers: set[str]) -> tuple[list[str], list[set[str]]]:
    """Which tensors get Q/DQ for these int8 layers, and which of them must share one scale.

    Every int8 layer's activations and output; then, through value-moving ops (MaxPool, Resize,
    Reshape, Slice...; `PASSTHROUGH_OPS`): an op whose output is quantized gets its input quantized
    too when nothing else reads that input, and both sides share one scale, so ONNX Runtime drops
    the Q/DQ pair and runs the op on uint8 instead of leaving a float island between two int8
    regions. Returns the tensors in graph order and the groups of tensors that share a scale.
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
    for layer in prepared.layers:
        if layer.name in int8_layers:
            quant.update((*layer.activations, layer.output))
    links = [(n.input[0], n.output[0]) for n in graph.node
             if n.op_type in PASSTHROUGH_OPS and n.domain in ("", "ai.onnx") and n.input and n.input[0]
             and len(n.output) == 1 and n.input[0] not in inits and _moves_values(n)]
    # Split runs on uint8 when its input and *every* output share one scale (ORT's Split selector)
    splits = [(n.input[0], [t for t in n.output if t]) for n in graph.node
              if n.op_type == "Split" and n.domain in ("", "ai.onnx") and n.input and n.input[0] not in inits]
    links += [(x, y) for x, ys in splits for y in ys]
    changed = True
    while changed:  # backwards through chains of such ops (Reshape -> Transpose -> Reshape)
        changed = False
        for x, y in reversed(links):
            if y in quant and x not in quant and readers.get(x, 0) == 1:
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
    stats: CalibrationStats,
    target: str = "cpu",
    percentile: float = 99.99,
    defaults: LayerChoice | None = None,
) -> Plan:
    """Choices per layer + calibration statistics -> a self-contained plan."""
    float_precision = "fp16" if target == "fp16" else "fp32"
    full = {la.name: normalized(la, choices.get(la.name, LayerChoice(float_precision))) for la in prepared.layers}
    methods = tensor_methods(prepared, full)
    ranges: dict[str, tuple[float, float]] = {}
    for t, method in methods.items():
        if t not in stats.tensors:
            raise QsearchError(f"no calibration statistics for tensor '{t}' (stale cache?)")
        ranges[t] = tensor_range(stats.tensors[t], method, percentile)
    _, groups = quantized_tensors(prepared, {n for n, c in full.items() if c.is_int8})
    for group in groups:  # one scale per group: the union of its members' ranges (nothing clipped)
        known = [ranges[t] for t in group if t in ranges]
        shared = (min(r[0] for r in known), max(r[1] for r in known))
        for t in group:
            ranges[t] = shared
    if defaults is None:
        labels = [c.label() for c in full.values()]
        defaults = LayerChoice.parse(max(set(labels), key=lambda s: (labels.count(s), s)))
    overrides = {n: c for n, c in full.items() if c != defaults}
    return Plan(
        model_name=prepared.name,
        fingerprint=prepared.fingerprint,
        target=target,
        defaults=defaults,
        layers=overrides,
        ranges=ranges,
        percentile=percentile,
    )
