"""The rules that choose the plan to ship, on the final stage's rows: pure functions of measured
numbers (per-round times, drops, resolutions), tested on planted rows. `finalize` measures; this
decides. A simpler plan that is as good wins; FP32 ships where no INT8 plan is faster."""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

from qsearch import timing
from qsearch.report.markdown import Row

TIE = timing.TIE  # plans within 2% of each other tie even on a quiet machine
BUSY_RATIO = 1.15  # wall / thread CPU time above this: the machine was busy while timing


def selection_factor(compared: int) -> float:
    """How much wider than the split's resolution (two standard errors) a drop's margin must be when
    the plan was chosen as the best of `compared` plans scored on the same split: the best of many
    noisy drops is the luckiest (the detector's best of 50 trials lost 0.01-0.03 more on test than
    on search). One-sided Bonferroni: z at 5% / compared, over the resolution's 2 (1 for one plan)."""
    z = NormalDist().inv_cdf(1 - 0.05 / max(compared, 1))
    return max(1.0, z / 2)


def margin_needed(row: Row, compared: int = 1) -> float | None:
    """The margin under the budget that makes the row's drop clear of it (None: unknown)."""
    if row.resolution is None:
        return None
    return row.resolution * selection_factor(compared)


def clear(row: Row, fp32: Row, allowed: float, compared: int = 1) -> bool | None:
    """Whether the row's search drop is under the budget by more than the split resolves, for a plan
    chosen among `compared` (None: unknown)."""
    need = margin_needed(row, compared)
    if need is None:
        return None
    return fp32.search_score - row.search_score + need <= allowed + 1e-12


def upper_drop(row: Row, fp32: Row, compared: int = 1) -> float:
    """The row's drop plus the margin it needs (its drop where the resolution is unknown), a gain
    counted as no drop: on a split that cannot tell, a plan that scores above FP32 is the luckiest
    draw, not the safest (the detector's trials 0.02-0.03 above FP32 on search lost 0.015-0.02 on
    test), so among such plans the one whose outputs move least (the smallest resolution) ranks first."""
    return max(fp32.search_score - row.search_score, 0.0) + (margin_needed(row, compared) or 0.0)


def round_spread(times: Sequence[float]) -> float:
    """How far the best round (the time compared) may be off: the gap to the second-best round.
    One disturbed round (a VM hiccup) leaves it alone; the full range would have made every plan
    of a 2 ms model a tie at ±40% and shipped the most accurate instead of the fastest."""
    best = sorted(t for t in times if math.isfinite(t))[:2]  # (NaN: a round that left the plan out)
    return (best[-1] - best[0]) / max(best[0], 1e-12)


def busy(rows: Sequence[Row]) -> bool:
    """Whether the machine took the core away while timing: wall time well above the thread's CPU
    time (ONNX Runtime with one intra-op thread computes on this thread alone)."""
    ratios = [r.latency_ms / r.cpu_ms for r in rows if r.cpu_ms]
    return bool(ratios) and float(np.median(ratios)) > BUSY_RATIO


def clock(row: Row, cpu: bool) -> tuple[float, float]:
    """(ms, spread) of a row on the clock the choice uses."""
    return (row.cpu_ms, row.cpu_spread) if cpu and row.cpu_ms else (row.latency_ms, row.latency_spread)


def rounds_of(row: Row, cpu: bool) -> tuple[float, ...]:
    """A row's per-round times on the clock the choice uses."""
    return row.cpu_rounds if cpu and row.cpu_rounds else row.wall_rounds


def speedup(fp32: Row, row: Row, cpu: bool = False) -> timing.Ratio | None:
    """FP32's time over the row's, paired by round (None where the rows were not timed in rounds)."""
    a, b = rounds_of(row, cpu), rounds_of(fp32, cpu)
    return timing.ratio(a, b) if a and len(a) == len(b) else None


def decide(rows: Sequence[Row], allowed: float, target: str, cpu: bool = False) -> tuple[int, bool]:
    """(the row `pick` chooses, whether FP32 ships instead): on a CPU target a plan that is not
    faster than FP32 (its paired speed-up below 1), or has no INT8 layer left (a fallback that
    reverted everything), never ships; FP32 does, and the result says so."""
    i = pick(rows, allowed, cpu)
    return i, fp32_instead(rows, i, target, cpu)


