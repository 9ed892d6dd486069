"""Layer sensitivity: the metric drop when one layer alone is INT8, per calibration option.

Two signals: the *measured* drop (rewrite with that one layer INT8, score on search data) and a
*proxy* that needs no scoring function: the SQNR of each layer's quantized output against its
float output, all layers at once in a single pass of a probe model. Their Spearman rank
correlation tells users when the cheap proxy can be trusted.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

from qsearch.calibration import RANGES_VERSION, tensor_range
from qsearch.errors import QsearchError
from qsearch.evaluate import Scorer, make_session
from qsearch.files import atomic_write_text, save_figure
from qsearch.model import Layer
from qsearch.plan import LayerChoice

PROFILE_VERSION = 1


@dataclass(frozen=True)
class LayerSensitivity:
    name: str
    op_type: str
    macs: int
    weight_bytes: int
    drops: dict[str, float]  # option label (int8/method/granularity) -> metric drop, this layer alone INT8
    proxy_sqnr: dict[str, float]  # option label -> layer output SQNR (dB) against float
    restore: float | None = None  # all others INT8: metric gained by keeping this layer float

    @property
    def best_option(self) -> str:
        return min(self.drops, key=lambda k: (self.drops[k], k))

    @property
    def best_drop(self) -> float:
        return self.drops[self.best_option]

    @property
    def worst_drop(self) -> float:
        return max(self.drops.values())

    def ranked_options(self) -> list[str]:
        return sorted(self.drops, key=lambda k: (self.drops[k], -self.proxy_sqnr.get(k, 0.0), k))


@dataclass(frozen=True)
class SensitivityProfile:
    model: str
    fingerprint: str
    metric: str
    fp32_score: float
    samples: int
    layers: tuple[LayerSensitivity, ...]  # most sensitive first
    spearman: float | None  # proxy (-SQNR) vs measured drop, over every (layer, option)
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    def layer(self, name: str) -> LayerSensitivity:
        return next(x for x in self.layers if x.name == name)

    def to_yaml(self) -> str:
        d = asdict(self)
        d = {"qsearch_sensitivity": PROFILE_VERSION, **d}
        return yaml.safe_dump(json.loads(json.dumps(d)), sort_keys=False, width=120)

    @classmethod
    def from_yaml(cls, text: str) -> SensitivityProfile:
        d = yaml.safe_load(text)
        d.pop("qsearch_sensitivity", None)
        d["layers"] = tuple(LayerSensitivity(**x) for x in d["layers"])
        return cls(**d)

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        options = sorted({k for x in self.layers for k in x.drops})
        w.writerow(["rank", "layer", "op_type", "macs", "weight_bytes", "best_option", "best_drop", "restore",
                    *[f"drop[{o}]" for o in options], *[f"sqnr_db[{o}]" for o in options]])
        for i, x in enumerate(self.layers, 1):
            w.writerow([i, x.name, x.op_type, x.macs, x.weight_bytes, x.best_option, f"{x.best_drop:.6g}",
                        "" if x.restore is None else f"{x.restore:.6g}",
                        *[f"{x.drops[o]:.6g}" if o in x.drops else "" for o in options],
                        *[f"{x.proxy_sqnr[o]:.4g}" if o in x.proxy_sqnr else "" for o in options]])
        return buf.getvalue()

    def table(self, top: int = 15) -> str:
        lines = [f"{'rank':>4}  {'layer':<28} {'op':<7} {'MMACs':>7} {'best option':<28} {'best':>8} {'worst':>8} {'SQNR dB':>8}"]
        for i, x in enumerate(self.layers[:top], 1):
            sq = x.proxy_sqnr.get(x.best_option, float("nan"))
            lines.append(f"{i:>4}  {x.name[:28]:<28} {x.op_type:<7} {x.macs / 1e6:>7.2f} {x.best_option:<28} "
                         f"{x.best_drop:>8.4f} {x.worst_drop:>8.4f} {sq:>8.1f}")
        if self.spearman is not None:
            lines.append(f"proxy/measured Spearman rank correlation: {self.spearman:.3f}")
        return "\n".join(lines)


def options_for(layer: Layer, methods, granularities) -> list[LayerChoice]:
    grans = granularities if layer.has_weight else granularities[:1]
    return [LayerChoice("int8", m, g) for m in methods for g in grans]


def spearman(a, b) -> float | None:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3:
        return None
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as Spearman's rho needs."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):
        m = x == v
        ranks[m] = ranks[m].mean()
    return ranks


def proxy_sqnr(ctx, entries: list[tuple[Layer, LayerChoice]], samples) -> list[float]:
    """Per-entry output SQNR (dB) of the layer quantized alone, from one probe-model pass."""
    # one probe per calibration method (ranges differ by method), every layer and granularity in it
    by_method: dict[str, list[int]] = {}
    for i, (_, c) in enumerate(entries):
        by_method.setdefault(c.calibration, []).append(i)
    result = [0.0] * len(entries)
    for method, idx in by_method.items():
        sub = [entries[i] for i in idx]
        r = {t: tensor_range(ctx.stats.tensors[t], method, ctx.workload.space.percentile)
             for layer, _ in sub for t in (*layer.activations, layer.output)}
        model, pairs = ctx.rewriter.probe(sub, r)
        sess = make_session(model, ctx.workload.threads)
        names = [t for pair in pairs for t in pair]
        sig = np.zeros(len(pairs))
        noise = np.zeros(len(pairs))
        for batch in samples.batches:
            outs = sess.run(names, dict(batch))
            for j in range(len(pairs)):
                f, q = outs[2 * j].astype(np.float64), outs[2 * j + 1].astype(np.float64)
                sig[j] += float(np.sum(f * f))
                noise[j] += float(np.sum((q - f) ** 2))
        for j, i in enumerate(idx):
            result[i] = 10 * math.log10(max(sig[j], 1e-30) / max(noise[j], 1e-30)) if noise[j] > 0 else 120.0
    return result


# worker-process state (spawned workers rebuild the context from the workload once)
_WORKER: dict = {}


def _worker_init(workload, cache_dir, samples):
    from qsearch.pipeline import Context

    ctx = Context(workload, cache_dir, log=lambda *a: None)
    _WORKER["ctx"] = ctx
    _WORKER["scorer"] = _subset_scorer(ctx, samples)


def _worker_score(job):
    ctx, scorer = _WORKER["ctx"], _WORKER["scorer"]
    return _score_choices(ctx, scorer, job)


def _score_choices(ctx, scorer: Scorer, choices: dict[str, str]) -> float:
    plan = ctx.plan({n: LayerChoice.parse(lbl) for n, lbl in choices.items()})
    return scorer.score(make_session(ctx.rewriter(plan), ctx.workload.threads))


def _subset_scorer(ctx, samples: int | None) -> Scorer:
    s = ctx.search_scorer
    if samples is None or s.custom is not None or samples >= s.data.samples:
        return s
    head = s.data.head(samples)
    ref = s.reference[: len(head)] if s.reference is not None else None
    return Scorer(s.metric, head, reference=ref)


def analyze(ctx, samples: int | None = None, reverse: bool = False, workers: int = 1,
            cache_dir: Path | None = None, progress: Callable | None = None) -> SensitivityProfile:
    """Measure every candidate layer alone in INT8 for every allowed option; rank by drop."""
    t0 = time.perf_counter()
    space = ctx.workload.space
    layers = ctx.candidates()
    scorer = _subset_scorer(ctx, samples)
    key_src = json.dumps([PROFILE_VERSION, RANGES_VERSION, ctx.prepared.fingerprint, ctx.search_data.fingerprint, ctx.calib_data.fingerprint,
                          samples, reverse, list(space.calibration), list(space.granularity), space.percentile,
                          [la.name for la in layers], ctx.workload.metric.name, ctx.workload.metric.search_entry,
                          ctx.workload.target])
    import hashlib

    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    cache = cache_dir / f"sensitivity-{key}.yaml" if cache_dir else None
    if cache is not None and cache.is_file():
        try:
            return SensitivityProfile.from_yaml(cache.read_text())
        except Exception:
            pass
    fp32 = scorer.score(make_session(ctx.prepared.proto, ctx.workload.threads))
    jobs: list[tuple[str, str, dict]] = []
    for la in layers:
        for c in options_for(la, space.calibration, space.granularity):
            jobs.append((la.name, c.label(), {la.name: c.label()}))
    scores = _run_jobs(ctx, scorer, [j[2] for j in jobs], workers, samples, cache_dir, progress, "single-layer")
    drops: dict[str, dict[str, float]] = {la.name: {} for la in layers}
    for (name, label, _), s in zip(jobs, scores):
        drops[name][label] = float(fp32 - s)
    entries = [(la, LayerChoice.parse(lbl)) for la in layers for lbl in drops[la.name]]
    proxy_data = ctx.search_data.head(samples) if samples else ctx.search_data
    sq = proxy_sqnr(ctx, entries, proxy_data)
    proxies: dict[str, dict[str, float]] = {la.name: {} for la in layers}
    for (la, c), v in zip(entries, sq):
        proxies[la.name][c.label()] = float(v)
    restore: dict[str, float] = {}
    if reverse:
        best = {la.name: min(drops[la.name], key=lambda k: (drops[la.name][k], k)) for la in layers}
        all_int8 = _run_jobs(ctx, scorer, [best], 1, samples, cache_dir, None, "all-int8")[0]
        fp = LayerChoice(ctx.float_precision).label()
        rev_jobs = [{**best, la.name: fp} for la in layers]
        for la, s in zip(layers, _run_jobs(ctx, scorer, rev_jobs, workers, samples, cache_dir, progress, "reverse")):
            restore[la.name] = float(s - all_int8)
    result = [
        LayerSensitivity(la.name, la.op_type, la.macs, la.weight_bytes, drops[la.name], proxies[la.name],
                         restore.get(la.name))
        for la in layers
    ]
    result.sort(key=lambda x: (-x.best_drop, -x.worst_drop, x.name))
    rho = spearman([-v for x in result for v in (x.proxy_sqnr[k] for k in sorted(x.drops))],
                   [x.drops[k] for x in result for k in sorted(x.drops)])
    profile = SensitivityProfile(
        model=ctx.prepared.name, fingerprint=ctx.prepared.fingerprint, metric=ctx.workload.metric.name,
        fp32_score=float(fp32), samples=scorer.data.samples if scorer.data is not None else 0,
        layers=tuple(result), spearman=rho, seconds=round(time.perf_counter() - t0, 3),
        meta={"evaluations": len(jobs) + (len(layers) + 1 if reverse else 0), "workers": workers},
    )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, profile.to_yaml())
    return profile


def _run_jobs(ctx, scorer, jobs: list[dict], workers: int, samples, cache_dir, progress, what: str) -> list[float]:
    if progress is not None:
        progress(0, len(jobs), what)
    out: list[float] = []
    if workers <= 1 or len(jobs) < 2:
        for i, job in enumerate(jobs):
            out.append(_score_checked(ctx, scorer, job))
            if progress is not None:
                progress(i + 1, len(jobs), what)
        return out
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(ctx.workload, cache_dir, samples)) as pool:
        for i, s in enumerate(pool.map(_worker_score, jobs, chunksize=max(1, len(jobs) // (4 * workers)))):
            out.append(s)
            if progress is not None:
                progress(i + 1, len(jobs), what)
    return out


def _score_checked(ctx, scorer, job: dict) -> float:
    try:
        return _score_choices(ctx, scorer, job)
    except QsearchError:
        raise
    except Exception as exc:
        raise QsearchError(f"layer(s) {', '.join(job)}: scoring failed in ONNX Runtime: {str(exc).splitlines()[0]}") from None


def save_profile(profile: SensitivityProfile, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "sensitivity.yaml", out / "sensitivity.csv", out / "sensitivity.png"]
    atomic_write_text(paths[0], profile.to_yaml())
    atomic_write_text(paths[1], profile.to_csv())
    plot_profile(profile, paths[2])
    return paths


def plot_profile(profile: SensitivityProfile, path: Path, top: int = 30) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = profile.layers[:top]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(layers) + 1.5))
    y = np.arange(len(layers))
    ax.barh(y, [x.worst_drop for x in layers], color="#f4a582", label="worst INT8 option")
    ax.barh(y, [x.best_drop for x in layers], color="#b2182b", label="best INT8 option")
    ax.set_yticks(y, [x.name for x in layers], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"{profile.metric} drop when only this layer is INT8")
    title = f"{profile.model}: layer sensitivity ({profile.samples} samples)"
    if profile.spearman is not None:
        title += f", proxy rank corr {profile.spearman:.2f}"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)
