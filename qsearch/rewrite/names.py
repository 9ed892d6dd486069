"""Every name a rewrite creates comes from `Names`: unique in the whole graph (subgraphs included)
and deterministic, so a user's tensor called `x_scale` is never mistaken for a generated one."""

from __future__ import annotations

import onnx


class Names:
    """Every name a graph uses (nodes, tensors, initializers, inputs, outputs, value infos, in its
    subgraphs too). Every name a rewrite creates comes from here, so a user's tensor that happens
    to be called `x_scale` is never mistaken for (or replaced by) a generated one. Deterministic:
    the same graph and the same sequence of requests give the same names."""

    def __init__(self, graph: onnx.GraphProto):
        self.used: set[str] = set()
        self._collect(graph)
        self._memo: dict[tuple, str] = {}

    def _collect(self, graph: onnx.GraphProto) -> None:
        for vi in (*graph.input, *graph.output, *graph.value_info):
            self.used.add(vi.name)
        self.used.update(i.name for i in graph.initializer)
        for n in graph.node:
            self.used.update((n.name, *n.input, *n.output))
            for a in n.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                            a.graphs if a.type == onnx.AttributeProto.GRAPHS else []):
                    self._collect(sub)

    def fresh(self, base: str) -> str:
        """`base`, or `base_1`, `base_2`... whichever is free first; taken from then on."""
        name, k = base, 0
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name

    def of(self, key: tuple, base: str) -> str:
        """The same name for the same `key` (a weight's scale read by several layers)."""
        if key not in self._memo:
            self._memo[key] = self.fresh(base)
        return self._memo[key]
