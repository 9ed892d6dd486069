"""Layer sensitivity: how much each layer hurts in INT8, how sure we are, and whether INT8 pays.

Built to afford 100-layer models (evaluations ~ layers + a handful, not layers x options):
1. a *proxy* pass per calibration method: a probe model computes every layer's quantized twin
   next to the float graph, so each layer x option gets its own output SQNR in one pass; it ranks
   each layer's options.
2. a *fidelity screen*: each layer alone in INT8 at its best option, run once on a subset of the
   search data; the model outputs' noise power against FP32 is a continuous signal that resolves
   errors far below what a metric over a few hundred samples can (and needs no labels or user
   code). Built-in metrics are scored from the same outputs for free.
3. *latency attribution*: ORT's per-node profile of the FP32 and the all-INT8 model, grouped by
   layer, says per layer whether its INT8 form (glue included) is faster.
Decisions that need the user's metric on the whole search data (what may be fixed, repair) are
taken by the search, which measures groups together.
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

from qsearch import data
from qsearch.analysis.proxy import rank_options
from qsearch.analysis.screen import Screen, proxy_samples, run_jobs, samples_within, values_per_sample
from qsearch.calibration import RANGES_VERSION
from qsearch.engine.base import profiles_nodes
from qsearch.files import atomic_write_text, save_figure
from qsearch.plan.format import LayerChoice
from qsearch.workbench import Workbench

PROFILE_VERSION = 8


@dataclass(frozen=True)
class LayerSensitivity:
    name: str
    op_type: str
    macs: int
    weight_bytes: int
    drops: dict[str, float]  # option label -> metric drop, this layer alone INT8 (screened options; built-in metrics)
    proxy_sqnr: dict[str, float]  # option label -> layer output SQNR (dB) against float
    restore: float | None = None  # all others INT8: metric gained by keeping this layer float
    noise: float = 0.0  # model-output noise / signal power, this layer alone INT8 at its best option
    fp32_ms: float = 0.0  # attributed latency of the layer (and the glue after it) in the FP32 model
    int8_ms: float = 0.0  # ... and in the all-INT8 model, Q/DQ and float glue included
    screened: bool = True  # noise measured; else estimated from the proxy (INT8 does not pay here)

    @property
    def best_option(self) -> str:
        return self.ranked_options()[0]

    @property
    def best_drop(self) -> float:
        return self.drops.get(self.best_option, 0.0)

    @property
    def worst_drop(self) -> float:
        return max(self.drops.values(), default=0.0)

    @property
    def gain_ms(self) -> float:
        """Milliseconds saved by this layer in INT8; negative when its INT8 form is slower."""
        return self.fp32_ms - self.int8_ms

    @property
    def output_sqnr(self) -> float:
        return 10 * math.log10(1 / self.noise) if self.noise > 0 else 120.0

    def ranked_options(self) -> list[str]:
        """Best first: measured drop where screened, then the proxy's layer-output SQNR."""
        opts = set(self.proxy_sqnr) | set(self.drops)
        return sorted(opts, key=lambda k: (self.drops.get(k, math.inf) if self.drops else 0.0,
                                           -self.proxy_sqnr.get(k, -math.inf), k))


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
    forms: dict = field(default_factory=dict)  # pattern -> form, measured (`choose_forms`)

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
        # every option the proxy ranked (a reviewer sees why the screened one won), drops where screened
        options = sorted({k for x in self.layers for k in (*x.drops, *x.proxy_sqnr)})
        w.writerow(["rank", "layer", "op_type", "macs", "weight_bytes", "best_option", "best_drop", "output_sqnr_db",
                    "fp32_ms", "int8_ms", "int8_gain_ms", "restore",
                    *[f"drop[{o}]" for o in options], *[f"sqnr_db[{o}]" for o in options]])
        for i, x in enumerate(self.layers, 1):
            w.writerow([i, x.name, x.op_type, x.macs, x.weight_bytes, x.best_option, f"{x.best_drop:.6g}",
                        f"{x.output_sqnr:.4g}", f"{x.fp32_ms:.4g}", f"{x.int8_ms:.4g}", f"{x.gain_ms:.4g}",
                        "" if x.restore is None else f"{x.restore:.6g}",
                        *[f"{x.drops[o]:.6g}" if o in x.drops else "" for o in options],
                        *[f"{x.proxy_sqnr[o]:.4g}" if o in x.proxy_sqnr else "" for o in options]])
        return buf.getvalue()

    def table(self, top: int = 15) -> str:
        lines = [f"{'rank':>4}  {'layer':<28} {'op':<7} {'MMACs':>7} {'best option':<28} {'drop':>8} {'out dB':>7} "
                 f"{'layer dB':>8} {'int8 gain ms':>12}"]
        for i, x in enumerate(self.layers[:top], 1):
            sq = x.proxy_sqnr.get(x.best_option, float("nan"))
            drop = f"{x.drops[x.best_option]:>8.4f}" if x.best_option in x.drops else f"{'-':>8}"
            lines.append(f"{i:>4}  {x.name[:28]:<28} {x.op_type:<7} {x.macs / 1e6:>7.2f} {x.best_option:<28} "
                         f"{drop} {x.output_sqnr:>7.1f} {sq:>8.1f} {x.gain_ms:>12.3f}")
        if self.spearman is not None:
            lines.append(f"proxy (layer SQNR) vs measured (output noise) Spearman rank correlation: {self.spearman:.3f}")
        pays = sum(x.gain_ms > 0 for x in self.layers)
        lines.append(f"INT8 pays (faster with its glue, measured) for {pays} of {len(self.layers)} layers; "
                     f"{self.meta.get('evaluations', '?')} evaluations")
        return "\n".join(lines)


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


