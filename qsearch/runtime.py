"""ONNX Runtime sessions: the one place they are configured (threads, logging, optimizer level,
profiling), so every stage measures models under the same settings."""

from __future__ import annotations

import onnx
import onnxruntime as ort


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
