"""A plan's recovery arrays, stored losslessly next to it: a deterministic ONNX tensor file named
by its sha256 in the plan, so `apply` needs no data and a damaged or foreign file is refused."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qsearch.errors import PlanError

SIDECAR_KINDS = {"equalize": "equalization scales", "mean": "input means", "smooth": "smoothing factors",
                 "smooth_range": "smoothed input range", "round": "learned weight codes"}
SIDECAR_NAME = "qsearch_recovery"  # the ONNX graph name that marks a qsearch sidecar


@dataclass(frozen=True, eq=False)
class Sidecar:
    """The recovery arrays of one plan: `equalize/<head layer>` scales, `mean/<layer>` input means,
    `smooth/<tensor>` smoothing factors and `smooth_range/<tensor>` the smoothed tensor's range.
    Compared and named by the sha256 of its bytes (deterministic: sorted, raw float32)."""

    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for k, v in self.arrays.items():
            kind = k.split("/", 1)[0]
            if kind not in SIDECAR_KINDS or "/" not in k:
                raise PlanError(f"recovery sidecar: unknown entry '{k}' (expected "
                                   f"{', '.join(f'{x}/<name>' for x in SIDECAR_KINDS)})")
            a = np.asarray(v)
            if a.ndim != 1 or a.size == 0 or not np.all(np.isfinite(a)):
                raise PlanError(f"recovery sidecar: '{k}' must be a non-empty vector of finite numbers")
            if kind in ("equalize", "smooth") and not np.all(a > 0):
                raise PlanError(f"recovery sidecar: '{k}': {SIDECAR_KINDS[kind]} must be positive, found "
                                   f"{float(a.min())!r}")
            if kind == "smooth_range" and not (a.size == 2 and a[0] <= 0 <= a[1]):
                raise PlanError(f"recovery sidecar: '{k}' must be [low, high] around zero")
            if kind == "round" and not (np.all(a == np.round(a)) and np.abs(a).max() <= 127):
                raise PlanError(f"recovery sidecar: '{k}': learned weight codes must be integers in [-127, 127]")

    def to_bytes(self) -> bytes:
        g = helper.make_graph([], SIDECAR_NAME, [], [], [numpy_helper.from_array(
            np.ascontiguousarray(self.arrays[k], dtype=np.float32), k) for k in sorted(self.arrays)])
        return g.SerializeToString(deterministic=True)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sidecar) and self.sha256 == other.sha256

    def __hash__(self) -> int:
        return hash(self.sha256)

    def __bool__(self) -> bool:
        return bool(self.arrays)

    def scales(self) -> dict[str, np.ndarray]:
        return {k.split("/", 1)[1]: v for k, v in self.arrays.items() if k.startswith("equalize/")}

    def means(self) -> dict[str, np.ndarray]:
        return self.of("mean")

    def of(self, kind: str) -> dict[str, np.ndarray]:
        """name -> array of one kind of entry (`SIDECAR_KINDS`)."""
        return {k.split("/", 1)[1]: v for k, v in self.arrays.items() if k.split("/", 1)[0] == kind}

    @classmethod
    def from_bytes(cls, data: bytes, source: str, sha256: str) -> Sidecar:
        """Checked as `apply` needs it: the right bytes (sha256), a qsearch sidecar, sound arrays."""
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            raise PlanError(f"{source}: sha256 {got[:16]}... does not match the plan's {sha256[:16]}...: the "
                               "sidecar is truncated, damaged or belongs to another plan")
        try:
            g = onnx.GraphProto.FromString(data)
            arrays = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        except Exception as exc:
            raise PlanError(f"{source}: not a qsearch recovery sidecar ({type(exc).__name__})") from None
        if g.name != SIDECAR_NAME or g.node:
            raise PlanError(f"{source}: not a qsearch recovery sidecar (graph '{g.name[:40]}')")
        try:
            return cls(arrays)
        except PlanError as exc:
            raise PlanError(f"{source}: {exc}") from None


def sidecar_name(plan_path: str) -> str:
    """plan.yaml -> plan.recovery.onnx, next to it."""
    return Path(plan_path).stem + ".recovery.onnx"
