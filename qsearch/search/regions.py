"""Regions, not islands: every tensor between an INT8 and a float candidate layer costs a Q/DQ that
ONNX Runtime cannot fuse. Given a `problem.Problem` (its edges and measured border cost), these
pure functions find connected INT8 or float regions and the flips the border-aware cost model
predicts faster."""

from __future__ import annotations

from qsearch.search.problem import Problem


def _neighbours(problem: Problem) -> dict[str, set[str]]:
    adj: dict[str, set[str]] = {x.name: set() for x in problem.layers}
    for a, b in problem.edges:
        adj.setdefault(a, set()).add(b)
        adj.setdefault(b, set()).add(a)
    return adj


def _regions(adj: dict[str, set[str]], members: set[str], order: list[str]) -> list[set[str]]:
    """Connected groups of `members` (graph order of their first layer)."""
    seen: set[str] = set()
    out = []
    for n in order:
        if n not in members or n in seen:
            continue
        region, todo = set(), [n]
        while todo:
            m = todo.pop()
            if m in region:
                continue
            region.add(m)
            todo.extend(k for k in adj.get(m, ()) if k in members and k not in region)
        seen |= region
        out.append(region)
    return out


def drop_int8_regions(problem: Problem, chosen: set[str], base: set[str]) -> set[str]:
    """INT8 layers, and connected INT8 regions, whose borders cost more than they save go float
    (fewer INT8 layers: no new risk to the budget), best predicted gain first, until none pays."""
    if problem.border_cost <= 0:
        return chosen
    adj, order = _neighbours(problem), [x.name for x in problem.layers]
    chosen = set(chosen)
    for _ in range(min(len(chosen), 50)):
        now = problem.saving(chosen | base)
        moves = [{n} for n in chosen] + _regions(adj, chosen, order)
        gains = [(problem.saving((chosen - m) | base) - now, i) for i, m in enumerate(moves)]
        gain, i = max(gains, default=(0.0, -1))
        if gain <= 1e-12:
            break
        chosen -= moves[i]
    return chosen


def float_regions(problem: Problem, int8: set[str], free: list[str]) -> list[set[str]]:
    """Float layers and connected float regions whose going INT8 the border-aware cost model
    predicts faster (their Q/DQ pairs cost more than INT8 loses), most predicted gain first."""
    if problem.border_cost <= 0:
        return []
    adj, now = _neighbours(problem), problem.saving(int8)
    floats = {n for n in free if n not in int8}
    moves = [{n} for n in floats] + [r for r in _regions(adj, floats, free) if len(r) > 1]
    gains = [(problem.saving(int8 | m) - now, i) for i, m in enumerate(moves)]
    return [moves[i] for g, i in sorted(gains, key=lambda t: -t[0]) if g > 1e-12]
