"""Reading a plan file: every field of every schema (1, 2, 3) checked, each error naming the file,
the line and the key; the recovery sidecar loaded and checked byte for byte. The format itself
(the dataclasses, writing) lives in `plan`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from qsearch._version import __version__
from qsearch.calibration import GRANULARITIES, METHODS
from qsearch.engine.isa import WEIGHT_CODES
from qsearch.errors import PlanError, as_kind
from qsearch.files import check_keys, load_yaml, where
from qsearch.model.load import PATTERN_FORMS, PREPARATIONS
from qsearch.plan.format import (
    MAX_RANGE,
    PRECISIONS,
    QUANTIZED,
    SCHEMA_VERSION,
    TARGETS,
    WIDE_TARGETS,
    LayerChoice,
    LayerNote,
    Plan,
    good_range,
)
from qsearch.plan.sidecar import Sidecar
from qsearch.recovery.techniques import recoveries


@as_kind(PlanError)
def read_plan(path: str | os.PathLike) -> Plan:
    """A plan file (any schema), every field checked, its sidecar loaded and checked byte for byte."""
    return plan_from_doc(load_yaml(path, "plan"), path)


@as_kind(PlanError)
def plan_from_doc(doc: Any, path: str | os.PathLike = "<plan>") -> Plan:
    """A plan from a loaded YAML document; errors name the file, the line and the key."""
    if not isinstance(doc, dict) or "qsearch_plan" not in doc:
        raise PlanError(f"{path}: not a qsearch plan (missing 'qsearch_plan' version key)")
    version = doc["qsearch_plan"]
    if isinstance(version, bool) or not isinstance(version, int) or version > SCHEMA_VERSION or version < 1:
        raise PlanError(
            f"{where(path, doc, 'qsearch_plan')}: plan schema version {version!r} is not supported "
            f"by qsearch {__version__} (supports 1..{SCHEMA_VERSION})"
        )
    keys = {"qsearch_plan", "model", "target", "defaults", "layers", "calibration", "metrics", "provenance"}
    extra = {"activation_ranges"} if version == 1 else {"summary", "shared_ranges", "forms"}
    check_keys(path, doc, keys | extra | ({"recovery"} if version >= 3 else set()), "")
    model = doc.get("model") or {}
    check_keys(path, model, {"name", "fingerprint"} | ({"file", "preparation"} if version > 1 else set()), "model")
    preparation = model.get("preparation", 1)  # plans written before graphs were folded name unfolded layers
    if isinstance(preparation, bool) or preparation not in PREPARATIONS:
        raise PlanError(f"{where(path, model, 'preparation')}: model.preparation {preparation!r} is not one of "
                           f"{', '.join(map(str, PREPARATIONS))} (a plan from a newer qsearch?)"[:300])
    if not isinstance(model.get("fingerprint"), str):
        raise PlanError(f"{where(path, doc, 'model')}: 'model.fingerprint' is missing")
    target = doc.get("target", "cpu")
    if target not in TARGETS:
        raise PlanError(f"{where(path, doc, 'target')}: target {target!r} is not one of {', '.join(TARGETS)}")
    if version == 1:  # overrides of `defaults` (which defaulted to int8 per-channel) and a flat range table
        defaults: LayerChoice | None = _parse_choice(path, doc.get("defaults") or {}, LayerChoice(), "defaults")
    else:
        defaults = None if doc.get("defaults") is None else _parse_choice(
            path, doc["defaults"], LayerChoice(), "defaults")
    calib = doc.get("calibration") or {}
    check_keys(path, calib, {"percentile"}, "calibration")
    pct = calib.get("percentile", 99.99)
    if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 50.0 <= pct <= 100.0:
        raise PlanError(f"{where(path, calib, 'percentile')}: calibration.percentile must be a number in "
                           f"[50, 100], got {pct!r}")
    forms = _read_forms(path, doc)
    for key in ("metrics", "provenance"):
        if doc.get(key) is not None and not isinstance(doc[key], dict):
            raise PlanError(f"{where(path, doc, key)}: '{key}' must be a mapping, got {doc[key]!r}"[:300])
    ranges: dict[str, tuple[float, float]] = {}
    owner: dict[str, str] = {}
    notes: dict[str, LayerNote] = {}
    if version == 1:
        layers_doc = doc.get("layers") or {}
        if not isinstance(layers_doc, dict):
            raise PlanError(f"{where(path, doc, 'layers')}: 'layers' must be a mapping")
        layers = {str(n): _parse_choice(path, c or {}, defaults, f"layers.{n}") for n, c in layers_doc.items()}
        _read_ranges(path, doc, "activation_ranges", ranges, owner)
    else:
        layers = _read_layers(path, doc, defaults, ranges, owner, notes)
        _read_ranges(path, doc, "shared_ranges", ranges, owner)
    wide = next((n for n, c in layers.items() if c.precision == "int16"), None)
    if wide is not None and target not in WIDE_TARGETS:
        raise PlanError(f"{where(path, doc, 'target')}: layer '{wide}' is int16 (uint16 activations), which target "
                        f"{target!r} cannot run: use target {' or '.join(WIDE_TARGETS)}")
    return Plan(
        model_name=str(model.get("name", "model")),
        fingerprint=model["fingerprint"],
        target=target,
        defaults=defaults,
        layers=layers,
        ranges=ranges,
        percentile=float(pct),
        metrics=dict(doc.get("metrics") or {}),
        provenance=dict(doc.get("provenance") or {}),
        notes=notes,
        model_file=str(model.get("file", "")),
        forms={str(k): str(v) for k, v in forms.items()},
        sidecar=_read_sidecar(path, doc),
        preparation=preparation,
    )


def _read_sidecar(path, doc: dict) -> Sidecar:
    """The plan's `recovery: {file, sha256}`: the sidecar next to the plan, checked byte for byte."""
    rec = doc.get("recovery")
    if rec is None:
        return Sidecar()
    check_keys(path, rec, {"file", "sha256"}, "recovery")
    name, sha = rec.get("file"), rec.get("sha256")
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise PlanError(f"{where(path, rec, 'file')}: recovery.file must be a file name next to the plan, "
                           f"got {name!r}"[:300])
    if not isinstance(sha, str) or len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha):
        raise PlanError(f"{where(path, rec, 'sha256')}: recovery.sha256 must be 64 hex digits, got {sha!r}"[:300])
    side = os.path.join(os.path.dirname(os.fspath(path)), name)
    if not os.path.isfile(side):
        raise PlanError(f"{path}: recovery sidecar '{side}' not found: the plan's recovery arrays are stored "
                           "there (copy it with the plan)")
    with open(side, "rb") as f:
        data = f.read()
    return Sidecar.from_bytes(data, side, sha)


