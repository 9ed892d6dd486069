"""What a search strategy sees: the records between the analysis and the strategies. Pure data
(no ONNX, no Optuna), so strategies and regions are tested with planted numbers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from qsearch.config import SearchSpace


class MeasureDrop(Protocol):
    """Scores a plan on the whole search data and returns its metric drop against FP32."""

    def __call__(self, choices: Mapping[str, str]) -> float: ...


@dataclass(frozen=True)
class LayerFacts:
    """What the analysis measured of one candidate layer."""

    name: str
    options: tuple[str, ...]  # INT8 option labels, best first
    saving: float  # what INT8 saves in the objective's units (measured ms for latency; < 0: it costs)
    noise: float  # model-output noise / signal power with this layer alone INT8 at its best option
    rank: int = 0  # sensitivity rank: 0 the noisiest (the analysis's order, ties broken by it)


@dataclass(frozen=True)
class Problem:
    layers: tuple[LayerFacts, ...]  # candidate layers, graph order
    float_label: str  # "fp32" or "fp16"
    allowed: float  # the accuracy budget: largest allowed drop
    space: SearchSpace
    # (producer, consumer) pairs of candidate layers joined by a tensor: where one is INT8 and the
    # other float, the tensor crosses a border and pays a Q or DQ that ONNX Runtime cannot fuse
    edges: tuple[tuple[str, str], ...] = ()
    border_cost: float = 0.0  # measured cost of one border, in the objective's units

    def borders(self, int8: set[str] | frozenset[str]) -> int:
        """Tensors between candidate layers where an INT8 region meets a float one."""
        return sum((a in int8) != (b in int8) for a, b in self.edges)

    def saving(self, int8: set[str] | frozenset[str]) -> float:
        """Predicted saving of a plan with these layers INT8: each layer's measured saving (glue to
        non-candidate ops included) minus the cost of every border between candidate layers."""
        by_name = self._by_name()
        own = sum(by_name[n].saving for n in int8 if n in by_name)
        return own - self.border_cost * self.borders(int8)

    @property
    def names(self) -> set[str]:
        return {x.name for x in self.layers}

    def facts(self, name: str) -> LayerFacts:
        return self._by_name()[name]

    def _by_name(self) -> dict[str, LayerFacts]:
        return {x.name: x for x in self.layers}

    @property
    def best(self) -> dict[str, str]:
        """Every candidate INT8 at its best option."""
        return {x.name: x.options[0] for x in self.layers}

    @property
    def wide(self) -> bool:
        """Whether layers may also take int16 (uint16 activations, NPU targets; `int16`)."""
        return "int16" in self.space.precisions

    def int16(self, name: str) -> str:
        """A layer's int16 option: MinMax ranges, per-channel weights where the layer has them, and
        of its best option's recovery only bias correction. With 65536 steps a range's rounding
        error is negligible: clipping is all a percentile, entropy or MSE range adds, and smoothing
        only moves range into the int8 weights (MiniLM's MatMuls all int16, MinMax per-channel:
        drop 0.0003; with percentile ranges 0.12; with their best INT8 options' smoothing 0.0016)."""
        options = self.facts(name).options
        granularity = "per_channel" if any(o.split("/")[2].startswith("per_channel") for o in options) \
            else "per_tensor"
        best = options[0].partition("@")[0].split("/")  # int8 / method / granularity [/ recovery]
        bias = len(best) > 3 and "bias" in best[3].split("+")
        return f"int16/minmax/{granularity}" + ("/bias" if bias else "")

    def gentler(self, name: str, label: str) -> str:
        """Where a layer goes when it is too sensitive for `label`: its int16 option when the space
        has int16 and `label` is INT8, else float."""
        return self.int16(name) if self.wide and label.startswith("int8/") else self.float_label

    @property
    def mixable(self) -> bool:
        """Whether layers can be INT8 or float (else every layer is fixed to the one precision)."""
        return "int8" in self.space.precisions and "float" in self.space.precisions


@dataclass(frozen=True)
class Dimensions:
    fixed: dict[str, str]  # layer -> option label, not searched
    searched: dict[str, tuple[str, ...]]  # layer -> option labels, best first, float last


@dataclass(frozen=True)
class FixDecision:
    """Layers fixed to INT8 before the search, and the measurements that justify it."""

    fixed: tuple[str, ...]
    joint_drop: float | None  # user metric, whole search data: the fixed set alone INT8
    all_int8_drop: float | None  # every candidate INT8 at its best option
    evaluations: int
    option_set: str = "analysis"  # whose INT8 options come first (`OPTION_SETS`): the one all-INT8 measured best


@dataclass(frozen=True)
class Incumbent:
    """The closed loop's answer: the plan, its measured drop and what finding it cost."""

    choices: dict[str, str]
    drop: float
    evaluations: int
    saving: float  # predicted (`Problem.saving`)


@dataclass(frozen=True)
class Start:
    """What a strategy starts from: the layers fixed before the search, the searched dimensions,
    the fixing decision, how many evaluations it may spend, and the best plan within budget
    measured so far (None: none yet)."""

    fixed: Mapping[str, str]
    dims: Dimensions
    decision: FixDecision
    max_evals: int
    best: Mapping[str, str] | None = None


class Strategy(Protocol):
    def __call__(self, problem: Problem, measure: MeasureDrop, start: Start) -> list[dict[str, str]]: ...
