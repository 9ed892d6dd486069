"""The mixed-precision plan: what to do with each layer, and the ranges to do it with.

A plan is self-contained (activation ranges included, so `apply` needs no data and is
deterministic), bound to one model by fingerprint, and written for review: every layer in graph
order with its op, a readable name where the model has one, its choice, the ranges it is
quantized with and why; stable key order, so two plans diff cleanly. Schema 1 plans (overrides of
`defaults` and one flat range table) still load.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np
import yaml

from qsearch._version import __version__
from qsearch.calibration import GRANULARITIES, METHODS
from qsearch.engine.isa import WEIGHT_CODES, detect
from qsearch.errors import PlanError
from qsearch.files import atomic_write_bytes, atomic_write_text
from qsearch.model.load import PATTERN_FORMS, PREPARATIONS, PREPARE_VERSION, PreparedModel
from qsearch.plan.sidecar import Sidecar, sidecar_name
from qsearch.recovery.techniques import recoveries

MAX_RANGE = float(np.finfo(np.float32).max)  # a plan's range must be float32: its scale then stays finite
SCHEMA_VERSION = 3  # 3: per-layer recovery and its sidecar; 1 and 2 still load
PRECISIONS = ("int8", "int16", "fp16", "fp32")  # int16: uint16 activations, int8 weights (NPUs)
TARGETS = ("cpu", "fp16", "npu")  # cpu: float layers run FP32; fp16 (GPU) and npu: float layers run FP16
WIDE_TARGETS = ("npu",)  # the targets that run int16 layers
QUANTIZED = ("int8", "int16")


@dataclass(frozen=True)
class LayerChoice:
    precision: str = "int8"
    calibration: str = "minmax"
    granularity: str = "per_channel"
    recovery: str = "none"  # `recovery.techniques.recoveries()`: techniques combined
    weights: str = "int8"  # how the weight is stored (`engine.isa.WEIGHT_CODES`): int7 and uint8 never saturate

    def __post_init__(self) -> None:
        """Checked however the choice is made (YAML, the Python API, a strategy): an unknown
        precision must not run silently as float."""
        for key, value, allowed in (("precision", self.precision, PRECISIONS),
                                    ("calibration", self.calibration, METHODS),
                                    ("granularity", self.granularity, GRANULARITIES),
                                    ("recovery", self.recovery, recoveries()),
                                    ("weights", self.weights, WEIGHT_CODES)):
            if value not in allowed:
                raise PlanError(f"layer choice: {key} {value!r} is not one of {', '.join(allowed)}")
        if self.recovery != "none" and not self.quantized:
            raise PlanError(f"layer choice: recovery {self.recovery!r} needs precision int8 or int16, "
                            f"not {self.precision}")
        if self.weights != "int8" and self.precision != "int8":
            # int7 / uint8 weights avoid the u8s8 saturation of x86 CPUs; an int16 layer runs on an NPU
            raise PlanError(f"layer choice: weights {self.weights!r} need precision int8, not {self.precision}")

    @property
    def quantized(self) -> bool:
        """Whether the layer runs on integer kernels (int8 weights; uint8 or uint16 activations)."""
        return self.precision in QUANTIZED

    @property
    def activation_bits(self) -> int:
        """The width of the layer's activation codes: 16 for int16, else 8 (float layers: none, 0)."""
        return {"int8": 8, "int16": 16}.get(self.precision, 0)

    def label(self) -> str:
        if not self.quantized:
            return self.precision
        return (f"{self.precision}/{self.calibration}/{self.granularity}"
                + ("" if self.recovery == "none" else f"/{self.recovery}")
                + ("" if self.weights == "int8" else f"@{self.weights}"))

    @classmethod
    def parse(cls, label: str) -> LayerChoice:
        """The inverse of `label` ('int8/minmax/per_channel/cle@int7', 'int16/mse/per_tensor', 'fp32')."""
        label, _, weights = label.partition("@")
        parts = label.split("/")
        if parts[0] in QUANTIZED and len(parts) in (3, 4):
            return cls(parts[0], *parts[1:3], parts[3] if len(parts) == 4 else "none", weights or "int8")
        return cls(parts[0])