def fp32_instead(rows: Sequence[Row], i: int, target: str, cpu: bool = False) -> bool:
    """Whether FP32 ships instead of row `i`: on a CPU target, when it is not faster than FP32 (its
    paired speed-up at most 1, or its best time not below FP32's) or has no INT8 layer left."""
    r = speedup(rows[0], rows[i], cpu)
    # the paired ratio decides; the best times the report shows must not say otherwise either
    slower = (r is not None and r.value <= 1) or clock(rows[i], cpu)[0] >= clock(rows[0], cpu)[0]
    return target == "cpu" and (slower or rows[i].int8_layers == 0)


def pays(rows: Sequence[Row], k: int, cpu: bool = False) -> bool:
    """Whether row `k` is decidedly faster than FP32 (its paired speed-up's interval above 1)."""
    r = speedup(rows[0], rows[k], cpu)
    return r.low > 1 if r is not None else clock(rows[k], cpu)[0] < clock(rows[0], cpu)[0]


def pick(rows: Sequence[Row], allowed: float, cpu: bool = False, among: set[int] | None = None) -> int:
    """Index of the row (after FP32's, row 0) to ship among those within budget on search data
    (and in `among`, if given): the fastest, except that plans the interleaved rounds cannot tell
    from it (or that are slower by less than `timing.TIE`) tie with it, and a tie goes to the plan
    with the larger accuracy margin (a drop the split cannot resolve decides nothing, a faster time
    inside the noise neither). Rows timed without rounds compare their best times and spreads."""
    fp32 = rows[0]
    within = [i for i in range(1, len(rows)) if fp32.search_score - rows[i].search_score <= allowed + 1e-12
              and (among is None or i in among)]
    times = [rounds_of(r, cpu) for r in rows]
    if all(times[i] and len(times[i]) == len(times[within[0]]) for i in within):
        best = timing.fastest(times, within)
        near = [i for i in within if i == best or timing.ties_with(times, best, i)]
    else:
        fastest = min(within, key=lambda i: (clock(rows[i], cpu)[0], -rows[i].search_score))
        ms, spread = clock(rows[fastest], cpu)
        near = [i for i in within if clock(rows[i], cpu)[0] <= ms * (1 + max(TIE, spread, clock(rows[i], cpu)[1]))]
    return max(near, key=lambda i: (rows[i].search_score, -clock(rows[i], cpu)[0]))


def why_lost(rows: Sequence[Row], i: int, k: int, allowed: float, cpu: bool, compared: int = 1) -> str:
    """One line: why finalist `k` did not ship when row `i` did."""
    fp32, row = rows[0], rows[k]
    drop = fp32.search_score - row.search_score
    if drop > allowed + 1e-12:
        return f"over budget on search data (drop {drop:.3g} > {allowed:.3g})"
    if clear(row, fp32, allowed, compared) is False:
        if clear(rows[i], fp32, allowed, compared) is False and pays(rows, k, cpu):
            a, b = upper_drop(rows[i], fp32, compared), upper_drop(row, fp32, compared)
            return (f"neither is clear of the budget; the shipped plan has the "
                    f"{'same margin and the lower time' if abs(a - b) < 5e-4 else 'larger margin'} (drop, a gain "
                    f"counted as none, plus what the split resolves: {a:.3g} against {b:.3g})")
        return "within budget but not clear of it by what the search split resolves"
    a, b = rounds_of(rows[i], cpu), rounds_of(row, cpu)
    if a and len(a) == len(b):
        r = timing.ratio(a, b)
        if r.low > 1 + timing.TIE:
            return f"slower than the shipped plan: {r.text()}"
        margin = row.search_score - rows[i].search_score
        return (f"ties with the shipped plan on time ({r.text()}: not decidedly more than {timing.TIE:.0%} apart); "
                + ("the shipped plan has the larger margin" if margin < 0 else
                   "the same margin, and the shipped plan's best time is lower"))
    return "slower than the shipped plan"


