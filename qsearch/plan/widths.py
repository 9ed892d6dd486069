"""Where int8 and int16 layers meet: the width of every quantized activation, and the readers
that need a conversion. An int16 layer (NPU targets) reads and writes uint16 codes, an int8 layer
uint8; a tensor takes its writer's width (a quantized layer writing it, or through value-moving
ops that share its scale), else the widest width its readers want, and each reader of the other
width reads it through one more Q/DQ pair, as ONNX Runtime's QNN flow converts. So conversions
appear only at the borders between int8 and int16 regions."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from qsearch.model.load import PreparedModel
from qsearch.plan.build import inputs_of, quantized_tensors
from qsearch.plan.format import LayerChoice, Plan
from qsearch.plan.recovery import smoothed_layers


@dataclass(frozen=True)
class Widths:
    """`bits`: tensor -> 8 or 16, the width its Q/DQ is written in; `converts`: tensor -> (layer,
    bits) for each quantized layer that reads it in the other width."""

    bits: Mapping[str, int] = field(default_factory=dict)
    converts: Mapping[str, tuple[tuple[str, int], ...]] = field(default_factory=dict)

    @property
    def borders(self) -> int:
        """Conversions the model runs: one per (tensor, width) read in a width it is not written in."""
        return sum(len({b for _, b in v}) for v in self.converts.values())


def activation_widths(prepared: PreparedModel, choices: Mapping[str, LayerChoice], tensors: Collection[str],
                      groups: Collection[set[str]], forms: Mapping[str, str] | None = None,
                      smoothed: Collection[str] = (), extra_readers: Mapping[str, Collection[str]] | None = None,
                      ) -> Widths:
    """The widths of `tensors` (the plan's quantized activations; `groups` share a scale, hence a
    width). `extra_readers`: tensors the rewriter adds (a smoothed input) -> the layers reading them."""
    absorbed = prepared.absorbed(forms)
    writer: dict[str, int] = {}
    readers: dict[str, list[tuple[str, int]]] = {}
    for la in prepared.layers:
        bits = choices[la.name].activation_bits if la.name in choices else 0
        if not bits or la.name in absorbed:
            continue
        for t in inputs_of(la, forms, smoothed):
            readers.setdefault(t, []).append((la.name, bits))
        if not la.float_output:
            out = la.quantized_output(forms)
            writer[out] = max(writer.get(out, 0), bits)
    for t, names in (extra_readers or {}).items():
        readers.setdefault(t, []).extend((n, choices[n].activation_bits) for n in names)
    group_of = {t: frozenset(g) for g in groups for t in g}
    bits: dict[str, int] = {}
    converts: dict[str, tuple[tuple[str, int], ...]] = {}
    for t in tensors:
        members = group_of.get(t, frozenset((t,)))
        written = [writer[m] for m in members if m in writer]
        read = [b for m in members for _, b in readers.get(m, ())]
        bits[t] = max(written) if written else max(read, default=8)
        other = tuple((n, b) for n, b in readers.get(t, ()) if b != bits[t])
        if other:
            converts[t] = other
    return Widths(bits, converts)


def plan_widths(prepared: PreparedModel, plan: Plan) -> Widths:
    """The widths of a plan's quantized activations (its smoothed inputs aside: the rewriter adds
    those tensors); empty for a plan without int16 layers (every width 8, nothing to convert)."""
    choices = {la.name: plan.choice(la.name) for la in prepared.layers}
    if not any(c.precision == "int16" for c in choices.values()):
        return Widths()
    smoothed = smoothed_layers(choices)
    tensors, groups = quantized_tensors(prepared, {n for n, c in choices.items() if c.quantized}, plan.forms, smoothed)
    return activation_widths(prepared, choices, tensors, groups, plan.forms, smoothed)
