"""The registry of accuracy-recovery techniques: their names, how they combine into one per-layer
option (`cle+bias+round`), and what each needs. Every other module asks this registry instead of
spelling technique names into strings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from itertools import product
from typing import Any

import numpy as np

SEP = "+"  # a combined option's separator, in registry order: `cle+bias+round`


@dataclass(frozen=True)
class Technique:
    """One recovery technique.

    `slot`: techniques in one slot are alternatives (a layer equalizes *or* smooths); slots
    combine in order. `learned`: fitted per plan after the search (learned rounding), not computed
    once after calibration. `applies(layer)`: the layers it can take (None: every layer with a
    weight). `weight(layer, w)`: a data-free weight transform the rewriter applies before
    quantizing (None: the technique works elsewhere: sidecar arrays, graph edits)."""

    name: str
    slot: int
    what: str
    learned: bool = False
    applies: Callable[[Any], bool] | None = None
    weight: Callable[[Any, np.ndarray], np.ndarray] | None = None


_REGISTRY: dict[str, Technique] = {}


def register(technique: Technique) -> Technique:
    """Add a technique (a new module calls this once); names are unique and never contain `SEP`."""
    if SEP in technique.name or technique.name in ("none", *_REGISTRY):
        raise ValueError(f"recovery technique name {technique.name!r} is taken or contains {SEP!r}")
    _REGISTRY[technique.name] = technique
    recoveries.cache_clear()
    return technique


def unregister(name: str) -> None:
    """Remove a technique added by `register` (tests and notebooks that try one out)."""
    if name in BUILT_IN:
        raise ValueError(f"recovery technique {name!r} is built in")
    _REGISTRY.pop(name, None)
    recoveries.cache_clear()


def weight_transforms(recovery: str) -> list[Callable]:
    """The data-free weight transforms of an option's techniques, in order."""
    return [t.weight for t in map(_REGISTRY.__getitem__, split(recovery)) if t.weight is not None]


def extra_options(layer, allowed) -> list[str]:
    """Options of registered weight-transform techniques (beyond the built-in ones) this layer can
    take among the `allowed` techniques: each alone."""
    out = []
    for t in _REGISTRY.values():
        if t.name in allowed and t.name not in BUILT_IN and t.weight is not None and layer.has_weight \
                and (t.applies is None or t.applies(layer)):
            out.append(t.name)
    return out


def techniques() -> tuple[str, ...]:
    """What a search space may allow (`recovery: [bias, cle]`), in registry order."""
    return tuple(_REGISTRY)


def technique(name: str) -> Technique:
    return _REGISTRY[name]


def split(recovery: str) -> tuple[str, ...]:
    """The techniques of an option ('none': none)."""
    return () if recovery == "none" else tuple(recovery.split(SEP))


def combine(names) -> str:
    """One option from techniques, in canonical order ('none' for none)."""
    chosen = set(names)
    ordered = [t.name for t in sorted(_REGISTRY.values(), key=lambda t: t.slot) if t.name in chosen]
    return SEP.join(ordered) or "none"


def uses(recovery: str, name: str) -> bool:
    return name in split(recovery)


@lru_cache(maxsize=1)
def recoveries() -> tuple[str, ...]:
    """Every valid per-layer option: at most one technique per slot, closed-form ones first, then
    each with the learned ones on top."""
    slots: dict[int, list[Technique]] = {}
    for t in _REGISTRY.values():
        slots.setdefault(t.slot, []).append(t)
    closed = [s for s in sorted(slots) if not any(t.learned for t in slots[s])]
    learned = [s for s in sorted(slots) if s not in closed]
    pick = [[None, *slots[s]] for s in closed]
    base = [combine(t.name for t in combo if t is not None) for combo in product(*pick)]
    out = list(base)
    for combo in product(*[[None, *slots[s]] for s in learned]):
        extra = [t.name for t in combo if t is not None]
        if extra:
            out += [combine([*split(r), *extra]) for r in base]
    return tuple(dict.fromkeys(out))


# The built-in techniques (their algorithms: `equalization`, `bias`, `smoothing`, `rounding`).
register(Technique("bias", 2, "bias correction: the quantized weights' mean output error removed from the bias"))
register(Technique("cle", 1, "cross-layer equalization of a Conv pair's channel ranges"))
register(Technique("smooth", 1, "SmoothQuant: activation outliers moved into the weights (MinMax only)"))
register(Technique("round", 3, "learned weight rounding (AdaRound) for the chosen plan", learned=True))
BUILT_IN = techniques()
