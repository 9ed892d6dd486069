"""Where a plan runs: the engine seam (`Engine`: sessions, timing, per-node profiles), its
implementations by name, and the CPU's int8 arithmetic path (`isa`).

A new engine is one module with a class satisfying `Engine` and one entry in `ENGINES`."""

from __future__ import annotations

from qsearch.engine.base import Engine, NodeTime, Session, Timing
from qsearch.engine.isa import WEIGHT_CODES, Int8Path, detect, mismatch, safe_weights, weight_limits
from qsearch.engine.onnxruntime import OrtCpu

ENGINES: dict[str, type] = {"onnxruntime": OrtCpu}


def create(name: str = "onnxruntime", threads: int = 1) -> Engine:
    """The named engine, with `threads` intra-op threads."""
    return ENGINES[name](threads)


__all__ = ["ENGINES", "WEIGHT_CODES", "Engine", "Int8Path", "NodeTime", "OrtCpu", "Session", "Timing", "create",
           "detect", "mismatch", "safe_weights", "weight_limits"]
