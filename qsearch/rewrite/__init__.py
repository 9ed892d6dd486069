"""Plan + prepared model -> QDQ / FP16 ONNX model. The only package that edits graphs.

QDQ layout follows what ONNX Runtime's optimizer fuses into int8 kernels: every int8 layer has
Q/DQ on its activation inputs and on its (post-Relu) output, int8 weights stored quantized behind a
DequantizeLinear, int32 bias with scale s_x * s_w. A quantized tensor's producer is renamed and
the DequantizeLinear takes the tensor's original name, so consumers and graph outputs need no
rewiring and the model keeps its input/output names and dtypes.

Edits are expressed on an `EditGraph` (`graph.py`: producers, consumers, new nodes, new
initializers) and materialized once, followed by dead-node removal and a topological sort.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qsearch.errors import PlanError, QsearchError
from qsearch.model.load import Layer, PreparedModel
from qsearch.plan.build import quantized_tensors
from qsearch.plan.format import LayerChoice, Plan
from qsearch.plan.recovery import smoothed_layers
from qsearch.plan.widths import activation_widths
from qsearch.qparams import activation_qparams, bias_scale_floor, quantize_weight, requantize_with_floor, stored_codes
from qsearch.recovery.equalization import Pair, bias_delta, bias_slot, equalized_weights, find_pairs, group
from qsearch.recovery.smoothing import Group, find_groups, fold_target, scaled_weight
from qsearch.recovery.techniques import uses, weight_transforms
from qsearch.rewrite.graph import EditGraph
from qsearch.rewrite.opset import at_opset

# Bumped whenever the QDQ layouts the rewriter writes change: a study's trials were scored on the
# models of one layout, so it is part of the study key.
INT8_PATH_KEY = "qsearch.int8_path"  # model metadata: the int8 path its plan was measured on
ENGINE_KEY = "qsearch.engine"  # model metadata: the engine its plan was searched on (absent: ONNX Runtime)
LAYOUT_VERSION = 7  # 4: MatMul/Gemm outputs stay float; 5: float Conv/Gemm read a DQ of their own;
# 6: a weight scale too small for its int32 bias is raised (`qparams.bias_scale_floor`); 7: ... or
# whose bias scale would underflow float32; int16 layers (uint16 Q/DQ, opset 21)


@dataclass(frozen=True)
class WeightQuant:
    """How `apply` quantizes one initializer: a weight (symmetric codes, per channel along `axis` or
    per tensor), or an Add/Mul layer's constant (`constant`: uint8 over its own range and zero)."""

    axis: int = 0
    per_channel: bool = False
    codes: str = "int8"
    constant: bool = False
    floor: tuple[float, ...] = ()  # the smallest scale per channel (or one) its int32 bias allows (`bias_scale_floor`)


@dataclass(frozen=True)
class TrainingGraph:
    """What `Rewriter.training_graph` gives fine-tuning: the marked float graph; the initializers
    training may change (every layer's weight and bias); how the plan quantizes each INT8 one;
    the smoothed weights (initializer -> (layer, factors): the graph holds them times the
    factors); the tensors a smoothing divisor writes (their ranges are the sidecar's)."""

    model: onnx.ModelProto
    trainable: tuple[str, ...]
    quant: Mapping[str, WeightQuant]
    smoothed: Mapping[str, tuple[Layer, np.ndarray]]
    smoothed_tensors: tuple[str, ...] = ()