def _read_forms(path, doc: dict) -> dict:
    """The plan's `forms` (pattern -> form), each checked against `PATTERN_FORMS`."""
    forms = doc.get("forms")
    if forms is None:
        return {}
    if not isinstance(forms, dict):  # (false, 0, "" and [] too: nothing is silently ignored)
        raise PlanError(f"{where(path, doc, 'forms')}: 'forms' must be a mapping of pattern -> form, got "
                           f"{forms!r}"[:300])
    for k, v in forms.items():
        if k not in PATTERN_FORMS:
            raise PlanError(f"{where(path, forms, k)}: forms.{k}: unknown pattern (known: "
                               f"{', '.join(PATTERN_FORMS)})")
        if v not in PATTERN_FORMS[k]:
            raise PlanError(f"{where(path, forms, k)}: forms.{k} is {v!r}, expected one of "
                               f"{', '.join(PATTERN_FORMS[k])}"[:300])
    return forms


def _read_layers(path, doc: dict, defaults: LayerChoice | None, ranges: dict, owner: dict,
                 notes: dict) -> dict[str, LayerChoice]:
    """Schema-2 `layers`: one entry per layer with its option, ranges and reviewer notes (the
    ranges and notes are collected into `ranges`/`owner` and `notes`)."""
    layers: dict[str, LayerChoice] = {}
    layers_doc = doc.get("layers") or []
    if not isinstance(layers_doc, list):
        raise PlanError(f"{where(path, doc, 'layers')}: 'layers' must be a list of layer entries")
    for i, e in enumerate(layers_doc):
        if not isinstance(e, dict) or not isinstance(e.get("layer"), str):
            raise PlanError(f"{where(path, layers_doc, i)}: layers[{i}] must be a mapping with a "
                               f"'layer' name, got {e!r}"[:300])
        name = e["layer"]
        if name in layers:
            raise PlanError(f"{where(path, layers_doc, i)}: layer '{name}' is listed twice")
        check_keys(path, e, {"layer", "name", "op", "precision", "calibration", "granularity", "ranges", "why",
                             "recovery", "recovery_factors", "weights"}, f"layers.{name}")
        for key in ("name", "op", "why", "recovery_factors"):
            if key in e and not isinstance(e[key], str):
                raise PlanError(f"{where(path, e, key)}: layers.{name}.{key} must be text, got {e[key]!r}"[:300])
        # no granularity written: a weightless layer (Add, Concat...), one scale per tensor
        base = replace(defaults or LayerChoice(), granularity="per_tensor") if "granularity" not in e else \
            defaults or LayerChoice()
        layers[name] = _parse_choice(path, {k: e[k] for k in ("precision", "calibration", "granularity", "recovery", "weights")
                                            if k in e}, base, f"layers.{name}")
        tensors = _read_ranges(path, e, "ranges", ranges, owner, f"layers.{name}.ranges", name)
        note = LayerNote(e.get("op", ""), e.get("name", ""), e.get("why", ""),
                         "granularity" in e or not layers[name].quantized, tuple(tensors), e.get("recovery_factors", ""))
        if note != LayerNote():
            notes[name] = note
    return layers


