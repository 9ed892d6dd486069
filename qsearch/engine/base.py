"""The engine seam: everything that runs a model to score or time it goes through one `Engine`
object that the workbench holds. ONNX Runtime's CPU provider is the one implementation today;
another runtime, or a user's latency hook, is a class with these three methods and one entry in
`ENGINES` (`engine/__init__.py`), and no stage changes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import onnx


@dataclass(frozen=True)
class NodeTime:
    """One node's kernel time in an engine's per-node profile."""

    name: str
    op_type: str
    ms: float  # mean per run
    kind: str = ""  # 'int8 kernel', 'float op' or 'Q/DQ glue' where the engine says (else from op_type)


@dataclass(frozen=True)
class Timing:
    """One model's time on one batch: median wall ms, and median CPU ms of the calling thread (with
    one intra-op thread ONNX Runtime runs the kernels there: the model's work alone, which a busy
    machine inflates less than the wall time)."""

    wall_ms: float
    cpu_ms: float


@runtime_checkable
class Session(Protocol):
    """What a score function receives: ONNX Runtime's `InferenceSession` surface."""

    def run(self, output_names: Any, input_feed: Mapping[str, np.ndarray]) -> list: ...

    def get_inputs(self) -> list: ...

    def get_outputs(self) -> list: ...


class Engine(Protocol):
    """Sessions, timings and per-node profiles of models on one runtime and device."""

    name: str
    per_node: bool  # whether `profile` times every node (else the analysis times regions whole)

    def session(self, model: onnx.ModelProto | bytes | str) -> Session:
        """A session that scores and times `model` as the deployment would run it."""
        ...

    def time(self, session: Session, feed: Mapping[str, np.ndarray], warmup: int = 3, repeat: int = 15) -> Timing:
        """Median time of one batch after `warmup` runs."""
        ...

    def profile(self, model: onnx.ModelProto, feed: Mapping[str, np.ndarray], runs: int = 5,
                warmup: int = 2) -> list[NodeTime]:
        """Kernel time of every node the runtime runs, in execution order."""
        ...


def profiles_nodes(engine: Engine) -> bool:
    """Whether `engine` times every node (an engine written before `per_node` existed does)."""
    return getattr(engine, "per_node", True)
