"""Learned weight rounding (AdaRound): each weight rounds up or down as the layer's output needs,
not to the nearest level.

Rounding every weight to its nearest level minimizes the weight error, not the output error:
errors of neighbouring weights that meet the same inputs add up. AdaRound (Nagel et al., 2020)
learns, per weight, whether to round down or up: codes floor(w / s) + h(v), h a rectified sigmoid
pushed to 0 or 1 by an annealed regularizer, minimizing ||X (W_q - W)^T||^2 on the layer's inputs.
The loss is quadratic in W_q, so the inputs enter only through their second moment G = X^T X / n
(per Conv group): the optimization costs O(out * in^2) per step whatever the sample size, in
numpy (no torch needed).

The codes are plan-specific (they depend on the layer's scale, hence its granularity and any
equalization or smoothing, and on the inputs the plan's quantized model feeds it), so they are
learned for a chosen plan, for its most sensitive INT8 layers within a time cap, and stored in the
plan's sidecar as `round/<layer>`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from qsearch.calibration import quantize_weight
from qsearch.model import Layer

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound's values)
STEPS = 400  # Adam steps per layer
ROWS = 4096  # input rows sampled per layer (patches for a Conv)


@dataclass(frozen=True)
class Rounded:
    """One layer's learned codes (the weight's shape, int8 values) and what they bought."""

    codes: np.ndarray
    nearest_error: float  # ||X (W_q - W)^T||^2 / n, rounding to nearest
    learned_error: float  # the same with the learned codes


def _h(v: np.ndarray) -> np.ndarray:
    return np.clip(1 / (1 + np.exp(-v)) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _moment(x: np.ndarray) -> np.ndarray:
    """G = X^T X / n per group: x (rows, groups, in_g) -> (groups, in_g, in_g), float64."""
    x = x.astype(np.float64)
    return np.einsum("rgi,rgj->gij", x, x) / max(x.shape[0], 1)


def learn(w: np.ndarray, scale: np.ndarray, g: np.ndarray, steps: int = STEPS, lam: float = 0.01,
          lr: float = 0.05) -> tuple[np.ndarray, float, float]:
    """Codes for w (groups, out_g, in_g) with per-row scale (groups, out_g, 1) minimizing
    tr(D G D^T), D = s * codes - w: Adam on v, the regularizer annealed from beta 20 to 2 over
    the last 80% of the steps. Returns (codes, nearest error, learned error)."""
    w64, s = w.astype(np.float64), scale.astype(np.float64)
    base = np.floor(w64 / s)
    rest = w64 / s - base
    v = -np.log((ZETA - GAMMA) / (np.clip(rest, 1e-4, 1 - 1e-4) - GAMMA) - 1)  # h(v) = rest at the start
    m, u = np.zeros_like(v), np.zeros_like(v)
    lo, hi = -127 - base, 127 - base  # codes stay in [-127, 127]
    norm = float(np.einsum("gij,gjk,gik->", w64, g, w64)) or 1.0

    def err(codes: np.ndarray) -> float:
        d = s * codes - w64
        return float(np.einsum("gij,gjk,gik->", d, g, d))

    for t in range(1, steps + 1):
        hv = _h(v)
        d = s * (base + np.clip(hv, lo, hi)) - w64
        grad_h = 2 * np.einsum("gij,gjk->gik", d, g) * s / norm
        warm = t < 0.2 * steps
        if not warm:
            beta = 20 + (2 - 20) * (t - 0.2 * steps) / (0.8 * steps)
            y = 2 * hv - 1
            grad_h += lam * -beta * np.abs(y) ** (beta - 1) * np.sign(y) * 2 / hv.size
        sig = 1 / (1 + np.exp(-v))
        inside = (hv > 0) & (hv < 1)
        grad = grad_h * sig * (1 - sig) * (ZETA - GAMMA) * inside
        m = 0.9 * m + 0.1 * grad
        u = 0.999 * u + 0.001 * grad**2
        v -= lr * (m / (1 - 0.9**t)) / (np.sqrt(u / (1 - 0.999**t)) + 1e-8)
    learned = np.clip(base + (_h(v) >= 0.5), -127, 127)
    nearest = np.clip(np.round(w64 / s), -127, 127)
    e_near, e_learn = err(nearest), err(learned)
    return (learned if e_learn < e_near else nearest), e_near, min(e_learn, e_near)


def conv_rows(x: np.ndarray, kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int],
              dilations: Sequence[int], rows: int, rng: np.random.Generator) -> np.ndarray:
    """Up to `rows` random input patches of a 2-D Conv: (rows, cin, kh * kw)."""
    n, cin, hgt, wid = x.shape
    kh, kw = kernel
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    oh = (hgt + pads[0] + pads[2] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (wid + pads[1] + pads[3] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    k = min(rows, n * oh * ow)
    pick = rng.choice(n * oh * ow, size=k, replace=False)
    ni, rem = np.divmod(pick, oh * ow)
    yi, xi = np.divmod(rem, ow)
    out = np.empty((k, cin, kh * kw), np.float32)
    for i in range(kh):
        for j in range(kw):
            out[:, :, i * kw + j] = xp[ni, :, yi * strides[0] + i * dilations[0], xi * strides[1] + j * dilations[1]]
    return out


def layer_problem(layer: Layer, w: np.ndarray, per_channel: bool, x_rows: np.ndarray, groups: int = 1):
    """(w, scale, G) in the (groups, out_g, in_g) form `learn` takes, and how to fold codes back.
    `x_rows`: Conv (rows, cin, kh*kw) patches; Gemm/MatMul (rows, in)."""
    _, scale = quantize_weight(w, layer.weight_axis, per_channel)
    if layer.op_type == "Conv":
        cout = w.shape[0]
        wg = w.reshape(groups, cout // groups, -1)
        sg = (scale if per_channel else np.full(cout, float(scale))).reshape(groups, cout // groups, 1)
        xg = x_rows.reshape(x_rows.shape[0], groups, -1)
        return wg, sg, _moment(xg), lambda c: c.reshape(w.shape)
    wt = w.T if layer.weight_axis == 1 else w  # (out, in)
    sc = (scale if per_channel else np.full(wt.shape[0], float(scale))).reshape(1, -1, 1)
    back = (lambda c: c[0].T) if layer.weight_axis == 1 else (lambda c: c[0])
    return wt[None], sc, _moment(x_rows[:, None, :]), back


def round_layers(problems: Mapping[str, tuple], cap_s: float, steps: int = STEPS) -> dict[str, Rounded]:
    """Learned codes for each layer (in the given order, most sensitive first) until `cap_s`
    seconds have gone; the layers left over keep nearest rounding."""
    out: dict[str, Rounded] = {}
    start = time.perf_counter()
    for name, (w, s, g, back) in problems.items():
        if time.perf_counter() - start > cap_s:
            break
        codes, near, learned = learn(w, s, g, steps)
        out[name] = Rounded(back(codes).astype(np.int8), near, learned)
    return out


# ---------------------------------------------------------------------- for a plan
CAP_S = 60.0  # seconds of learned rounding per plan (the layers left over keep nearest rounding)
SAMPLES = 64  # calibration samples whose inputs each layer is fitted on


def roundable(prepared, layers: Sequence[Layer]) -> list[Layer]:
    """Layers learned rounding applies to: a weight of their own (2-D Conv, Gemm, MatMul)."""
    reads: dict[str, int] = {}
    for n in prepared.proto.graph.node:
        for t in n.input:
            reads[t] = reads.get(t, 0) + 1
    dims = {i.name: len(i.dims) for i in prepared.proto.graph.initializer}
    return [la for la in layers if la.weight and reads.get(la.weight) == 1
            and (dims[la.weight] == 4 if la.op_type == "Conv" else dims[la.weight] == 2)]


def layer_inputs(bench, model, layers: Sequence[Layer], rows: int = ROWS, seed: int = 0) -> dict[str, np.ndarray]:
    """Each layer's input rows as `model` (a plan's QDQ model) feeds its compute node, on the
    first SAMPLES calibration samples: Conv patches (rows, cin, kh*kw), else (rows, in)."""
    from onnx import helper

    from qsearch.calibration import observing
    from qsearch.runtime import make_session

    rng = np.random.default_rng(seed)
    nodes = {n.name: n for n in model.graph.node}
    src = {la.name: nodes[la.nodes[0]].input[0] for la in layers}
    names = sorted(set(src.values()))
    sess = make_session(observing(model, names), bench.workload.threads)
    got: dict[str, list[np.ndarray]] = {n: [] for n in names}
    seen = 0
    for batch in bench.calib_data.batches:
        take = min(SAMPLES - seen, len(next(iter(batch.values()))))
        for n, arr in zip(names, sess.run(names, {k: v[:take] for k, v in batch.items()})):
            got[n].append(arr.astype(np.float32))
        seen += take
        if seen >= SAMPLES:
            break
    dims = {i.name: tuple(i.dims) for i in bench.prepared.proto.graph.initializer}
    out = {}
    for la in layers:
        x = np.concatenate(got[src[la.name]])
        if la.op_type == "Conv":
            a = {at.name: helper.get_attribute_value(at) for at in nodes[la.nodes[0]].attribute}
            out[la.name] = conv_rows(x, dims[la.weight][2:], a.get("strides", [1, 1]), a.get("pads", [0, 0, 0, 0]),
                                     a.get("dilations", [1, 1]), rows, rng)
        else:
            flat = x.reshape(-1, x.shape[-1])
            out[la.name] = flat[rng.choice(flat.shape[0], size=min(rows, flat.shape[0]), replace=False)]
    return out


def learn_for_plan(bench, plan, layer_names: Sequence[str], cap_s: float = CAP_S):
    """The plan with learned rounding for these INT8 layers (most sensitive first), as many as
    `cap_s` allows: codes in its sidecar, `+round` in their recovery, what it bought in the notes."""
    from qsearch.recovery import group

    layers = roundable(bench.prepared, [bench.prepared.layer(n) for n in layer_names if plan.choice(n).is_int8])
    if not layers:
        return plan, {}
    start = time.perf_counter()
    inputs = layer_inputs(bench, bench.rewriter(plan), layers)
    weights = bench.rewriter.float_weights(plan)
    nodes = {n.name: n for n in bench.prepared.proto.graph.node}
    problems = {la.name: layer_problem(la, weights[la.name], plan.choice(la.name).granularity == "per_channel",
                                       inputs[la.name], group(nodes[la.nodes[0]]) if la.op_type == "Conv" else 1)
                for la in layers}
    rounded = round_layers(problems, cap_s - (time.perf_counter() - start))
    return with_rounding(plan, rounded), rounded


def with_rounding(plan, rounded: Mapping[str, Rounded]):
    """The plan with these layers' learned codes (sidecar `round/<layer>`) and `round` in their
    recovery; each layer's note says how much of its output error the codes removed."""
    from dataclasses import replace

    from qsearch.recovery import Sidecar

    layers, notes = dict(plan.layers), dict(plan.notes)
    arrays = dict(plan.sidecar.arrays)
    for name, r in rounded.items():
        c = layers[name]
        layers[name] = replace(c, recovery="round" if c.recovery == "none" else f"{c.recovery}+round")
        arrays[f"round/{name}"] = r.codes.ravel().astype(np.float32)
        gain = 1 - r.learned_error / r.nearest_error if r.nearest_error > 0 else 0.0
        text = f"learned rounding: {gain:.0%} less output error than nearest rounding on the calibration inputs"
        if name in notes:
            old = notes[name].recovery
            notes[name] = replace(notes[name], recovery=f"{old}; {text}" if old else text)
    return replace(plan, layers=layers, notes=notes, sidecar=Sidecar(arrays))
