"""OpenVINO's CPU plugin as an `Engine`: the same QDQ model, run on OpenVINO's own int8 kernels
(its ONNX frontend turns each Q/DQ pair into a FakeQuantize and fuses it into the int8 kernels it
can). Scores, timings, a per-node profile (`InferRequest.get_profiling_info` with `PERF_COUNT`)
and which layers really ran int8 (`runtimePrecision` of the compiled model's nodes).

Float layers run FP32 (`INFERENCE_PRECISION_HINT: f32`): OpenVINO would otherwise pick bf16 on a
CPU with AMX or AVX-512 BF16, which is another target than `cpu`. Needs the `openvino` extra."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from qsearch.engine.base import NodeTime, Timing

INT8_EXEC = ("I8", "U8", "i8", "u8")  # OpenVINO's exec_type names the precision a kernel ran in
ORT_TYPES = {np.dtype(np.float32): "tensor(float)", np.dtype(np.float16): "tensor(float16)",
             np.dtype(np.int64): "tensor(int64)", np.dtype(np.int32): "tensor(int32)",
             np.dtype(np.uint8): "tensor(uint8)", np.dtype(np.int8): "tensor(int8)", np.dtype(bool): "tensor(bool)"}


@dataclass(frozen=True)
class Arg:
    """ONNX Runtime's `NodeArg` surface (name, type, shape) for a score function."""

    name: str
    type: str
    shape: list


def _arg(port) -> Arg:
    pshape = port.get_partial_shape()
    shape = [d.get_length() if d.is_static else None for d in pshape] if pshape.rank.is_static else []
    dtype = np.dtype(port.get_element_type().to_dtype())
    return Arg(port.get_any_name(), ORT_TYPES.get(dtype, f"tensor({dtype.name})"), shape)


class OvSession:
    """A compiled model behind ONNX Runtime's `InferenceSession` surface (`run`, `get_inputs`,
    `get_outputs`), so a user's score function runs unchanged."""

    def __init__(self, compiled):
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self._inputs = [_arg(p) for p in compiled.inputs]
        self._outputs = [_arg(p) for p in compiled.outputs]

    def run(self, output_names, input_feed: Mapping[str, np.ndarray], run_options=None) -> list:
        result = self.request.infer({k: np.ascontiguousarray(v) for k, v in input_feed.items()})
        by_name = {o.get_any_name(): np.array(v) for o, v in result.items()}
        names = output_names or [o.name for o in self._outputs]
        return [by_name[n] for n in names]

    def get_inputs(self) -> list[Arg]:
        return list(self._inputs)

    def get_outputs(self) -> list[Arg]:
        return list(self._outputs)


class OpenVinoCpu:
    """OpenVINO's CPU plugin with `threads` inference threads and one stream (latency)."""

    name = "openvino"
    per_node = True  # its profiler times every executed node, named after the ONNX node it came from

    def __init__(self, threads: int = 1):
        import openvino

        self.threads = threads
        self.core = openvino.Core()

    def _compile(self, model: onnx.ModelProto | bytes | str, profile: bool = False):
        src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
        ov_model = self.core.read_model(src) if isinstance(src, str) else self.core.read_model(model=src)
        config = {"INFERENCE_NUM_THREADS": str(self.threads), "NUM_STREAMS": "1", "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "f32"}
        if profile:
            config["PERF_COUNT"] = "YES"
        return self.core.compile_model(ov_model, "CPU", config)

    def session(self, model: onnx.ModelProto | bytes | str) -> OvSession:
        return OvSession(self._compile(model))

    def time(self, session: OvSession, feed: Mapping[str, np.ndarray], warmup: int = 3, repeat: int = 15) -> Timing:
        """Wall time, and the process's CPU time (OpenVINO computes on its own threads)."""
        feed = {k: np.ascontiguousarray(v) for k, v in feed.items()}
        for _ in range(warmup):
            session.request.infer(feed)
        wall, cpu = [], []
        for _ in range(repeat):
            t, c = time.perf_counter(), time.process_time()
            session.request.infer(feed)
            cpu.append(time.process_time() - c)
            wall.append(time.perf_counter() - t)
        return Timing(float(np.median(wall) * 1e3), float(np.median(cpu) * 1e3))

    def profile(self, model: onnx.ModelProto, feed: Mapping[str, np.ndarray], runs: int = 5,
                warmup: int = 2) -> list[NodeTime]:
        """Mean real time per executed node over `runs` runs after `warmup`. A node that ran an int8
        kernel is typed as one (`kind`); a FakeQuantize left unfused is Q/DQ glue."""
        request = self._compile(model, profile=True).create_infer_request()
        feed = {k: np.ascontiguousarray(v) for k, v in feed.items()}
        for _ in range(warmup):
            request.infer(feed)
        total: dict[tuple[str, str, str], float] = {}
        for _ in range(runs):
            request.infer(feed)
            for p in request.get_profiling_info():
                if str(p.status).endswith("EXECUTED") and not str(p.status).endswith("NOT_RUN"):
                    key = (p.node_name, p.node_type, _kind(p.node_type, p.exec_type))
                    total[key] = total.get(key, 0.0) + p.real_time.total_seconds() * 1e3
        return [NodeTime(name, op, ms / runs, kind) for (name, op, kind), ms in total.items()]

    def fusion(self, model: onnx.ModelProto):
        """`scoring.FusionCheck` from the compiled model: nodes running int8, FakeQuantize left standing."""
        from qsearch.scoring import FusionCheck

        runtime = self._compile(model).get_runtime_model()
        ops: dict[str, int] = {}
        int8 = 0
        for op in runtime.get_ordered_ops():
            info = op.get_rt_info()
            kind = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
            ops[kind] = ops.get(kind, 0) + 1
            precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else ""
            int8 += precision in ("i8", "u8") and kind not in ("Input", "Output", "Const", "Reorder", "FakeQuantize")
        return FusionCheck(int8, ops.get("FakeQuantize", 0), ops)

    def int8_nodes(self, model: onnx.ModelProto) -> list[str]:
        """The compiled model's nodes that run in int8 (`runtimePrecision`): which layers really did."""
        runtime = self._compile(model).get_runtime_model()
        out = []
        for op in runtime.get_ordered_ops():
            info = op.get_rt_info()
            if "runtimePrecision" in info and info["runtimePrecision"].astype(str) in ("i8", "u8"):
                out.append(op.get_friendly_name())
        return out


def _kind(node_type: str, exec_type: str) -> str:
    if node_type == "FakeQuantize":
        return "Q/DQ glue"
    return "int8 kernel" if any(t in exec_type for t in INT8_EXEC) else "float op"