class Rewriter:
    """Applies plans to one prepared model; caches quantized weights across plans (the search
    rewrites the same model hundreds of times)."""

    def __init__(self, prepared: PreparedModel):
        self.prepared = prepared
        self.inits = {i.name: i for i in prepared.proto.graph.initializer}
        self._quant = lru_cache(maxsize=None)(self._quantize_weight)
        self._weights: dict[str, np.ndarray] = {}  # equalized weights of the plan being applied
        self._pairs: tuple[Pair, ...] | None = None
        self._groups: dict[str, Group] | None = None
        self._wide: onnx.ModelProto | None = None  # the graph at opset 21, for int16 plans

    @property
    def pairs(self) -> tuple[Pair, ...]:
        """The model's equalization pairs, found once (every trial's rewrite needs them)."""
        if self._pairs is None:
            self._pairs = find_pairs(self.prepared)
        return self._pairs

    def _quantize_weight(self, name: str, axis: int, per_channel: bool, scaled: bytes = b"", codes: str = "int8"):
        """`scaled`: the equalization scales this weight was multiplied by (their bytes: the key);
        `codes`: the weight encoding (`engine.isa.WEIGHT_CODES`)."""
        w = self._weights[name] if scaled else numpy_helper.to_array(self.inits[name])
        return quantize_weight(w, axis, per_channel, codes)

    def _float(self, name: str, weights: dict[str, np.ndarray]) -> np.ndarray:
        got = weights.get(name)
        return got if got is not None else numpy_helper.to_array(self.inits[name]).astype(np.float32)

    def __call__(self, plan: Plan) -> onnx.ModelProto:
        return self.apply(plan)

    @property
    def groups(self) -> dict[str, Group]:
        """The model's smoothing groups by input tensor, found once."""
        if self._groups is None:
            self._groups = {g.tensor: g for g in find_groups(self.prepared)}
        return self._groups

    def apply(self, plan: Plan) -> onnx.ModelProto:
        choices = {layer.name: plan.choice(layer.name) for layer in self.prepared.layers}
        wide = any(c.precision == "int16" for c in choices.values())
        g = EditGraph(self.opset21() if wide else self.prepared.proto)
        quantized = [layer for layer in self.prepared.layers if choices[layer.name].quantized]
        smoothed = smoothed_layers(choices)
        tensors, groups = quantized_tensors(self.prepared, {layer.name for layer in quantized}, plan.forms, smoothed)
        missing = [t for t in tensors if t not in plan.ranges]
        if missing:
            raise QsearchError(f"plan has no activation range for tensor '{missing[0]}' (quantized for its int8 "
                               f"layers{f' and {len(missing) - 1} more' if len(missing) > 1 else ''})")
        absorbed = self.prepared.absorbed(plan.forms)
        weights = equalized_weights(self.prepared, plan.sidecar.scales(), self.pairs) if plan.sidecar else {}
        members: dict[str, list[str]] = {}
        ranges = {**{t: plan.ranges[t] for t in tensors}, **self._smooth(g, plan, smoothed, weights, members)}
        widths = activation_widths(self.prepared, choices, list(ranges), groups, plan.forms, smoothed, members)
        act_params = {t: activation_qparams(*r, widths.bits[t]) for t, r in ranges.items()}
        means, codes = plan.sidecar.means(), plan.sidecar.of("round")
        for layer in quantized:
            if layer.name in absorbed:  # inside a fused pattern's gate: swept with it
                continue
            node, bits = g.node(layer.name), choices[layer.name].activation_bits
            x = node.input[0]  # as the layer reads it: its own width, through a conversion at a border
            x_params = activation_qparams(*ranges[x], bits) if x in ranges else None
            delta = self._quantize_layer(g, layer, choices[layer.name], act_params, node, weights,
                                         means.get(layer.name), x_params, codes.get(layer.name))
            if delta is not None:  # a MatMul's bias lives in the Add after it
                add = g.node(layer.bias_add)
                b = next(t for t in add.input if t != layer.output)
                weights[b] = self._float(b, weights) + delta
                g.set_initializer(b, weights[b])
            if layer.fused(plan.forms):
                g.fuse_hardswish(layer)
        for t in sorted(act_params, key=g.order_of):
            dq = g.insert_qdq(t, *act_params[t])
            for bits in sorted({b for _, b in widths.converts.get(t, ())}):
                readers = [g.node(n) for name, b in widths.converts[t] if b == bits
                           for n in self.prepared.layer(name).nodes if dq in g.node(n).input]
                g.convert(dq, readers, *activation_qparams(*ranges[t], bits))
        if plan.target != "cpu":  # float layers read through a Cast: no per-tensor DQ to guard against
            fp16_nodes = {n for layer in self.prepared.layers if choices[layer.name].precision == "fp16"
                          for n in layer.nodes}
            g.convert_fp16(fp16_nodes)
        else:
            g.keep_float_weights()
        model = g.build()
        # `evaluate` compares them with the machine it runs on and the engine it scores with
        props = {key: plan.provenance.get(field) for key, field in ((INT8_PATH_KEY, "int8_path"), (ENGINE_KEY, "engine"))}
        props = {k: v for k, v in props.items() if isinstance(v, str) and v}
        if props:
            onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **props})
        return model

    def opset21(self) -> onnx.ModelProto:
        """The prepared graph at opset 21, whose Q/DQ take uint16 (int16 layers); converted once."""
        if self._wide is None:
            self._wide = at_opset(self.prepared, 21)
        return self._wide

    def _smooth(self, g: EditGraph, plan: Plan, smoothed: set[str], weights: dict[str, np.ndarray],
                members_of: dict[str, list[str]] | None = None) -> dict:
        """Each group the plan smooths: its smoothed members read x / s (one Mul; or the
        LayerNormalization writing x with the divisor in its scale and bias, when nothing else
        reads x) and their weights' rows times s. Returns the smoothed tensors' ranges (and
        fills `members_of`: smoothed tensor -> the layers reading it)."""
        out = {}
        ranges = plan.sidecar.of("smooth_range")
        for tensor, members, s in self._smoothed_weights(plan, smoothed, weights):
            fold = fold_target(self.prepared, self.groups[tensor], set(members))
            if fold is not None:
                for t in (t for t in fold.input[1:3] if t):
                    g.set_initializer(t, (self._float(t, weights).astype(np.float64) / s).astype(np.float32))
                x = tensor
            else:
                x = g.scale_channels(tensor, (1 / s.astype(np.float64)).astype(np.float32))
            for n in members:
                g.replace_input(g.node(self.prepared.layer(n).nodes[0]), tensor, x)
            out[x] = (float(ranges[tensor][0]), float(ranges[tensor][1]))
            if members_of is not None:
                members_of[x] = list(members)
        return out

    def _smoothed_weights(self, plan: Plan, smoothed: set[str], weights: dict[str, np.ndarray]) -> list[tuple]:
        """(tensor, smoothed members, factors) per group the plan smooths; the members' scaled
        weights go into `weights`."""
        out = []
        for tensor, s in plan.sidecar.of("smooth").items():
            members = [n for n in self.groups[tensor].layers if n in smoothed]
            for n in members:
                layer = self.prepared.layer(n)
                weights[layer.weight] = scaled_weight(layer, self._float(layer.weight, weights), s)
            out.append((tensor, members, s))
        return out

    def float_weights(self, plan: Plan) -> dict[str, np.ndarray]:
        """Layer -> the float weight it quantizes under this plan (equalized, smoothed), for each
        INT8 layer with a weight: what learned rounding rounds."""
        choices = {la.name: plan.choice(la.name) for la in self.prepared.layers}
        weights = equalized_weights(self.prepared, plan.sidecar.scales(), self.pairs) if plan.sidecar else {}
        self._smoothed_weights(plan, smoothed_layers(choices), weights)
        return {la.name: self._float(la.weight, weights) for la in self.prepared.layers
                if la.weight and choices[la.name].quantized}

    def training_graph(self, plan: Plan) -> TrainingGraph:
        """The float graph fine-tuning mirrors: the plan's float weights (equalized, smoothed, registered
        weight transforms applied; no bias correction, no learned rounding: training supersedes
        them), a fused hardswish where the plan fuses it, and a `qsearch::FakeQuant` node exactly
        where `apply` writes each activation's Q/DQ, with its range and its shared-scale group."""
        choices = {layer.name: plan.choice(layer.name) for layer in self.prepared.layers}
        g = EditGraph(self.prepared.proto)
        absorbed = self.prepared.absorbed(plan.forms)
        int8 = [la for la in self.prepared.layers if choices[la.name].quantized and la.name not in absorbed]
        smoothed = smoothed_layers(choices)
        tensors, groups = quantized_tensors(self.prepared, {la.name for la in int8}, plan.forms, smoothed)
        missing = [t for t in tensors if t not in plan.ranges]
        if missing:
            raise QsearchError(f"plan has no activation range for tensor '{missing[0]}'")
        ranges = {t: plan.ranges[t] for t in tensors}
        weights = equalized_weights(self.prepared, plan.sidecar.scales(), self.pairs) if plan.sidecar else {}
        smoothing = self._smooth(g, plan, smoothed, weights)
        ranges.update(smoothing)
        quant: dict[str, WeightQuant] = {}
        for la in int8:
            c = choices[la.name]
            if la.weight:
                for transform in weight_transforms(c.recovery):
                    weights[la.weight] = transform(la, self._float(la.weight, weights))
                quant[la.weight] = WeightQuant(la.weight_axis, c.granularity == "per_channel", c.weights,
                                               floor=self._floor(la, weights, ranges, c.granularity == "per_channel"))
            if la.constant is not None:
                quant.setdefault(la.constant, WeightQuant(constant=True))
            if la.fused(plan.forms):
                g.fuse_hardswish(la)
        trainable = tuple(dict.fromkeys(t for la in self.prepared.layers for t in (la.weight, la.bias)
                                        if t and t in self.inits))
        for t in trainable:
            g.set_initializer(t, self._float(t, weights))
        group_of = {t: k + 1 for k, grp in enumerate(groups) for t in grp}
        for t in sorted(ranges, key=g.order_of):
            g.mark(t, "FakeQuant", lo=float(ranges[t][0]), hi=float(ranges[t][1]), group=group_of.get(t, 0))
        factors = {}
        for tensor, s in (plan.sidecar.of("smooth") if plan.sidecar else {}).items():
            for n in (n for n in self.groups[tensor].layers if n in smoothed):
                factors[self.prepared.layer(n).weight] = (self.prepared.layer(n), np.asarray(s))
        return TrainingGraph(g.build(), trainable, quant, factors, tuple(smoothing))

    def _floor(self, la: Layer, weights: dict, ranges: Mapping, per_channel: bool) -> tuple[float, ...]:
        """The weight-scale floor `_quantize_layer` applies for this layer's int32 bias."""
        if la.bias is None or bias_slot(la) == "add" or la.activations[0] not in ranges:
            return ()
        floor = bias_scale_floor(self._float(la.bias, weights), activation_qparams(*ranges[la.activations[0]])[0],
                                 per_channel)
        return tuple(float(v) for v in np.ravel(floor))

    def probe(self, entries: list[tuple[Layer, LayerChoice]], ranges, forms: dict[str, str] | None = None,
              means: dict[str, np.ndarray] | None = None, smoothing: dict | None = None,
              ) -> tuple[onnx.ModelProto, list[tuple[str, str]]]:
        """One model that computes, beside the float graph, a quantized twin of each listed layer
        fed with the *float* inputs: the error of each layer alone, for every layer, in one pass.
        The graph reduces each pair in place to two scalars (sum of squares of the float output,
        of the twin's error), so a 100-layer probe on large feature maps returns a few numbers
        instead of gigabytes. Returns the model and, per entry, (signal, noise) output names.
        `means`: (layer, granularity) -> input means, for entries whose choice corrects the bias
        (of the smoothed input, when smoothed); `smoothing`: (layer, granularity) -> its group's
        `Smoothing` for those weights, for entries that smooth. Equalization is probed on an equalized model's rewriter
        (`recovery.equalized_model`)."""
        g = EditGraph(self.prepared.proto)
        pairs = []
        for k, (layer, choice) in enumerate(entries):
            tag = f"__probe{k}"
            if layer.fused(forms):  # the pattern as it will run: one HardSwish on quantized x
                pairs.append(self._probe_fused(g, layer, ranges, tag))
                continue
            twins = [onnx.NodeProto.FromString(g.node(n).SerializeToString()) for n in layer.nodes]
            inner = {t: g.names.fresh(f"{t}{tag}") for n in twins for t in n.output}
            for n in twins:
                n.name = g.names.fresh(f"{n.name}{tag}")
                for i, t in enumerate(n.input):
                    n.input[i] = inner.get(t, t)
                for i, t in enumerate(n.output):
                    n.output[i] = inner[t]
            act_params = {t: activation_qparams(*ranges[t]) for t in (*layer.activations, layer.output)}
            key = (layer.name, choice.granularity)
            sm = (smoothing or {}).get(key) if uses(choice.recovery, "smooth") else None
            x_params, weights = act_params.get(layer.activations[0]), None
            for t in layer.activations:
                if sm is not None and t == layer.activations[0]:
                    x_params = activation_qparams(sm.lo, sm.hi)
                    x = g.fake_quant(g.scale_channels(t, (1 / sm.scales.astype(np.float64)).astype(np.float32)),
                                     f"{t}{tag}_fq", *x_params)
                    weights = {layer.weight: scaled_weight(layer, self._float(layer.weight, {}), sm.scales)}
                else:
                    x = g.fake_quant(t, f"{t}{tag}_fq", *act_params[t])
                g.replace_input(twins[0], t, x)
            mean = (means or {}).get(key) if uses(choice.recovery, "bias") else None
            delta = self._quantize_layer(g, layer, choice, act_params, twins[0], weights, mean, x_params)
            g.extra.extend(twins)
            out = inner[layer.output]
            if delta is not None:  # the bias Add is not in the twin: the correction joins its output
                out = g.add_channels(out, delta)
            if not layer.float_output:  # the output is quantized as the int8 kernel writes it
                out = g.fake_quant(out, f"{layer.output}{tag}_fq", *act_params[layer.output])
            pairs.append(g.reduce_pair(tag, layer.output, out))
        model = g.build(extra_outputs=[t for pair in pairs for t in pair])
        return model, pairs

    @staticmethod
    def _probe_fused(g: EditGraph, layer: Layer, ranges, tag: str) -> tuple[str, str]:
        x, out = layer.activations[0], layer.quantized_output({layer.pattern: "fused"})
        x_params, out_params = activation_qparams(*ranges[x]), activation_qparams(*ranges[out])
        xq = g.fake_quant(x, f"{x}{tag}_fq", *x_params)
        hs = g.names.fresh(f"{out}{tag}")
        g.extra.append(helper.make_node("HardSwish", [xq], [hs], name=g.names.fresh(f"{layer.name}{tag}")))
        g.min_opset = max(g.min_opset, 14)
        return g.reduce_pair(tag, out, g.fake_quant(hs, f"{out}{tag}_fq", *out_params))

    def _quantize_layer(self, g: EditGraph, layer: Layer, choice: LayerChoice, act_params, node,
                        weights: dict[str, np.ndarray] | None = None, mean: np.ndarray | None = None,
                        x_params: tuple | None = None, codes: np.ndarray | None = None) -> np.ndarray | None:
        """Q/DQ weights and int32 bias for one layer. `weights`: equalized or smoothed float
        weights; `mean`: the layer's input means, for bias correction; `x_params`: its input's
        Q/DQ parameters (default: its first activation's); `codes`: learned int8 weight codes
        (`rounding`) in place of nearest rounding. Returns the correction of a MatMul's bias Add
        (the caller adds it where the bias lives), else None."""
        if layer.constant is not None:  # QLinearAdd/Mul take both inputs as uint8: the constant too
            c = self._float(layer.constant, weights or {})  # a MatMul's corrected bias, if it is one
            scale, zp = activation_qparams(float(min(c.min(initial=0.0), 0.0)), float(max(c.max(initial=0.0), 0.0)))
            q = np.clip(np.round(c / scale) + int(zp), 0, 255).astype(np.uint8)
            cq = g.add_dequantized_init(f"{layer.constant}_{layer.name}_u8", q, np.float32(scale), np.uint8(zp), None)
            g.replace_input(node, layer.constant, cq)
        if layer.weight is None:
            return None
        weights = weights or {}
        for transform in weight_transforms(choice.recovery):  # registered techniques' weight edits
            weights = {**weights, layer.weight: transform(layer, self._float(layer.weight, weights))}
        per_channel = choice.granularity == "per_channel"
        key = b""
        if layer.weight in weights:  # equalized or smoothed: cached by the scaled weight's bytes
            self._weights[layer.weight] = weights[layer.weight]
            key = hashlib.sha256(weights[layer.weight].tobytes()).digest()
        q, w_scale = self._quant(layer.weight, layer.weight_axis, per_channel, key, choice.weights)
        int32_bias = layer.bias is not None and bias_slot(layer) != "add"  # a MatMul's bias Add stays float
        floor = bias_scale_floor(self._float(layer.bias, weights) if int32_bias else None,
                                 (x_params or act_params[layer.activations[0]])[0], per_channel)
        q, w_scale = requantize_with_floor(self._float(layer.weight, weights), q, w_scale, floor, layer.weight_axis,
                                           choice.weights)
        if codes is not None:  # learned rounding: the same scale, other codes
            q = codes.reshape(q.shape).astype(np.int8)
        stored, zp = stored_codes(q, choice.weights)
        suffix = ("pc" if per_channel else "pt") + ("_eq" if key else "") + ("_rounded" if codes is not None else "") \
            + ("" if choice.weights == "int8" else f"_{choice.weights}")
        wq = g.add_dequantized_init(f"{layer.weight}_{suffix}", stored, w_scale, np.full(w_scale.shape, zp),
                                    layer.weight_axis if per_channel else None)
        g.replace_input(node, layer.weight, wq)
        b = None if layer.bias is None else self._float(layer.bias, weights).astype(np.float64)
        if mean is not None:  # bias correction: the weights' mean output error, removed
            w = self._float(layer.weight, weights)
            shape = [1] * w.ndim
            if per_channel:
                shape[layer.weight_axis] = -1
            deq = q.astype(np.float32) * w_scale.reshape(shape)
            delta = bias_delta(layer, w, deq, mean, group(node)).astype(np.float64)
            slot = bias_slot(layer)
            if not slot:
                raise PlanError(f"layer '{layer.name}': its bias cannot be corrected (no place for a bias)")
            if slot == "add":
                return delta.astype(np.float32)
            b = delta if b is None else b + delta
        if b is not None and not np.any(b):  # a zero bias adds nothing: the int8 kernel runs without one
            if layer.bias is not None and len(node.input) > 2 and node.input[2] == layer.bias:
                del node.input[2]
        elif b is not None:
            x_scale = (x_params or act_params[layer.activations[0]])[0]
            b_scale = (w_scale.astype(np.float64) * float(x_scale)).astype(np.float32)
            bq = np.clip(np.round(b / b_scale.astype(np.float64)), -(2**31), 2**31 - 1).astype(np.int32)
            base = f"{layer.bias or layer.weight + '_bias'}_{layer.name}" + ("_corrected" if mean is not None else "")
            axis = 0 if per_channel else None
            # consumers of one bias whose quantized values and scales agree share one constant
            bname = g.add_dequantized_init(base, bq, b_scale, np.zeros(b_scale.shape, np.int32), axis,
                                           key=("bias", layer.bias, bq.tobytes(), b_scale.tobytes(), axis))
            if bias_slot(layer) == "append":  # Conv and Gemm take an optional third input
                node.input.append(bname)
            else:
                g.replace_input(node, layer.bias, bname)
        return None
