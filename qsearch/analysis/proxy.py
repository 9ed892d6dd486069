"""The one-pass proxy: probe models rank every layer's INT8 options (method x granularity x
recovery) by the SQNR of the layer's output, each layer quantized alone with float inputs. One
pass per calibration method (their ranges differ); options that equalize run in the equalized
float model, options that smooth read their own x / s. Cheap enough for 200+ layer models; blind to what a layer's error does downstream,
which is why the search measures option sets all-INT8 (`strategy.OPTION_SETS`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from qsearch import data
from qsearch.calibration import tensor_range
from qsearch.model.load import Layer
from qsearch.plan.build import allowed_granularities
from qsearch.plan.format import LayerChoice
from qsearch.recovery.equalization import correctable
from qsearch.recovery.techniques import extra_options, uses
from qsearch.workbench import Workbench

PROXY_PARTS = 2  # shared proxy jobs per calibration method (with a study queue): balance for 2+ workers


def options_for(layer: Layer, methods, granularities, techniques=(), partnered: bool = False,
                smoothable: bool = False, weights=("int8",)) -> list[LayerChoice]:
    """Every INT8 option of a layer: method x granularity x the recovery it can take (bias
    correction with a weight, equalization with a partner, smoothing in a group: MinMax only)
    among the allowed `techniques` x the weight encodings (a layer with a weight)."""
    grans = [g for g in granularities if g in allowed_granularities(layer)] or ["per_tensor"]
    if not layer.has_weight:
        grans = grans[:1]
    recs = ["none"]
    if "bias" in techniques and correctable(layer):
        recs.append("bias")
    if "cle" in techniques and partnered:
        recs += ["cle", "cle+bias"] if "bias" in recs else ["cle"]
    smooth = ["smooth", "smooth+bias"] if "bias" in recs else ["smooth"]
    if "smooth" in techniques and smoothable and "minmax" in methods:
        recs += smooth
    recs += extra_options(layer, techniques)  # registered weight-transform techniques (`techniques.register`)
    codes = weights if layer.has_weight else ("int8",)
    return [LayerChoice("int8", m, g, r, w) for m in methods for g in grans for r in recs for w in codes
            if m == "minmax" or not uses(r, "smooth")]


def proxy_sqnr(bench: Workbench, entries: list[tuple[Layer, LayerChoice]], samples, queue=None,
               progress: Callable | None = None) -> tuple[list[float], int]:
    """(per-entry output SQNR, probe passes run): the SQNR (dB) of the layer quantized alone: probe-model passes per calibration
    method (ranges differ by method), every granularity in each. With a `queue`, each method's
    layers are split into PROXY_PARTS shared jobs: workers split the passes evenly (one pass per
    method left the slowest method, entropy, as the long pole) and the ranges each needs."""
    by_method: dict[tuple[str, bool], list[int]] = {}  # (method, equalized model)
    for i, (_, c) in enumerate(entries):
        by_method.setdefault((c.calibration, uses(c.recovery, "cle")), []).append(i)
    parts = 1 if queue is None else PROXY_PARTS
    groups: list[list[int]] = []
    for idx in by_method.values():
        names = list(dict.fromkeys(entries[i][0].name for i in idx))  # a layer's options stay together
        for k in range(min(parts, len(names))):
            part = set(names[k::parts])
            groups.append([i for i in idx if entries[i][0].name in part])

    def run(job: dict) -> tuple[float, ...]:
        sub = groups[job["part"]]
        return tuple(_probe_pass(bench, [entries[i] for i in sub], job["method"], samples, job.get("eq", False)))

    jobs = [{"method": entries[g[0]][1].calibration, "part": k, "eq": uses(entries[g[0]][1].recovery, "cle")}
            for k, g in enumerate(groups)]
    passes = queue.map(jobs, run, progress, what="proxy") if queue is not None else [run(j) for j in jobs]
    result = [0.0] * len(entries)
    for g, sq in zip(groups, passes):
        for i, v in zip(g, sq):
            result[i] = float(v)
    return result, len(jobs)


def _probe_pass(bench: Workbench, sub: list[tuple[Layer, LayerChoice]], method: str, samples,
                eq: bool = False) -> list[float]:
    """One probe model of these entries (one calibration method). `eq`: the entries equalize, so
    they are probed in the equalized float model, with its statistics between pairs."""
    rec = bench.recovery
    between = {t for p in rec.pairs for t in p.tensors} if eq and rec is not None else set()

    def stats_of(t: str):
        return rec.stats if t in between else bench.stats

    tensors = {t for layer, _ in sub for t in (*layer.activations, layer.output, layer.fused_output) if t}
    r = {t: tensor_range(stats_of(t).tensors[t], method, bench.workload.space.percentile) for t in tensors}
    smoothing = {(la.name, c.granularity): rec.smoothing_of(la.name, c.granularity) for la, c in sub
                 if uses(c.recovery, "smooth")}
    means = {la.name: stats_of(la.activations[0]).channels[la.activations[0]].mean for la, c in sub
             if uses(c.recovery, "bias")}
    means = {(la.name, c.granularity): means[la.name] / smoothing[la.name, c.granularity].scales
             if (la.name, c.granularity) in smoothing and la.name in means else means.get(la.name)
             for la, c in sub if la.name in means}
    rewriter = bench.eq_rewriter if eq else bench.rewriter
    model, pairs = rewriter.probe(sub, r, bench.forms, means, smoothing)
    sess = bench.engine.session(model)
    names = [t for pair in pairs for t in pair]
    sig = np.zeros(len(pairs))
    noise = np.zeros(len(pairs))
    for batch in data.chunks(samples.batches, bench.run_samples):
        outs = sess.run(names, batch)
        sig += np.asarray(outs[0::2], np.float64)
        noise += np.asarray(outs[1::2], np.float64)
    return [10 * math.log10(max(s, 1e-30) / max(n, 1e-30)) if n > 0 else 120.0 for s, n in zip(sig, noise)]


def rank_options(bench: Workbench, layers, samples, queue, progress) -> tuple[dict, dict, int]:
    """(proxy SQNR per layer and option, each layer's best option, probe passes): one probe pass
    per calibration method ranks every layer's options."""
    space = bench.workload.space
    pairs = bench.recovery.pairs if bench.recovery is not None else ()
    partnered = {n for p in pairs for n in (p.head, p.tail)}
    smoothable = {n for sm in (bench.recovery.smoothing.values() if bench.recovery else ()) for n in sm.group.layers}
    entries = [(la, c) for la in layers
               for c in options_for(la, space.calibration, space.granularity, space.recovery, la.name in partnered,
                                    la.name in smoothable, space.weights)]
    sq, passes = proxy_sqnr(bench, entries, samples, None if queue is None else queue.stage("proxy"), progress)
    proxies: dict[str, dict[str, float]] = {la.name: {} for la in layers}
    for (la, c), v in zip(entries, sq):
        proxies[la.name][c.label()] = float(v)
    best = {la.name: max(proxies[la.name], key=lambda k: (proxies[la.name][k], k)) for la in layers}
    return proxies, coherent(best, proxies, pairs), passes


def coherent(best: dict[str, str], proxies: dict[str, dict[str, float]], pairs) -> dict[str, str]:
    """Equalization is one decision for a pair: where either layer's best option equalizes, both
    take their best equalizing option (else the one that chose it would run unequalized)."""
    best = dict(best)
    for p in pairs:
        if p.head not in best or p.tail not in best:
            continue
        if any(uses(LayerChoice.parse(best[n]).recovery, "cle") for n in (p.head, p.tail)):
            for n in (p.head, p.tail):
                eq = {k: v for k, v in proxies[n].items() if uses(LayerChoice.parse(k).recovery, "cle")}
                if eq:
                    best[n] = max(eq, key=lambda k: (eq[k], k))
    return best