@dataclass(frozen=True)
class LayerNote:
    """What a reviewer reads beside a layer's choice; `apply` ignores it. `tensors`: the layer's
    activations and output, whose ranges the plan lists under the layer."""

    op: str = ""
    readable: str = ""  # the exporter's module path (node metadata) where the model has one
    why: str = ""
    weighted: bool = True  # has a weight: int8 granularity means something
    tensors: tuple[str, ...] = ()
    recovery: str = ""  # what its recovery does here, summarized (equalized with whom, factors)


@dataclass(frozen=True)
class Plan:
    model_name: str
    fingerprint: str
    target: str = "cpu"
    defaults: LayerChoice | None = None  # layers not listed (None: float); qsearch lists every layer
    layers: Mapping[str, LayerChoice] = field(default_factory=dict)  # graph order
    ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    percentile: float = 99.99
    metrics: Mapping[str, Any] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    notes: Mapping[str, LayerNote] = field(default_factory=dict)
    model_file: str = ""
    forms: Mapping[str, str] = field(default_factory=dict)  # pattern -> form (`PATTERN_FORMS`), measured
    sidecar: Sidecar = field(default_factory=Sidecar)  # recovery arrays (equalization scales, input means)
    preparation: int = PREPARE_VERSION  # how the float graph it names was prepared (`model.PREPARATIONS`)

    def __post_init__(self) -> None:
        """Every way of making a plan is checked (the YAML reader first, naming file and line; then
        this, for plans built in Python): ranges a uint8 scale can be computed from, a known target,
        known forms, choices that are `LayerChoice`s."""
        if self.target not in TARGETS:
            raise PlanError(f"plan: target {self.target!r} is not one of {', '.join(TARGETS)}")
        for name, c in self.layers.items():
            if not isinstance(c, LayerChoice):
                raise PlanError(f"plan: layer '{name}': its choice must be a LayerChoice, got {c!r}"[:300])
            if c.precision == "int16" and self.target not in WIDE_TARGETS:
                raise PlanError(f"plan: layer '{name}' is int16 (uint16 activations), which target {self.target!r} "
                                f"cannot run: use target {' or '.join(WIDE_TARGETS)}")
        for t, r in self.ranges.items():
            if not good_range(r):
                raise PlanError(f"plan: tensor '{t}': range must be [min <= 0, max >= 0], finite, |values| <= "
                                   f"{MAX_RANGE:g}, got {r!r}"[:300])
        for k, v in self.forms.items():
            if k not in PATTERN_FORMS or v not in PATTERN_FORMS[k]:
                raise PlanError(f"plan: forms.{k} = {v!r} is not a known pattern form")
        if self.preparation not in PREPARATIONS:
            raise PlanError(f"plan: model.preparation {self.preparation!r} is not one of "
                               f"{', '.join(map(str, PREPARATIONS))}")
        if isinstance(self.percentile, bool) or not 50.0 <= float(self.percentile) <= 100.0:
            raise PlanError(f"plan: percentile must be in [50, 100], got {self.percentile!r}")

    @property
    def float_precision(self) -> str:
        return "fp32" if self.target == "cpu" else "fp16"

    def choice(self, layer: str) -> LayerChoice:
        got = self.layers.get(layer, self.defaults)
        return got if got is not None else LayerChoice(self.float_precision)

    @property
    def figures(self) -> Figures:
        """The measured figures of `metrics`, typed (a hand-edited field that is not a number reads None)."""
        return Figures.of(self.metrics)

    def with_info(self, metrics: Mapping[str, Any] | None = None, **provenance: Any) -> Plan:
        return replace(
            self,
            metrics={**self.metrics, **(metrics or {})},
            provenance={**self.provenance, **provenance},
        )

    def with_why(self, why: Mapping[str, str]) -> Plan:
        """The same plan with a reason per layer (sensitivity, measured cost) for the reviewer."""
        return replace(self, notes={n: replace(self.notes.get(n, LayerNote()), why=w) for n, w in
                                    {**{n: x.why for n, x in self.notes.items()}, **why}.items()})

    # ------------------------------------------------------------------ YAML
    def to_yaml(self, sidecar_file: str = "plan.recovery.onnx") -> str:
        """The plan as written; a plan with recovery arrays names its sidecar `sidecar_file`."""
        grouped: set[str] = set()
        entries = []
        for name, c in self.layers.items():
            note = self.notes.get(name, LayerNote())
            e: dict[str, Any] = {"layer": name}
            if note.readable:
                e["name"] = note.readable
            if note.op:
                e["op"] = note.op
            e["precision"] = c.precision
            if c.quantized:
                e["calibration"] = c.calibration
                if note.weighted:
                    e["granularity"] = c.granularity
                if note.weighted and c.weights != "int8":
                    e["weights"] = c.weights
                if c.recovery != "none":
                    e["recovery"] = c.recovery
                    if note.recovery:
                        e["recovery_factors"] = note.recovery
                mine = {t: self.ranges[t] for t in note.tensors if t in self.ranges}
                if mine:
                    e["ranges"] = {t: [float(a), float(b)] for t, (a, b) in mine.items()}
                    grouped.update(mine)
            if note.why:
                e["why"] = note.why
            entries.append(e)
        n8 = sum(c.precision == "int8" for c in self.layers.values())
        n16 = sum(c.precision == "int16" for c in self.layers.values())
        doc: dict[str, Any] = {
            "qsearch_plan": SCHEMA_VERSION,
            "model": {"name": self.model_name, "fingerprint": self.fingerprint,
                      **({"file": self.model_file} if self.model_file else {}),
                      **({"preparation": self.preparation} if self.preparation > 1 else {})},
            "target": self.target,
            "summary": {"layers": len(self.layers), "int8": n8, **({"int16": n16} if n16 else {}),
                        "float": len(self.layers) - n8 - n16},
            "calibration": {"percentile": self.percentile},
        }
        if self.forms:  # how patterns without an int8 kernel (hardswish) run inside int8 regions
            doc["forms"] = dict(sorted(self.forms.items()))
        if self.sidecar:  # the arrays, losslessly, next to the plan
            doc["recovery"] = {"file": sidecar_file, "sha256": self.sidecar.sha256}
        if self.defaults is not None:
            doc["defaults"] = _choice_dict(self.defaults, None)
        doc["layers"] = entries
        # lossless (YAML writes a float's shortest round-trip repr): apply must rebuild the exact scales
        shared = {t: [float(a), float(b)] for t, (a, b) in sorted(self.ranges.items()) if t not in grouped}
        if shared:  # tensors of value-moving ops (MaxPool, Reshape...) sharing a neighbour's scale
            doc["shared_ranges"] = shared
        doc["metrics"] = _plain(self.metrics)
        doc["provenance"] = _plain({"qsearch": __version__, **self.provenance})
        return yaml.dump(doc, Dumper=_PlanDumper, sort_keys=False, default_flow_style=False, width=120)

    def write(self, path: str | os.PathLike) -> None:
        """The sidecar first, then the plan naming it: a plan on disk never names a missing sidecar."""
        name = sidecar_name(str(path))
        if self.sidecar:
            atomic_write_bytes(os.path.join(os.path.dirname(os.fspath(path)), name), self.sidecar.to_bytes())
        atomic_write_text(path, self.to_yaml(name))

    def completed(self, prepared: PreparedModel) -> Plan:
        """Every layer of the model listed in graph order with its notes (ranges grouped per layer):
        what an old (schema 1) or hand-written partial plan looks like once migrated."""
        notes = layer_notes(prepared)
        for n, x in self.notes.items():
            if n in notes and x.why:
                notes[n] = replace(notes[n], why=x.why)
        return replace(self, defaults=None, layers={la.name: self.choice(la.name) for la in prepared.layers},
                       notes=notes)

    def form(self, pattern: str) -> str:
        """How `pattern` runs inside int8 regions (plans without `forms`: decomposed, as before)."""
        return self.forms.get(pattern, PATTERN_FORMS[pattern][0])