def profile_key(bench: Workbench, samples, reverse, screen_all=True) -> str:
    import hashlib

    space = bench.workload.space
    src = json.dumps([PROFILE_VERSION, RANGES_VERSION, bench.prepared.fingerprint, bench.prepared.preparation,
                      bench.search_data.fingerprint,
                      bench.calib_data.fingerprint, samples, reverse, screen_all, list(space.calibration), list(space.granularity), list(space.recovery),
                      space.percentile, [la.name for la in bench.candidates()], bench.workload.metric.name,
                      bench.workload.metric.search_entry, bench.workload.target, bench.workload.threads,
                      bench.workload.latency_batch, list(space.weights)])
    return hashlib.sha256(src.encode()).hexdigest()[:20]


def analyze(bench: Workbench, samples: int | None = None, reverse: bool = False, workers: int = 1,
            cache_dir: Path | None = None, progress: Callable | None = None,
            queue=None, screen_all: bool = True, screen_spend: float | None = None) -> SensitivityProfile:
    """Proxy-rank every layer's options, screen each layer alone at its best option for output
    fidelity, attribute latency per layer; most sensitive (noisiest) first. See module docstring.
    The profile carries the measured forms (`profile.forms`): later stages build on
    `bench.with_forms(profile.forms)`. `queue` (a `jobs.StudyQueue`) runs the jobs shared: several
    workers split them and a resumed run finds the finished ones in storage. `screen_all=False`
    (what `optimize` uses) screens only the layers whose INT8 form pays: the others are never
    fixed INT8, so an estimate of their noise from the proxy is enough to order them.
    `screen_spend`: the sample-runs the screen may cost in all (`optimize`: a share of the
    search's), so a model with hundreds of layers screens each on fewer samples."""
    t0 = time.perf_counter()
    key = profile_key(bench, samples, reverse, screen_all) + ("" if screen_spend is None else f"-{screen_spend:g}")
    cache = cache_dir / f"sensitivity-{key}.yaml" if cache_dir else None
    if cache is not None and cache.is_file():
        try:
            return SensitivityProfile.from_yaml(cache.read_text())
        except Exception:
            pass
    forms, form_ms = _measure_forms(bench, queue, progress)
    bench = bench.with_forms(forms)  # every later model is built in the measured forms
    layers = bench.candidates()  # a fused pattern's gate layers follow it: nothing to analyse on their own
    screen = Screen(bench, samples)
    n_proxy = proxy_samples(screen.data)
    proxy_data = screen.data if n_proxy >= screen.data.samples else \
        data.rechunked(screen.data.head(n_proxy), bench.run_samples)
    proxies, best, passes = rank_options(bench, layers, proxy_data, queue, progress)
    timing = _attribute(bench, layers, best, queue, progress)
    fp32_ms, int8_ms = timing[4], timing[5]
    # fidelity screen, where a decision needs it: each layer whose INT8 form pays, alone at its
    # best option on the subset. A layer where INT8 does not pay is never fixed INT8 and goes
    # float in every warm start; its output noise is estimated from its proxy SQNR instead.
    pays = [la for la, f, i in zip(layers, fp32_ms, int8_ms) if screen_all or f - i > 0]
    jobs = [{la.name: best[la.name]} for la in pays]
    n = screen.data.samples if screen_spend is None else \
        samples_within(screen_spend, len(jobs), screen.data.samples, screen.metric is not None,
                       values_per_sample(screen.data))
    fewer = Screen(bench, n) if n < screen.data.samples else screen
    if queue is not None:
        results = queue.map(jobs, fewer.run, progress)
    else:
        results = run_jobs(bench, fewer, jobs, workers, n if fewer is not screen else samples, cache_dir, progress,
                           "screen")
    measured = {la.name: r for la, r in zip(pays, results)}
    evaluations = passes + len(jobs)
    restore: dict[str, float] = {}
    if reverse:
        fp = LayerChoice(bench.float_precision).label()
        rev = run_jobs(bench, screen, [best] + [{**best, la.name: fp} for la in layers], workers, samples, cache_dir,
                        progress, "reverse")
        evaluations += len(rev)
        for la, (noise, _) in zip(layers, rev[1:]):
            restore[la.name] = float(rev[0][0] - noise)  # output noise removed by keeping this layer float
    meta = {"evaluations": evaluations, "proxy_passes": passes, "proxy_samples": proxy_data.samples,
            "screened": len(jobs), "workers": workers,
            **({"form_ms": form_ms} if form_ms else {}), **({"region_calls": timing[6]} if len(timing) > 6 else {}),
            **({"screen_samples": n} if fewer is not screen else {})}
    profile = _assemble(bench, layers, proxies, best, measured, restore, timing[:6], meta, screen.data.samples, forms,
                        time.perf_counter() - t0)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, profile.to_yaml())
    return profile


