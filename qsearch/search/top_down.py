"""Down from all-INT8: where the closed loop builds up from FP32, this walk starts from the fast
end. When all-INT8 (every layer at its best option) misses the budget, the most sensitive layers
go float first (int16 where the search space has it), their number found by bisection on the *measured* drop; then INT8 islands left
between float layers (each pays a Q and a DQ it cannot fuse) go float too, measured once.

It never reads single-layer savings: at batch 1 a layer alone in INT8 often measures slower (its
Q/DQ glue costs more than the int8 kernel saves) while the same layers as one region pay, which
is exactly where the bottom-up loop stops early. (An earlier both-ends variant, reverted, ordered
layers by single-layer noise on the PP-OCRv4 recognizer with int8 weights that saturate on AVX2
kernels; this one runs only when all-INT8 misses the budget and measures every step.)
"""

from __future__ import annotations

from qsearch.search.problem import MeasureDrop, Problem, Start


def islands(problem: Problem, int8: set[str]) -> set[str]:
    """INT8 layers all of whose neighbouring candidate layers are float (isolated in their region)."""
    adj: dict[str, set[str]] = {x.name: set() for x in problem.layers}
    for a, b in problem.edges:
        if a in adj and b in adj:
            adj[a].add(b)
            adj[b].add(a)
    return {n for n in int8 if adj[n] and not adj[n] & int8}


def top_down(problem: Problem, measure: MeasureDrop, start: Start) -> list[dict[str, str]]:
    """Bisection on k, the k most sensitive free layers float, for the fewest within budget; every
    plan measured is a trial. Proposes nothing more."""
    all_int8 = start.decision.all_int8_drop
    if not problem.mixable or all_int8 is None or all_int8 <= problem.allowed or start.max_evals < 2:
        return []
    order = [x.name for x in sorted(problem.layers, key=lambda x: x.rank) if x.name not in start.fixed]
    best = {**problem.best, **start.fixed}
    left = start.max_evals

    def plan(k: int) -> dict[str, str]:  # the k most sensitive float (int16 where the space has it)
        return {**best, **{n: problem.gentler(n, best[n]) for n in order[:k]}}

    lo, hi = 0, len(order)  # lo: over budget (all-INT8, measured by the fixing step); hi: every free layer float
    found: int | None = None
    while hi - lo > 1 and left > 0:
        mid = (lo + hi) // 2
        left -= 1
        if measure(plan(mid)) <= problem.allowed:
            hi, found = mid, mid
        else:
            lo = mid
    if found is None or left <= 0:
        return []
    chosen = plan(found)
    int8 = {n for n, lbl in chosen.items() if lbl.startswith("int8/")}
    lonely = islands(problem, int8) - set(start.fixed)
    if lonely:  # border glue: an isolated INT8 layer pays two unfused Q/DQ
        measure({**chosen, **{n: problem.gentler(n, chosen[n]) for n in lonely}})
    return []
