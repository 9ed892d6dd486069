"""The prepared graph at a newer opset, for layouts that need one (uint16 Q/DQ: opset 21). Node and
tensor names must survive the conversion: plans name layers and ranges by them."""

from __future__ import annotations

import onnx
from onnx import version_converter

from qsearch.errors import QsearchError
from qsearch.model.load import PreparedModel


def at_opset(prepared: PreparedModel, version: int) -> onnx.ModelProto:
    """The prepared graph converted to default-domain opset `version` (itself when already there)."""
    proto = prepared.proto
    have = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if have >= version:
        return proto
    try:
        out = version_converter.convert_version(proto, version)
    except Exception as exc:  # the converter raises bare RuntimeErrors on ops it cannot adapt
        raise QsearchError(f"model '{prepared.name}': int16 layers need opset {version} (uint16 Q/DQ), and "
                           f"converting opset {have} failed: {str(exc).splitlines()[0][:200]}") from None
    names = {n.name for n in out.graph.node}
    lost = next((n for la in prepared.layers for n in la.nodes if n not in names), None)
    if lost is not None:
        raise QsearchError(f"model '{prepared.name}': converting it to opset {version} (for int16 layers) "
                           f"renamed node '{lost}'")
    return out