def _read_ranges(path, doc: Mapping, key: str, ranges: dict, owner: dict, label: str | None = None,
                 layer: str | None = None) -> list[str]:
    """Parse one range table into `ranges`; a tensor listed twice must carry the same range."""
    table = doc.get(key) or {}
    label = label or key
    if not isinstance(table, dict):
        raise PlanError(f"{where(path, doc, key)}: {label} must be a mapping of tensor -> [min, max]")
    for t, r in table.items():
        if not isinstance(r, list) or not good_range(r):
            raise PlanError(
                f"{where(path, table, t)}: {label}.{t} must be [min <= 0, max >= 0] with "
                f"|values| <= {MAX_RANGE:g}, got {r!r}"[:300]
            )
        t, v = str(t), (float(r[0]), float(r[1]))
        if t in ranges and ranges[t] != v:
            raise PlanError(f"{where(path, table, t)}: tensor '{t}' has range {list(v)} here but "
                               f"{list(ranges[t])} in {owner[t]}; one tensor has one scale")
        ranges[t] = v
        owner.setdefault(t, f"layer '{layer}'" if layer else key)
    return [str(t) for t in table]


def _parse_choice(path, d: Any, base: LayerChoice, section: str) -> LayerChoice:
    check_keys(path, d, {"precision", "calibration", "granularity", "recovery", "weights"}, section)
    for key, allowed in (("precision", PRECISIONS), ("calibration", METHODS), ("granularity", GRANULARITIES),
                         ("recovery", recoveries()), ("weights", WEIGHT_CODES)):
        if key in d and d[key] not in allowed:
            raise PlanError(
                f"{where(path, d, key)}: {section}.{key} is {d[key]!r}, expected one of {', '.join(allowed)}"
            )
    precision = d.get("precision", base.precision)
    recovery = d.get("recovery", base.recovery if precision in QUANTIZED else "none")
    if recovery != "none" and precision not in QUANTIZED:
        raise PlanError(f"{where(path, d, 'recovery')}: {section}.recovery {recovery!r} needs precision int8 or "
                           f"int16, not {precision}")
    if precision == "int16" and d.get("weights", "int8") != "int8":  # an NPU's int16 layer keeps int8 weights
        raise PlanError(f"{where(path, d, 'weights')}: {section}.weights {d['weights']!r} needs precision int8: "
                        "an int16 layer's weights are int8")
    # like calibration, a float layer's weight encoding means nothing: a reviewer who turns a layer
    # float need not delete it
    weights = d.get("weights", base.weights) if precision == "int8" else "int8"
    return LayerChoice(precision, d.get("calibration", base.calibration), d.get("granularity", base.granularity),
                       recovery, weights)