def _measure_forms(bench: Workbench, queue, progress) -> tuple[dict[str, str], dict]:
    """How patterns without an int8 kernel (hardswish) run inside int8 regions, timed on the
    all-INT8 model (one shared job: every worker must analyse the same layouts)."""
    layers = bench.candidates()
    uniform = {la.name: LayerChoice("int8", "minmax", "per_channel", weights=bench.workload.space.weights[0])
               for la in layers}

    def forms_job(_job: dict) -> tuple:
        return choose_forms(bench, uniform)

    shared = queue is not None and any(la.pattern for la in layers)  # nothing to time: no job, no stage
    return queue.stage("forms").map([{}], forms_job, progress, what="forms")[0] if shared else forms_job({})


def _attribute(bench: Workbench, layers, best: dict[str, str], queue, progress) -> tuple:
    """Latency attribution: FP32 and all-INT8 (best options) profiled per node. One shared job:
    every worker must derive the same screen from the same timings. Returns (fp32 total, int8
    total, fp32 by kind, int8 by kind, fp32 ms per layer, int8 ms per layer)."""
    from qsearch.analysis import profiling

    all_int8 = {la.name: LayerChoice.parse(best[la.name]) for la in layers}

    def attribute(_job: dict) -> tuple:
        if not profiles_nodes(bench.engine):  # a latency hook: regions timed whole
            from qsearch.analysis import region_timing

            return region_timing.attribute(bench, layers, best)
        fp32_p = profiling.profile(bench.prepared, bench.prepared.proto, bench.latency_feed, bench.engine)
        int8_p = profiling.profile(bench.prepared, bench.rewriter(bench.plan(all_int8)), bench.latency_feed,
                                   bench.engine)
        return (fp32_p.total_ms, int8_p.total_ms, fp32_p.by_kind, int8_p.by_kind,
                [fp32_p.layer_ms(la.name) for la in layers], [int8_p.layer_ms(la.name) for la in layers])

    return queue.stage("profile").map([{}], attribute, progress, what="profile")[0] if queue is not None else \
        attribute({})


