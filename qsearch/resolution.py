"""How finely a split resolves the metric: bootstrap intervals of a plan's drop against FP32.

Built-in metrics are sums of per-run parts (correct/total for top-1, cosine sums, signal/noise
for SQNR). Resampling the runs, paired between the plan and FP32 on the same samples, gives the
spread a drop would show on another draw of the same size. A budget finer than that spread (or than
one sample, for top-1) cannot tell plans apart; the result says so instead of pretending.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qsearch.scoring import finish_metric

RESAMPLES = 2000


@dataclass(frozen=True)
class DropInterval:
    drop: float
    low: float  # 5th percentile of the resampled drop
    high: float  # 95th percentile
    stderr: float  # bootstrap standard error
    step: float  # the smallest change one sample can make (top-1: 1/n), else 0

    @property
    def resolution(self) -> float:
        """The smallest drop difference this split resolves: two standard errors, at least one sample."""
        return max(2 * self.stderr, self.step)

    def text(self, digits: int = 3) -> str:
        return f"{self.drop:.{digits}g} (90% interval {self.low:.{digits}g} to {self.high:.{digits}g})"


def _metric(metric: str, sums: np.ndarray) -> np.ndarray:
    """Vectorized `finish_metric` over resampled sums (k x 2)."""
    if metric == "sqnr":
        return np.array([finish_metric(metric, s) for s in sums])
    return sums[:, 0] / np.maximum(sums[:, 1], 1e-30)


def drop_interval(metric: str, fp32_parts: np.ndarray, plan_parts: np.ndarray, seed: int = 0) -> DropInterval:
    """Paired bootstrap over runs: FP32's score minus the plan's, on the same resampled runs."""
    rng = np.random.default_rng(seed)
    n = len(fp32_parts)
    idx = rng.integers(0, n, size=(RESAMPLES, n))
    drops = _metric(metric, fp32_parts[idx].sum(1)) - _metric(metric, plan_parts[idx].sum(1))
    drop = finish_metric(metric, fp32_parts.sum(0)) - finish_metric(metric, plan_parts.sum(0))
    samples = fp32_parts[:, 1].sum()
    step = 1.0 / samples if metric == "top1" and samples > 0 else 0.0
    low, high = np.percentile(drops, [5, 95])
    return DropInterval(float(drop), float(low), float(high), float(drops.std()), step)


def clearly_over(estimate: float, allowed: float, slice_parts: tuple[float, float] | None = None) -> bool:
    """Whether a drop estimated on the first slice of the search data is clearly over budget: twice
    the budget, plus 3 sigma of a binomial accuracy estimate when the slice's (correct, samples)
    are given (top-1), so borderline plans are scored in full."""
    margin = 2 * allowed
    if slice_parts is not None and slice_parts[1] > 0:
        p = max(min(slice_parts[0] / slice_parts[1], 1 - 1e-3), 1e-3)
        margin += 3 * math.sqrt(p * (1 - p) / slice_parts[1])
    return estimate > max(margin, 1e-9)
