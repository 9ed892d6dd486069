"""Where INT8 pays, from whole-model timings: for engines with no per-node profile (a user's
latency hook on a device). The layers are cut into at most `REGIONS` runs in graph order; each
run is timed INT8 (at its best options) with the rest FP32, beside FP32 and all-INT8: 2 +
regions calls, each an engine timing. A region's saving is shared among its layers by their
multiply-accumulates, and so is FP32's time among all layers.

A region measured as a whole charges its own borders (the Q/DQ glue where it meets float), so a
run of layers that pays only together is seen paying: single-layer timings would miss it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qsearch.model.layers import Layer
from qsearch.plan.format import LayerChoice

REGIONS = 8


def chunks(layers: Sequence[Layer], regions: int = REGIONS) -> list[list[Layer]]:
    """At most `regions` contiguous runs of layers of about equal count, in order."""
    n = len(layers)
    k = max(1, min(regions, n))
    bounds = np.linspace(0, n, k + 1).round().astype(int)
    return [list(layers[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def attribute(bench, layers: Sequence[Layer], best: dict[str, str], regions: int = REGIONS) -> tuple:
    """(fp32 total, int8 total, fp32 by kind, int8 by kind, fp32 ms per layer, int8 ms per layer,
    calls), the shape `sensitivity` expects from a per-node profile, plus the engine calls made."""
    engine, feed = bench.engine, bench.latency_feed
    calls = 0

    def ms(proto) -> float:
        nonlocal calls
        calls += 1
        return engine.time(engine.session(proto), feed).wall_ms

    def plan(names) -> object:
        return bench.rewriter(bench.plan({n: LayerChoice.parse(best[n]) for n in names}))

    fp32_a = ms(bench.prepared.proto)
    all8 = ms(plan([la.name for la in layers]))
    saved = [(run, ms(plan([la.name for la in run]))) for run in chunks(layers, regions)]
    fp32 = (fp32_a + ms(bench.prepared.proto)) / 2  # before and after the regions: a drift is averaged
    weight = {la.name: la.macs + 1.0 for la in layers}
    total = sum(weight.values())
    fp32_ms, int8_ms = {}, {}
    for run, t in saved:
        inside = sum(weight[la.name] for la in run)
        for la in run:
            fp32_ms[la.name] = fp32 * weight[la.name] / total
            int8_ms[la.name] = fp32_ms[la.name] - (fp32 - t) * weight[la.name] / inside
    kinds = ("int8 kernel", "float op", "Q/DQ glue")
    return (fp32, all8, {k: fp32 if k == "float op" else 0.0 for k in kinds},
            {k: all8 if k == "int8 kernel" else 0.0 for k in kinds},
            [fp32_ms[la.name] for la in layers], [int8_ms[la.name] for la in layers], calls)
