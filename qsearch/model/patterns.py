"""Patterns found in a graph by their spelling: hardswish however the exporter wrote it, and the
readable module path an exporter left in a node's metadata. Pure functions over ONNX protos."""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper


def _scalar(inits: dict, name: str) -> float | None:
    if name not in inits:
        return None
    a = numpy_helper.to_array(inits[name])
    return float(a.reshape(-1)[0]) if a.size == 1 else None


def hardswish_gates(g: onnx.GraphProto, inits: dict, consumers: dict, graph_outputs: set) -> dict[str, tuple]:
    """Mul nodes computing hardswish, x * relu6(x + 3) / 6, in the spellings exporters write:
    Mul(x, HardSigmoid(x; alpha 1/6, beta 1/2)) (ONNX Runtime inlines HardSwish so);
    Mul(x, Clip(Add(x, 3), 0, 6) / 6) (opset 11 exporters; the /6 also as Mul by 1/6);
    Mul(x, Clip(Add(x, 3), 0, 6)) / 6 (paddle2onnx: the /6 after the product).
    Returns {mul: (gate node names, x, tail node names, output of the whole)}; every tensor
    inside must be read by the pattern alone."""
    producer = {t: n for n in g.node for t in n.output}

    def attr(n, key, default):
        return next((helper.get_attribute_value(a) for a in n.attribute if a.name == key), default)

    def only_read_by(t: str, reader: onnx.NodeProto) -> bool:
        return t not in graph_outputs and [c.name for c in consumers.get(t, [])] == [reader.name]

    def other(n, known: str) -> str | None:
        ins = [t for t in n.input if t]
        return ins[1 - ins.index(known)] if len(ins) == 2 and known in ins and ins[0] != ins[1] else None

    def sixth(n, t: str) -> bool:  # n divides t by 6 (or multiplies it by 1/6)
        k = _scalar(inits, other(n, t) or "")
        return k is not None and n.input[0] == t and (
            (n.op_type == "Div" and abs(k - 6) < 1e-5) or (n.op_type == "Mul" and abs(k - 1 / 6) < 1e-6))

    def relu6_of_x_plus_3(t: str, x: str):  # the Add and Clip nodes of Clip(Add(x, 3), 0, 6)
        clip = producer.get(t)
        if clip is None or clip.op_type != "Clip" or not clip.input[0]:
            return None
        lo = _scalar(inits, clip.input[1]) if len(clip.input) > 1 and clip.input[1] else attr(clip, "min", None)
        hi = _scalar(inits, clip.input[2]) if len(clip.input) > 2 and clip.input[2] else attr(clip, "max", None)
        add = producer.get(clip.input[0])
        if lo != 0.0 or hi is None or abs(hi - 6) > 1e-5 or add is None or add.op_type != "Add":
            return None
        three = _scalar(inits, other(add, x) or "")
        if three is None or abs(three - 3) > 1e-5 or not only_read_by(clip.input[0], clip):
            return None
        return add, clip

    found: dict[str, tuple] = {}
    for mul in g.node:
        if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or len(mul.input) != 2:
            continue
        for x, gt in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
            p = producer.get(gt)
            if p is None or x in inits or x == gt or not only_read_by(gt, mul):
                continue
            if (p.op_type == "HardSigmoid" and p.input[0] == x and abs(attr(p, "alpha", 0.2) - 1 / 6) < 1e-5
                    and abs(attr(p, "beta", 0.5) - 0.5) < 1e-6):
                found[mul.name] = ((p.name,), x, (), mul.output[0])
                break
            if p.op_type in ("Div", "Mul") and sixth(p, p.input[0]) and only_read_by(p.input[0], p):
                inner = relu6_of_x_plus_3(p.input[0], x)
                if inner is not None:
                    found[mul.name] = ((inner[0].name, inner[1].name, p.name), x, (), mul.output[0])
                    break
            inner = relu6_of_x_plus_3(gt, x)
            after = consumers.get(mul.output[0], [])
            if inner is not None and len(after) == 1 and after[0].op_type in ("Div", "Mul") and \
                    sixth(after[0], mul.output[0]) and only_read_by(mul.output[0], after[0]):
                found[mul.name] = ((inner[0].name, inner[1].name), x, (after[0].name,), after[0].output[0])
                break
    return found


def readable_name(node: onnx.NodeProto) -> str:
    """The source module a node came from, from the exporter's node metadata: torch's dynamo
    exporter records the module path ('blocks.0.conv'); an op inside a module's forward gets the op
    too ('blocks.0/add_15'). Empty when the model carries no such metadata, or metadata the exporter
    did not write (names are best effort: the caller falls back to op + index)."""
    import ast

    meta = {p.key: p.value for p in node.metadata_props}
    try:
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]")[:100_000])
        classes = ast.literal_eval(meta.get("pkg.torch.onnx.class_hierarchy", "[]")[:100_000])
    except Exception:  # (ValueError, SyntaxError, RecursionError, MemoryError...: whatever a hostile string gives)
        return ""
    if not isinstance(scopes, list) or not scopes or not all(isinstance(x, str) for x in scopes):
        return ""
    modules = [x for x in scopes[:-1] if x]
    if not modules:
        return scopes[-1]
    leaf = isinstance(classes, list) and len(classes) >= 2 and str(classes[-2]).startswith("torch.nn.modules.")
    return modules[-1] if leaf else f"{modules[-1]}/{scopes[-1]}"
