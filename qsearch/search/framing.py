"""The analysis as a search strategy sees it: a `problem.Problem` built from the workbench and
the sensitivity profile. Each candidate layer's INT8 options (best first), what INT8 saves in the
objective's units, its output noise, the tensors that join candidate layers (directly or through
value-moving ops), and the measured cost of one float/INT8 border.
"""

from __future__ import annotations

from qsearch.analysis.sensitivity import LayerSensitivity, SensitivityProfile
from qsearch.errors import QsearchError
from qsearch.evaluator import BITS
from qsearch.search.problem import LayerFacts, Problem
from qsearch.workbench import Workbench


def benefit(objective: str, s: LayerSensitivity, float_precision: str = "fp32") -> float:
    """What a layer saves in INT8, in the objective's units (measured ms for latency; for size and
    bit-operations against its float precision's, FP16 on FP16 and NPU targets: `evaluator.BITS`)."""
    if objective == "latency":
        return s.gain_ms
    (w_float, a_float), (w_int8, a_int8) = BITS[float_precision], BITS["int8"]
    if objective == "size":
        return (w_float - w_int8) / 32 * s.weight_bytes  # weight_bytes: FP32 bytes
    return s.macs * (w_float * a_float - w_int8 * a_int8) / 1e9


def problem_for(bench: Workbench, profile: SensitivityProfile) -> Problem:
    """The analysis, as a strategy sees it: candidates in graph order with options, saving, noise,
    the tensors that join them and, for latency, the measured cost of one float/INT8 border."""
    rank = {x.name: i for i, x in enumerate(profile.layers)}
    objective = bench.workload.space.objective
    facts = []
    for la in bench.candidates():
        if la.name not in rank:
            raise QsearchError(f"sensitivity profile has no entry for layer '{la.name}' (re-run analyze)")
        s = profile.layers[rank[la.name]]
        facts.append(LayerFacts(la.name, tuple(s.ranked_options()), benefit(objective, s, bench.float_precision), s.noise,
                                rank[la.name]))
    edges, outer = graph_edges(bench)
    glue = profile.meta.get("int8_by_kind", {}).get("Q/DQ glue", 0.0)
    # all-INT8 leaves Q/DQ standing only where candidates meet other ops: its glue time per such
    # border is what each new border between candidates costs
    border = glue / outer if objective == "latency" and outer else 0.0
    return Problem(tuple(facts), bench.float_precision, bench.allowed_drop(), bench.workload.space, edges, border)


def graph_edges(bench: Workbench) -> tuple[tuple[tuple[str, str], ...], int]:
    """(producer, consumer) pairs of candidate layers joined by a tensor, directly or through
    value-moving ops (Reshape, Transpose, MaxPool...: they run on whatever precision they are
    given), and the number of tensors where a candidate meets another op (the borders all-INT8
    still has)."""
    from qsearch.model.load import PASSTHROUGH_OPS

    forms, cands = bench.forms, bench.candidates()
    owned = {n for la in cands for n in (*la.nodes, *la.gate, *la.tail)}
    readers: dict[str, list] = {}
    for node in bench.prepared.proto.graph.node:
        for t in node.input:
            readers.setdefault(t, []).append(node)
    consumers: dict[str, set[str]] = {}
    for la in cands:
        for t in la.quantized_inputs(forms):
            consumers.setdefault(t, set()).add(la.name)
    edges, outer, reached = set(), 0, set()
    for la in cands:
        todo, seen = [la.quantized_output(forms)], set()
        while todo:
            t = todo.pop()
            seen.add(t)
            for node in readers.get(t, []):
                if node.name in owned:
                    continue
                if node.op_type in PASSTHROUGH_OPS:
                    todo.extend(o for o in node.output[:1] if o not in seen)
                else:
                    outer += 1
        edges |= {(la.name, c) for t in seen for c in consumers.get(t, ()) if c != la.name}
        reached |= seen
    outer += sum(len(c) for t, c in consumers.items() if t not in reached)  # inputs from other ops
    return tuple(sorted(edges)), outer
