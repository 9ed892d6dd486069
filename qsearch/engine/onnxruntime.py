"""ONNX Runtime's CPU provider as an `Engine`, and its session options: the one place they are
set (threads, logging, optimizer level, profiling), so every stage measures models under the same
settings. `make_session` also serves graph tooling that needs ONNX Runtime itself, whatever the
engine (its optimizer prepares graphs; its fused graph shows which int8 kernels run)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort

from qsearch.engine.base import NodeTime, Timing


def session_options(threads: int = 1, level: ort.GraphOptimizationLevel | None = None,
                    optimized_path: str | None = None, profile_prefix: str | None = None) -> ort.SessionOptions:
    """`threads` intra-op threads and one inter-op thread (with one thread ORT runs the kernels on
    the caller's thread, which is what makes thread CPU time a measure of a model's work)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if level is not None:
        so.graph_optimization_level = level
    if optimized_path is not None:
        so.optimized_model_filepath = optimized_path
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def make_session(model: onnx.ModelProto | bytes | str, threads: int = 1, **options) -> ort.InferenceSession:
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(src, session_options(threads, **options), providers=["CPUExecutionProvider"])


class OrtCpu:
    """ONNX Runtime's CPU provider with `threads` intra-op threads. `exact`: Q/DQ stays unfused (the
    basic optimizer level), so every quantized layer computes exactly what its QDQ graph says, as an
    NPU's integer arithmetic does, instead of on this CPU's int8 kernels (which saturate u8 x s8
    pairs without VNNI); timings then do not show int8 kernels, so NPU targets cost bit-operations."""

    name = "onnxruntime"
    per_node = True  # ORT's profiler times every node: the analysis attributes time per layer

    def __init__(self, threads: int = 1, exact: bool = False):
        self.threads = threads
        self.level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if exact else None

    def session(self, model: onnx.ModelProto | bytes | str) -> ort.InferenceSession:
        return make_session(model, self.threads, level=self.level)

    def time(self, session: ort.InferenceSession, feed: Mapping[str, np.ndarray], warmup: int = 3,
             repeat: int = 15) -> Timing:
        feed = dict(feed)
        for _ in range(warmup):
            session.run(None, feed)
        wall, cpu = [], []
        for _ in range(repeat):
            t, c = time.perf_counter(), time.thread_time()
            session.run(None, feed)
            cpu.append(time.thread_time() - c)
            wall.append(time.perf_counter() - t)
        return Timing(float(np.median(wall) * 1e3), float(np.median(cpu) * 1e3))

    def profile(self, model: onnx.ModelProto, feed: Mapping[str, np.ndarray], runs: int = 5,
                warmup: int = 2) -> list[NodeTime]:
        """From ONNX Runtime's profiler, keeping the last `runs` runs (the first pay for allocation
        and caches)."""
        with tempfile.TemporaryDirectory(prefix="qsearch-prof-") as tmp:
            sess = make_session(model, self.threads, level=self.level, profile_prefix=os.path.join(tmp, "profile"))
            for _ in range(warmup + runs):
                sess.run(None, dict(feed))
            with open(sess.end_profiling()) as f:
                events = json.load(f)
        starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
        t0 = starts[-runs] if len(starts) >= runs else 0
        total: dict[str, float] = {}
        ops: dict[str, str] = {}
        for e in events:
            if e.get("cat") != "Node" or e.get("ts", 0) < t0 or not e.get("name", "").endswith("_kernel_time"):
                continue
            n = e["name"][: -len("_kernel_time")]
            total[n] = total.get(n, 0.0) + e["dur"] / 1e3
            ops[n] = e.get("args", {}).get("op_name", "")
        return [NodeTime(n, ops[n], total[n] / runs) for n in total]
