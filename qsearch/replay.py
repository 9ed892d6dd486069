"""A resolution for score functions that return one number: replay them on recorded outputs.

A user's score function owns its data and returns a float, so there are no per-sample parts to
bootstrap. Its model outputs can still be recorded: every `run` call's outputs, in order. The
function is then replayed on a session that answers from the record, with one group of calls
answered by FP32's outputs instead of the plan's: that group's contribution to the drop is gone.
Over G groups this is a delete-a-group jackknife over the metric's own batches. It re-runs only
the function's post-processing, never the model.

It holds when the function asks the same runs in the same order whatever the outputs. What can
be checked is: both models' records have the same number and shapes of runs, and replaying each
record gives its own score back to the last bit. Where that fails the resolution stays unknown,
and the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from qsearch.resolution import DropInterval

GROUPS = 10  # jackknife groups: the function is replayed this many times (plus two checks)


class Recording:
    """A session wrapper (ONNX Runtime's `run`, `get_inputs`, `get_outputs`) keeping every run's outputs."""

    def __init__(self, session: Any):
        self.session = session
        self.calls: list[list[np.ndarray]] = []

    def run(self, output_names, input_feed: Mapping[str, np.ndarray], *args, **kwargs):
        out = self.session.run(output_names, input_feed, *args, **kwargs)
        self.calls.append([np.array(o, copy=True) for o in out])
        return out

    def get_inputs(self):
        return self.session.get_inputs()

    def get_outputs(self):
        return self.session.get_outputs()

    def __getattr__(self, name: str):  # anything else a score function asks of its session
        return getattr(self.session, name)


class _Replay:
    """Answers the k-th `run` call from `calls[k]`; asks for more calls than recorded: refused."""

    def __init__(self, calls: Sequence[list[np.ndarray]], session: Any):
        self.calls, self.session, self.k = calls, session, 0

    def run(self, output_names, input_feed, *args, **kwargs):
        if self.k >= len(self.calls):
            raise _Diverged
        out = self.calls[self.k]
        self.k += 1
        return [o.copy() for o in out]

    def get_inputs(self):
        return self.session.get_inputs()

    def get_outputs(self):
        return self.session.get_outputs()

    def __getattr__(self, name: str):
        return getattr(self.session, name)


class _Diverged(Exception):
    """The replayed function asked for a run the record does not have."""


def _groups(n: int, g: int) -> list[range]:
    edges = np.linspace(0, n, min(g, n) + 1).round().astype(int)
    return [range(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def jackknife(score: Callable[[Any], float], fp32: Recording, plan: Recording, fp32_score: float,
              plan_score: float, groups: int = GROUPS) -> DropInterval | None:
    """The drop's jackknife interval from the two records, or None where replay does not hold
    (different numbers or shapes of calls, a function whose runs depend on the outputs, fewer than
    two calls)."""
    a, b = fp32.calls, plan.calls
    if len(a) != len(b) or len(a) < 2 or any(len(x) != len(y) or any(u.shape != v.shape for u, v in zip(x, y))
                                               for x, y in zip(a, b)):
        return None
    try:
        if score(_Replay(b, plan.session)) != plan_score or score(_Replay(a, fp32.session)) != fp32_score:
            return None
        parts = _groups(len(a), groups)
        swapped = []
        for grp in parts:
            mixed = [a[k] if k in grp else b[k] for k in range(len(a))]
            swapped.append(fp32_score - score(_Replay(mixed, plan.session)))
    except _Diverged:
        return None
    except Exception:  # the user's post-processing failed on mixed outputs: no resolution, no crash
        return None
    g = len(parts)
    # with group k's drop removed, what is left is the drop over the others diluted by their share
    # of the calls; undiluted, it is the leave-one-group-out estimate the jackknife needs
    share = np.array([1 - len(grp) / len(a) for grp in parts])
    loo = np.array(swapped) / share
    drop = fp32_score - plan_score
    stderr = math.sqrt((g - 1) / g * float(np.sum((loo - loo.mean()) ** 2)))
    return DropInterval(float(drop), drop - 1.645 * stderr, drop + 1.645 * stderr, stderr, 0.0)
