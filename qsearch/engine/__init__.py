"""Where a plan runs: the engine seam (`Engine`: sessions, timing, per-node profiles), its
implementations by name, and the CPU's int8 arithmetic path (`isa`).

A new engine is one module with a class satisfying `Engine` and one entry in `ENGINES`."""

from __future__ import annotations

from qsearch.engine.base import Engine, NodeTime, Session, Timing, profiles_nodes
from qsearch.engine.isa import WEIGHT_CODES, Int8Path, detect, mismatch, safe_weights, weight_limits
from qsearch.engine.onnxruntime import OrtCpu

ENGINES: dict[str, str] = {"onnxruntime": "qsearch.engine.onnxruntime:OrtCpu",
                           "openvino": "qsearch.engine.openvino:OpenVinoCpu"}  # imported on use
ENGINE_EXTRAS = {"onnxruntime": "test", "openvino": "openvino"}  # the extra that installs each
ENGINE_PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}


def installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(ENGINE_PACKAGES[name]) is not None


EXACT_TARGETS = ("npu",)  # targets whose integer arithmetic is exact: scored on the QDQ graph as written
HOOK_TIMEOUT_S = 600.0  # a hook call's limit where --eval-timeout sets none


def create(name: str = "onnxruntime", threads: int = 1, exact: bool = False) -> Engine:
    """The named engine, with `threads` intra-op threads; `exact` (ONNX Runtime, NPU targets): Q/DQ
    computed as written, not on this CPU's int8 kernels (`OrtCpu`)."""
    import importlib

    module, _, cls = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), cls)(threads, **({"exact": True} if exact else {}))


def for_workload(workload, eval_timeout: float | None = None) -> Engine:
    """The engine a workload asks for: its latency hook (`runtime.latency`, imported now, so a hook
    that does not import fails before any work), else ONNX Runtime's CPU provider."""
    exact = workload.target in EXACT_TARGETS and workload.engine == "onnxruntime"
    if not workload.latency:
        return create(workload.engine, threads=workload.threads, exact=exact)
    from qsearch.engine.hook import LatencyHook

    timeout = eval_timeout if eval_timeout is not None and eval_timeout > 0 else HOOK_TIMEOUT_S
    return LatencyHook(workload.latency, workload.latency_where, workload.base, workload.threads, timeout,
                       scoring=create(workload.engine, threads=workload.threads, exact=exact))


__all__ = ["ENGINES", "ENGINE_EXTRAS", "installed", "HOOK_TIMEOUT_S", "for_workload", "WEIGHT_CODES", "Engine", "Int8Path", "NodeTime", "OrtCpu", "Session", "Timing", "create", "profiles_nodes",
           "detect", "mismatch", "safe_weights", "weight_limits"]