def resolution_note(row: Row, allowed: float, fp32: Row | None = None, compared: int = 1) -> str:
    """One line when the budget is finer than the search split resolves (or cannot be told), or
    when the shipped plan's drop is within that resolution of the budget."""
    res = row.resolution
    if res is None:
        return ("the drop's interval on the search split is unknown (the score function neither returns per-sample "
                "parts nor replays on its recorded outputs)")
    if fp32 is not None and clear(row, fp32, allowed, compared) is False:
        return (f"the search split cannot tell whether this plan is within budget: its drop "
                f"{fp32.search_score - row.search_score:.3g} is within {margin_needed(row, compared):.3g} of the "
                f"budget {allowed:.3g} (the split's resolution {res:.3g}, widened for a choice among {compared} plans), "
                f"and no plan within budget that pays is clear of it")
    if allowed < res:
        return (f"warning: the budget {allowed:.3g} is finer than the search split resolves ({res:.3g}: two "
                f"bootstrap standard errors of a drop, or one sample); choices near the budget are noise. "
                f"Add search data or widen max_drop")
    return ""


def prefer_clear(rows: list[Row], i: int, allowed: float, cpu: bool, interval,
                 compared: int = 1) -> tuple[int, set[int]]:
    """The row to ship among those clear of the budget (`clear`, for a choice among `compared`
    plans): the picked row `i` when it is; else the rows within budget get intervals (`interval(k)`
    -> the row with its resolution), fastest first, until one is clear and still decidedly faster
    than FP32, and `pick` chooses among those. None clear: every row within budget is checked and
    the one with the largest margin (the lowest drop plus needed margin) among those that pay ships,
    `i` where none pays (the verdict says the split cannot tell; a clear plan that does not pay is no
    better an answer than FP32). Fills `rows` with the intervals computed; returns (the row, rows
    given intervals)."""
    rows[i] = interval(i)
    checked = {i}
    if clear(rows[i], rows[0], allowed, compared) is not False:
        return i, checked
    within = [k for k in range(1, len(rows)) if k != i and rows[0].search_score - rows[k].search_score
              <= allowed + 1e-12]
    for k in sorted(within, key=lambda k: clock(rows[k], cpu)[0]):
        rows[k] = interval(k)
        checked.add(k)
        if clear(rows[k], rows[0], allowed, compared) and pays(rows, k, cpu):
            break
    good = {k for k in checked if clear(rows[k], rows[0], allowed, compared) and pays(rows, k, cpu)}
    if good:
        return pick(rows, allowed, cpu, among=good), checked
    paying = [k for k in checked if pays(rows, k, cpu)]
    if not paying:
        return i, checked
    return min(paying, key=lambda k: (upper_drop(rows[k], rows[0], compared), clock(rows[k], cpu)[0])), checked


def cost_of(row: Row, objective: str) -> float:
    """A row's analytic cost: GBOPs, or bytes for the size objective."""
    return float(row.size_bytes) if objective == "size" or row.bitops is None else float(row.bitops)


def cheapest_clear(rows: list[Row], allowed: float, objective: str, interval,
                   compared: int = 1) -> tuple[int, set[int]]:
    """For analytic objectives (bit-operations, size: this CPU's time is not the target's): the
    cheapest row within budget on search data that is clear of it by what the split resolves
    (`interval(k)` -> the row with its resolution, computed cheapest first until one is clear); ties
    in cost go to the larger margin. None clear: the cheapest within budget (the verdict says the
    split cannot tell). Fills `rows` with the intervals computed; returns (the row, rows given intervals)."""
    fp32 = rows[0]
    within = sorted((k for k in range(1, len(rows)) if fp32.search_score - rows[k].search_score <= allowed + 1e-12),
                    key=lambda k: (cost_of(rows[k], objective), -rows[k].search_score))
    checked: set[int] = set()
    for k in within:
        rows[k] = interval(k)
        checked.add(k)
        if clear(rows[k], fp32, allowed, compared) is not False:
            return k, checked
    return (within[0] if within else 0), checked