def layer_notes(prepared: PreparedModel) -> dict[str, LayerNote]:
    """Op, readable name (the exporter's module path, else op and index: 'Conv 12'), weight or not,
    and the tensors of every layer."""
    seen: dict[str, int] = {}
    notes = {}
    for la in prepared.layers:
        kind = "HardSwish" if la.pattern == "hardswish" else la.op_type  # a Mul that computes hardswish
        seen[kind] = seen.get(kind, 0) + 1
        outputs = () if la.float_output else (la.output, *([la.fused_output] if la.fused_output not in ("", la.output)
                                                         else []))
        tensors = (*la.activations, *outputs)
        notes[la.name] = LayerNote(la.op_type, la.readable or f"{kind} {seen[kind]}", "", la.has_weight, tensors)
    return notes


def provenance(**extra: Any) -> dict[str, Any]:
    """When and with what a plan was made (UTC date, library versions): a reviewer can tell two
    plans' origins apart, and no local path leaks into a shared file."""
    import onnx
    import onnxruntime

    out: dict[str, Any] = {"created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                           "qsearch": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                           "numpy": np.__version__, "int8_path": detect().name}
    try:
        import optuna

        out["optuna"] = optuna.__version__
    except ImportError:  # pragma: no cover - optuna is a dependency
        pass
    return {**out, **extra}


class _PlanDumper(yaml.SafeDumper):
    """Block style, one layer entry field per line (reviewable diffs); lists such as a range
    [min, max] on one line."""


_PlanDumper.add_representer(list, lambda d, v: d.represent_sequence(
    "tag:yaml.org,2002:seq", v, flow_style=not any(isinstance(x, (dict, list)) for x in v)))


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
    if c.quantized:
        if defaults is None or c.calibration != defaults.calibration or not defaults.quantized:
            d["calibration"] = c.calibration
        if defaults is None or c.granularity != defaults.granularity or not defaults.quantized:
            d["granularity"] = c.granularity
        if c.recovery != "none":
            d["recovery"] = c.recovery
        if c.weights != "int8":
            d["weights"] = c.weights
    return d


def closest(name: str, known) -> str:
    import difflib

    near = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean '{near[0]}'?)" if near else ""


