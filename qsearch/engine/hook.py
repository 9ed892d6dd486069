"""A user's latency hook as an engine: ONNX Runtime scores accuracy on this machine, the hook
times each model where it will be deployed (a board over ssh, a phone over adb, another runtime).

    runtime: {latency: "mypkg.device:measure"}
    def measure(model_path: str, feeds_path: str) -> float: ...   # seconds per batch

`feeds_path` is an `.npz` of the latency batch keyed by input name. The hook is called once per
timing (it decides how many runs it averages), under `--eval-timeout`. What it cannot give is a
per-node profile, so the analysis times regions of layers through it (`analysis.regions`).

Accuracy is scored on this machine's arithmetic, not the device's: where the device's int8
kernels round or saturate differently (a CPU without VNNI does), the budget holds for this
machine's numbers only. Every report on a hooked run says so.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import shutil
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from qsearch import limits
from qsearch.data import import_entry
from qsearch.engine.base import NodeTime, Timing
from qsearch.engine.onnxruntime import OrtCpu
from qsearch.errors import ConfigError, QsearchError

ARITHMETIC_NOTE = ("accuracy was scored by {engine} on this machine; the latency hook timed the models on its "
                   "device, whose int8 arithmetic may round differently")


class HookError(QsearchError):
    """The hook failed, returned something that is not a time, or ran past --eval-timeout."""


class HookSession:
    """What a score function receives (`run`, `get_inputs`, `get_outputs` of ONNX Runtime), plus
    the model's bytes, which the hook needs as a file."""

    def __init__(self, model: bytes, scoring):
        self.model = model
        self.path: Path | None = None  # the model's file for the hook, written on first timing
        self._scoring = scoring  # the scoring engine's session (ONNX Runtime's, or runtime.engine's)

    def run(self, output_names, input_feed, run_options=None) -> list:
        return self._scoring.run(output_names, input_feed, run_options)

    def get_inputs(self) -> list:
        return self._scoring.get_inputs()

    def get_outputs(self) -> list:
        return self._scoring.get_outputs()


class LatencyHook:
    """Sessions of the scoring engine (`runtime.engine`, default ONNX Runtime's CPU provider);
    `time` calls the user's hook."""

    name = "hook"
    per_node = False  # no per-node profile: the analysis times regions instead

    def __init__(self, entry: str, where: str, base: Path | None = None, threads: int = 1,
                 timeout: float | None = None, scoring=None):
        try:
            self.measure = import_entry(entry, where, base)
        except QsearchError as exc:
            raise ConfigError(str(exc)) from None
        self.entry, self.where, self.threads, self.timeout = entry, where, threads, timeout
        self.scoring = scoring if scoring is not None else OrtCpu(threads)
        self.calls = 0  # hook calls this process made
        self._dir = Path(tempfile.mkdtemp(prefix="qsearch-hook-"))
        self._numbers = itertools.count()
        weakref.finalize(self, shutil.rmtree, self._dir, ignore_errors=True)

    def session(self, model: onnx.ModelProto | bytes | str) -> HookSession:
        if isinstance(model, onnx.ModelProto):
            model = model.SerializeToString()
        elif isinstance(model, str):
            model = Path(model).read_bytes()
        return HookSession(model, self.scoring.session(model))

    def time(self, session: HookSession, feed: Mapping[str, np.ndarray], warmup: int = 3, repeat: int = 15) -> Timing:
        """One hook call (`warmup` and `repeat` are the hook's to decide)."""
        if session.path is None:  # one file per session, removed with it: disk stays bounded over a study
            session.path = self._dir / f"model-{next(self._numbers)}.onnx"
            session.path.write_bytes(session.model)
            weakref.finalize(session, session.path.unlink, missing_ok=True)
        ms = self.seconds(session.path, self._feed_file(feed)) * 1e3
        return Timing(ms, ms)

    def profile(self, model: onnx.ModelProto, feed: Mapping[str, np.ndarray], runs: int = 5,
                warmup: int = 2) -> list[NodeTime]:
        raise HookError(f"{self.where}: a latency hook gives no per-node profile (the analysis times regions)")

    def seconds(self, model_path: Path, feeds_path: Path) -> float:
        """The hook's answer, checked: a finite positive number of seconds, within --eval-timeout."""
        self.calls += 1
        try:
            with limits.limit(self.timeout, f"{self.where}: the latency hook '{self.entry}' ran past --eval-timeout "
                              f"{self.timeout:g} s" if self.timeout else ""):
                value = self.measure(str(model_path), str(feeds_path))
        except limits.EvaluationTimeout as exc:
            raise HookError(str(exc)) from None
        except (Exception, SystemExit) as exc:
            raise HookError(f"{self.where}: the latency hook '{self.entry}' raised {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
                or not math.isfinite(value) or value <= 0:
            raise HookError(f"{self.where}: the latency hook '{self.entry}' must return seconds per batch, a "
                            f"positive finite number; it returned {value!r}")
        return float(value)

    def _feed_file(self, feed: Mapping[str, np.ndarray]) -> Path:
        h = hashlib.sha256()
        for k in sorted(feed):
            a = np.ascontiguousarray(feed[k])
            h.update(f"{k}{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
        path = self._dir / f"feeds-{h.hexdigest()[:20]}.npz"
        if not path.exists():
            np.savez(path, **{k: np.asarray(v) for k, v in feed.items()})
        return path
