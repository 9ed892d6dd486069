"""The fidelity screen: plans run on a subset of the search data, their outputs' noise power
measured against FP32's (and a built-in metric scored from the same outputs). It resolves errors
far below what a metric over a few hundred samples can, needs no labels or user code, and runs in
worker processes (`--workers`) or as shared jobs of a study queue.
"""

from __future__ import annotations

import numpy as np

from qsearch import data
from qsearch.errors import QsearchError
from qsearch.plan.format import LayerChoice
from qsearch.scoring import PARTIALS, finish_metric
from qsearch.workbench import Workbench

SCREEN_SAMPLES = 64  # enough to rank layers by output noise, cheap for 100 layers
SEARCH_SHARE = 0.5  # `optimize`: the screen may cost at most half of the search's trial evaluations
# (`stopping.trials_to_plan_for`: the trials the ceiling stop lets a study run)
MIN_SAMPLES = 8  # the fewest a screen runs: output noise over whole feature maps still ranks layers
MIN_METRIC_SAMPLES = 32  # ... where a built-in metric's drop is read from the same outputs
PROXY_ELEMENTS = 16_000_000  # input values the proxy reads: 81 pages of 3x256x256, 11 of 3x800x608
SCREEN_ELEMENTS = 6_000_000  # input values a layer's screen needs for its output noise: 4 pages of 3x800x608
MIN_VALUE_SAMPLES = 2  # ... never fewer samples than this


def values_per_sample(dataset: data.Dataset) -> int:
    """Input values one sample holds (every input together)."""
    return sum(int(np.prod(v.shape[1:])) for v in dataset.batches[0].values()) if dataset.batches else 1


def proxy_samples(dataset: data.Dataset) -> int:
    """Samples the proxy's passes run on: a layer's output SQNR is a statistic over its values, so
    a model with large inputs reaches the same count in fewer samples (a 800x608 page holds as many
    as 30 text lines of 48x320); never fewer than MIN_SAMPLES nor more than the screen's subset."""
    per_sample = values_per_sample(dataset)
    return int(min(dataset.samples, max(MIN_SAMPLES, -(-PROXY_ELEMENTS // max(per_sample, 1)))))


def samples_within(spend: float, layers: int, have: int, metric: bool, per_sample: int = 1) -> int:
    """Samples per screened layer so that `layers` screens cost at most `spend` sample-runs (the
    search's share: on a 300-layer detector, 64 samples each cost four times the whole search),
    never more than `have` nor fewer than the floor. Output noise alone (no built-in metric read
    from the same outputs) is a statistic over values: SCREEN_ELEMENTS input values are enough,
    so a model with large inputs screens each layer on a few pages (the layout detector: 4 of 800x608)."""
    if metric:
        return int(min(have, max(MIN_METRIC_SAMPLES, spend // max(1, layers))))
    by_values = max(MIN_VALUE_SAMPLES, SCREEN_ELEMENTS // max(per_sample, 1))
    return int(min(have, by_values, max(min(MIN_SAMPLES, by_values), spend // max(1, layers))))


class Screen:
    """Runs plans on a subset of the search data and measures the outputs' noise against FP32
    (and the built-in metric from the same outputs)."""

    def __init__(self, bench: Workbench, samples: int | None):
        self.bench = bench
        n = min(samples or SCREEN_SAMPLES, bench.search_data.samples)
        self.data = data.rechunked(bench.search_data.head(n), bench.run_samples)
        fp32 = bench.engine.session(bench.prepared.proto)
        self.reference = [fp32.run(None, dict(b)) for b in self.data.batches]
        self.floats = [i for i, o in enumerate(self.reference[0]) if np.issubdtype(o.dtype, np.floating)]
        self.signal = sum(float(np.sum(np.square(r[i], dtype=np.float64))) for r in self.reference for i in self.floats)
        m = bench.workload.metric.name
        self.metric = m if m in PARTIALS and (m != "top1" or self.data.labels[0] is not None) else None
        self.fp32_metric = self._metric(self.reference)

    def _metric(self, outs) -> float | None:
        if self.metric is None:
            return None
        acc = sum(PARTIALS[self.metric](o, r, lbl) for o, r, lbl in zip(outs, self.reference, self.data.labels))
        return finish_metric(self.metric, acc)

    def run(self, choices: dict[str, str]) -> tuple[float, float | None]:
        """(output noise / signal power, metric drop or None) of one plan on the subset."""
        bench = self.bench
        try:
            plan = bench.plan({n: LayerChoice.parse(lbl) for n, lbl in choices.items()})
            sess = bench.engine.session(bench.rewriter(plan))
            outs = [sess.run(None, dict(b)) for b in self.data.batches]
        except QsearchError:
            raise
        except Exception as exc:
            raise QsearchError(f"layer(s) {', '.join(choices)}: scoring failed in ONNX Runtime: "
                               f"{str(exc).splitlines()[0]}") from None
        noise = sum(float(np.sum(np.square(o[i].astype(np.float64) - r[i]))) for o, r in zip(outs, self.reference)
                    for i in self.floats)
        score = self._metric(outs)
        return noise / max(self.signal, 1e-30), None if score is None else self.fp32_metric - score


# worker-process state (spawned workers rebuild the context from the workload once)
_WORKER: dict = {}


def _worker_init(workload, cache_dir, samples, forms):
    import signal

    from qsearch.workbench import open_workbench

    # Ctrl-C reaches the whole process group: the parent alone handles it (and terminates us)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    bench = open_workbench(workload, cache_dir, log=lambda *a: None).with_forms(forms)
    _WORKER["bench"] = bench
    _WORKER["screen"] = Screen(bench, samples)


def _worker_score(job):
    return _WORKER["screen"].run(job)


def run_jobs(bench: Workbench, screen: Screen, jobs: list[dict], workers: int, samples, cache_dir, progress,
              what: str) -> list[tuple[float, float | None]]:
    if progress is not None:
        progress(0, len(jobs), what)
    out: list = []
    if workers <= 1 or len(jobs) < 2:
        for i, job in enumerate(jobs):
            out.append(screen.run(job))
            if progress is not None:
                progress(i + 1, len(jobs), what)
        return out
    import multiprocessing as mp

    # a Pool, not a ProcessPoolExecutor: on Ctrl-C/SIGTERM (or an error) the workers are
    # terminated at once instead of the parent waiting for their queued jobs
    pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init,
                                        initargs=(bench.workload, cache_dir, samples, bench.forms))
    try:
        for i, s in enumerate(pool.imap(_worker_score, jobs, chunksize=max(1, len(jobs) // (4 * workers)))):
            out.append(s)
            if progress is not None:
                progress(i + 1, len(jobs), what)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
    return out