def good_range(r: Any) -> bool:
    """[min <= 0 <= max], numbers, finite, within float32 (beyond it the scale of a uint8 tensor is
    inf, and the model computes NaN)."""
    if not isinstance(r, (list, tuple)) or len(r) != 2:
        return False
    if not all(isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) for v in r):
        return False
    return all(np.isfinite(v) and abs(v) <= MAX_RANGE for v in r) and r[0] <= 0 <= r[1]


def number(v: Any) -> float | None:
    """A figure read from a plan: a finite number, else None (a hand-edited plan may hold anything)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        return None
    return float(v) if np.isfinite(v) else None


@dataclass(frozen=True)
class Figures:
    """The measured figures of a plan's `metrics` block, typed: only displayed, never trusted, so a
    field that is not a finite number reads None and is left out of what is shown."""

    metric: str = "score"
    test: float | None = None
    fp32_test: float | None = None
    latency_ms: float | None = None
    fp32_latency_ms: float | None = None
    size_bytes: float | None = None
    fp32_size_bytes: float | None = None

    @classmethod
    def of(cls, metrics: Mapping[str, Any]) -> Figures:
        p = metrics.get("plan") if isinstance(metrics.get("plan"), Mapping) else {}
        f = metrics.get("fp32") if isinstance(metrics.get("fp32"), Mapping) else {}
        return cls(str(metrics.get("metric", "score"))[:40], number(p.get("test")), number(f.get("test")),
                   number(p.get("latency_ms")), number(f.get("latency_ms")), number(p.get("size_bytes")),
                   number(f.get("size_bytes")))

    def text(self) -> str:
        """'metric: test 0.98 (FP32 0.99), latency 1.2 ms (1.5x FP32), size 0.3x', or '' when nothing holds."""
        parts = []
        if self.test is not None:
            parts.append(f"test {self.test:.4f}" + (f" (FP32 {self.fp32_test:.4f})" if self.fp32_test is not None else ""))
        if self.latency_ms is not None and self.latency_ms > 0:
            ratio = f" ({self.fp32_latency_ms / self.latency_ms:.2f}x FP32)" if self.fp32_latency_ms else ""
            parts.append(f"latency {self.latency_ms:.3f} ms{ratio}")
        if self.size_bytes is not None and self.fp32_size_bytes:
            parts.append(f"size {self.size_bytes / self.fp32_size_bytes:.2f}x")
        return f"{self.metric}: {', '.join(parts)}" if parts else ""