def _assemble(bench: Workbench, layers, proxies, best, measured, restore, timing, meta, samples, forms,
              seconds: float) -> SensitivityProfile:
    """The profile, noisiest first; unscreened layers' noise estimated from their proxy SQNR
    through the median output-noise-per-layer-noise ratio of the screened ones."""
    fp32_total, int8_total, fp32_kinds, int8_kinds, fp32_ms, int8_ms = timing
    ratios = [measured[n][0] / 10 ** (-proxies[n][best[n]] / 10) for n in measured if proxies[n][best[n]] < 120]
    gain = float(np.median(ratios)) if ratios else 1.0
    result = []
    for la, f, i in zip(layers, fp32_ms, int8_ms):
        noise, drop = measured.get(la.name, (gain * 10 ** (-proxies[la.name][best[la.name]] / 10), None))
        result.append(LayerSensitivity(
            la.name, la.op_type, la.macs, la.weight_bytes, {} if drop is None else {best[la.name]: float(drop)},
            proxies[la.name], restore.get(la.name), noise=float(noise), fp32_ms=round(f, 6), int8_ms=round(i, 6),
            screened=la.name in measured))
    result.sort(key=lambda x: (-x.noise, -x.best_drop, x.name))
    rho = spearman([-x.proxy_sqnr[x.best_option] for x in result if x.screened],
                   [x.noise for x in result if x.screened])
    form_ms, calls, fewer = meta.pop("form_ms", None), meta.pop("region_calls", None), meta.pop("screen_samples", None)
    meta = {"evaluations": meta["evaluations"], "proxy_passes": meta["proxy_passes"],
            "proxy_samples": meta["proxy_samples"], "screened": meta["screened"], "noise_per_layer_noise": gain, "profiled_models": 2 if calls is None else calls, "workers": meta["workers"],
            **({"region_calls": calls} if calls is not None else {}),
            **({"screen_samples": fewer} if fewer is not None else {}),
            "fp32_ms": round(fp32_total, 4), "int8_ms": round(int8_total, 4),
            "fp32_by_kind": {k: round(v, 4) for k, v in fp32_kinds.items()},
            "int8_by_kind": {k: round(v, 4) for k, v in int8_kinds.items()},
            **({"form_ms": form_ms} if form_ms else {})}
    return SensitivityProfile(
        model=bench.prepared.name, fingerprint=bench.prepared.fingerprint, metric=bench.workload.metric.name,
        fp32_score=float(bench.baseline.fp32_search), samples=samples, layers=tuple(result), spearman=rho,
        seconds=round(seconds, 3), meta=meta, forms=dict(forms))


FORM_TIE = 0.02  # forms within 2% of the fastest: a tie


def choose_forms(bench: Workbench, choices: dict[str, LayerChoice], rounds: int = 3) -> tuple[dict[str, str], dict]:
    """For each pattern the model has (hardswish), the all-INT8 model built in each of its forms and
    timed in interleaved rounds (best round each): the fastest form wins. Forms within FORM_TIE
    of it tie, and a tie goes to the last form listed (`PATTERN_FORMS`: the one quantizing fewer
    tensors, so one rounding and one calibrated range fewer), which is also the choice when the
    search objective is not latency. Returns (forms, ms per timed form)."""
    from qsearch.model.load import PATTERN_FORMS

    forms: dict[str, str] = {}
    timings: dict[str, dict[str, float]] = {}
    for pattern in sorted({la.pattern for la in bench.candidates() if la.pattern}):
        options = PATTERN_FORMS[pattern]
        if bench.workload.space.objective != "latency":  # size / bitops: nothing to time, fewer tensors win
            forms[pattern] = options[-1]
            continue
        sessions = {f: bench.engine.session(bench.rewriter(bench.plan(choices, {**forms, pattern: f})))
                    for f in options}
        ms = {f: float("inf") for f in options}
        for _ in range(rounds):
            for f, sess in sessions.items():
                ms[f] = min(ms[f], bench.engine.time(sess, bench.latency_feed, warmup=2, repeat=5).wall_ms)
        fastest = min(ms.values())
        forms[pattern] = next(f for f in reversed(options) if ms[f] <= fastest * (1 + FORM_TIE))
        timings[pattern] = {f: round(v, 4) for f, v in ms.items()}
    return forms, timings


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
