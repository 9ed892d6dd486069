"""A fine-tuning checkpoint -> the fine-tuned float model, its plan and its QDQ model. Trained
weights go back into the prepared graph's initializers by name (nothing else changes: same
nodes, names and layers), so the new plan names the same layers and keeps their review history;
the QDQ model comes from the same rewriter as every other plan."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from qsearch.errors import QsearchError
from qsearch.model.load import PreparedModel, prepare
from qsearch.plan.format import LayerNote, Plan, provenance
from qsearch.plan.sidecar import Sidecar
from qsearch.recovery.smoothing import scaled_weight
from qsearch.recovery.techniques import combine, split
from qsearch.rewrite import Rewriter, TrainingGraph

KEPT = ("smooth",)  # recovery that stays a graph edit after fine-tuning (x / s before the layer)


@dataclass(frozen=True)
class Checkpoint:
    """Training's state at the end of one epoch, in ONNX terms: initializer values by name (ONNX
    layout, smoothing factors still multiplied in), learned ranges by tensor."""

    epoch: int
    values: Mapping[str, np.ndarray]
    ranges: Mapping[str, tuple[float, float]]
    loss: float


@dataclass(frozen=True)
class Exported:
    float_model: onnx.ModelProto
    prepared: PreparedModel
    plan: Plan
    qdq: onnx.ModelProto


def float_model(prepared: PreparedModel, tg: TrainingGraph, values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """The prepared graph with the trained values in its initializers (same names, dtypes, shapes)."""
    model = onnx.ModelProto.FromString(prepared.proto.SerializeToString())
    for init in model.graph.initializer:
        if init.name not in values:
            continue
        v = np.asarray(values[init.name], dtype=np.float32)
        if init.name in tg.smoothed:  # the graph holds W * s; the float model holds W
            layer, s = tg.smoothed[init.name]
            v = scaled_weight(layer, v, (1.0 / s.astype(np.float64)).astype(np.float32))
        old = numpy_helper.to_array(init)
        if v.shape != old.shape:
            raise QsearchError(f"initializer '{init.name}': trained shape {v.shape} is not the model's {old.shape}")
        init.CopyFrom(numpy_helper.from_array(v.astype(old.dtype), init.name))
    return model


def kept_recovery(recovery: str) -> str:
    return combine([t for t in split(recovery) if t in KEPT]) if recovery != "none" else "none"


def finetuned_plan(source: Plan, prepared: PreparedModel, ranges: Mapping[str, tuple[float, float]],
                   settings: Mapping[str, Any], model_file: str) -> Plan:
    """The source plan's choices for the fine-tuned model: its fingerprint, the learned ranges,
    recovery that training folded or superseded dropped (each such layer's note says which)."""
    layers, notes = {}, dict(source.notes)
    for name, c in source.layers.items():
        kept = kept_recovery(c.recovery)
        layers[name] = dataclasses.replace(c, recovery=kept)
        if kept != c.recovery:
            gone = [t for t in split(c.recovery) if t not in KEPT]
            notes[name] = dataclasses.replace(notes.get(name, LayerNote()), recovery=_note(gone))
    sidecar = Sidecar({k: v for k, v in source.sidecar.arrays.items() if k.split("/", 1)[0] in
                       ("smooth", "smooth_range")})
    return dataclasses.replace(
        source, model_name=prepared.name, fingerprint=prepared.fingerprint, layers=layers,
        ranges={**source.ranges, **ranges}, notes=notes, sidecar=sidecar, model_file=model_file,
        metrics={}, provenance={**provenance(), "finetuned_from": {
            "model": source.model_file or source.model_name, "model_fingerprint": source.fingerprint,
            "plan_sha256": hashlib.sha256(source.to_yaml().encode()).hexdigest()[:16],
            "plan_created": source.provenance.get("created", "")}, "finetune": dict(settings)})


def _note(gone: list[str]) -> str:
    parts = []
    if "cle" in gone:
        parts.append("equalization folded into the fine-tuned weights")
    superseded = [t for t in gone if t in ("bias", "round")]
    if superseded:
        parts.append(" and ".join({"bias": "bias correction", "round": "learned rounding"}[t] for t in superseded)
                     + " superseded by fine-tuning")
    others = [t for t in gone if t not in ("cle", "bias", "round")]
    if others:
        parts.append(f"{', '.join(others)} folded into the fine-tuned weights")
    return "; ".join(parts)


def export(prepared: PreparedModel, tg: TrainingGraph, ck: Checkpoint, source: Plan, settings: Mapping[str, Any],
           model_file: str) -> Exported:
    model = float_model(prepared, tg, ck.values)
    new = prepare(model, name=prepared.name, source=model_file, preparation=source.preparation)
    if set(new.layer_names) != set(prepared.layer_names):  # preparing it again may reorder nodes, no more
        raise QsearchError(f"{model_file}: the fine-tuned model's layers differ from the plan's (internal error)")
    plan = finetuned_plan(source, new, ck.ranges, {**settings, "epoch": ck.epoch}, model_file)
    return Exported(model, new, plan, Rewriter(new)(plan))
