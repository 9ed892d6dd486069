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
from typing import Any, Protocol

import numpy as np

from qsearch.model.load import Layer, PreparedModel
from qsearch.plan.format import Plan
from qsearch.qparams import quantize_weight

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound's values)
STEPS = 120  # Adam steps per layer (full batch on the moments, lr 0.5: as good as 400 steps at 0.1)
ROWS = 4096  # input rows sampled per layer (patches for a Conv)


@dataclass(frozen=True)
class Rounded:
    """One layer's learned codes (the weight's shape, int8 values) and what they bought."""

    codes: np.ndarray
    nearest_error: float  # ||X (W_q - W)^T||^2 / n, rounding to nearest
    learned_error: float  # the same with the learned codes


def _h(v: np.ndarray) -> np.ndarray:
    return np.clip(1 / (1 + np.exp(-v)) * (ZETA - GAMMA) + GAMMA, 0, 1)


@dataclass(frozen=True)
class Moments:
    """Second moments of a layer's inputs per group: g = X~^T X~ / n of what the quantized model
    feeds it, k = X~^T (X - X~) / n and e = (X - X~)^T (X - X~) / n against the float model's X
    (zero when only X~ is known). The output error ||X W^T - X~ W_q^T||^2 / n of codes W_q is then
    tr(W e W^T) - 2 tr(D k W^T) + tr(D g D^T), D = W_q - W: the codes also absorb what the
    layers before got wrong (AdaRound's asymmetric reconstruction)."""

    g: np.ndarray
    k: np.ndarray
    e: np.ndarray

    @classmethod
    def of(cls, xq: np.ndarray, xf: np.ndarray | None = None, centered: bool = False) -> Moments:
        """From rows (rows, groups, in_g) of the quantized and (optionally) float inputs;
        `centered`: about their means, when bias correction removes the mean error anyway."""
        q = xq.astype(np.float64)
        if centered:
            q = q - q.mean(axis=0)
            xf = None if xf is None else xf - xf.mean(axis=0)
        n = max(q.shape[0], 1)
        qt = q.transpose(1, 2, 0)  # (groups, in_g, rows)
        g = qt @ q.transpose(1, 0, 2) / n
        if xf is None:
            return cls(g, np.zeros_like(g), np.zeros_like(g))
        d = (xf.astype(np.float64) - q).transpose(1, 0, 2)
        return cls(g, qt @ d / n, d.transpose(0, 2, 1) @ d / n)

    def error(self, w: np.ndarray, d: np.ndarray) -> float:
        return float(np.sum((w @ self.e) * w) - 2 * np.sum((d @ self.k) * w) + np.sum((d @ self.g) * d))

    def gradient(self, w: np.ndarray, d: np.ndarray, wk: np.ndarray | None = None) -> np.ndarray:
        """d error / d D (batched matmuls: BLAS, not einsum's loops); `wk`: W k^T, if known."""
        return 2 * (d @ self.g - (w @ self.k.transpose(0, 2, 1) if wk is None else wk))


def learn(w: np.ndarray, scale: np.ndarray, mom: Moments, steps: int = STEPS, lam: float = 0.01,
          lr: float = 0.5, qmax: int = 127) -> tuple[np.ndarray, float, float]:
    """Codes for w (groups, out_g, in_g) with per-row scale (groups, out_g, 1) minimizing the
    output error (`Moments.error`): Adam on v, the regularizer annealed from beta 20 to 2 over
    the last 80% of the steps. Returns (codes, nearest's error, the codes' error); nearest
    rounding where the learned codes do not beat it. `qmax`: codes stay in [-qmax, qmax] (63 for
    7-bit weights)."""
    w64, s = w.astype(np.float64), scale.astype(np.float64)
    base = np.floor(w64 / s)
    rest = w64 / s - base
    v = -np.log((ZETA - GAMMA) / (np.clip(rest, 1e-4, 1 - 1e-4) - GAMMA) - 1)  # h(v) = rest at the start
    m, u = np.zeros_like(v), np.zeros_like(v)
    lo, hi = -qmax - base, qmax - base  # codes stay in [-qmax, qmax]
    norm = float(np.sum((w64 @ mom.g) * w64)) or 1.0
    # the steps run in float32 (half the time; the result is compared in float64 below)
    w32, s32, base32, g32 = (a.astype(np.float32) for a in (w64, s, base, mom.g))
    wk32 = (w64 @ mom.k.transpose(0, 2, 1)).astype(np.float32)  # constant: computed once
    for t in range(1, steps + 1):
        hv = _h(v)
        d = s32 * (base32 + np.clip(hv, lo, hi).astype(np.float32)) - w32
        grad_h = 2 * (d @ g32 - wk32).astype(np.float64) * s / norm
        if t >= 0.2 * steps:  # after a warm-up, push every h to 0 or 1
            beta = 20 + (2 - 20) * (t - 0.2 * steps) / (0.8 * steps)
            y = 2 * hv - 1
            grad_h += lam * -beta * np.abs(y) ** (beta - 1) * np.sign(y) * 2 / hv.size
        sig = 1 / (1 + np.exp(-v))
        grad = grad_h * sig * (1 - sig) * (ZETA - GAMMA) * ((hv > 0) & (hv < 1))
        m = 0.9 * m + 0.1 * grad
        u = 0.999 * u + 0.001 * grad**2
        v -= lr * (m / (1 - 0.9**t)) / (np.sqrt(u / (1 - 0.999**t)) + 1e-8)
    learned = np.clip(base + (_h(v) >= 0.5), -qmax, qmax)
    nearest = np.clip(np.round(w64 / s), -qmax, qmax)
    e_near, e_learn = mom.error(w64, s * nearest - w64), mom.error(w64, s * learned - w64)
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


def layer_problem(layer: Layer, w: np.ndarray, per_channel: bool, x_rows: np.ndarray, groups: int = 1,
                  float_rows: np.ndarray | None = None, centered: bool = False, codes: str = "int8"):
    """(w, scale, Moments) in the (groups, out_g, in_g) form `learn` takes, and how to fold codes
    back. `x_rows`: the quantized model's inputs, Conv (rows, cin, kh*kw) patches, Gemm/MatMul
    (rows, in); `float_rows`: the float model's at the same places, if known; `centered`: the
    layer's bias is corrected (`Moments.of`)."""
    _, scale = quantize_weight(w, layer.weight_axis, per_channel, codes)  # int7 codes: the int7 scale
    if layer.op_type == "Conv":
        cout = w.shape[0]
        wg = w.reshape(groups, cout // groups, -1)
        sg = (scale if per_channel else np.full(cout, float(scale))).reshape(groups, cout // groups, 1)
        def grouped(x):
            return None if x is None else x.reshape(x.shape[0], groups, -1)
        return wg, sg, Moments.of(grouped(x_rows), grouped(float_rows), centered), lambda c: c.reshape(w.shape)
    wt = w.T if layer.weight_axis == 1 else w  # (out, in)
    sc = (scale if per_channel else np.full(wt.shape[0], float(scale))).reshape(1, -1, 1)
    back = (lambda c: c[0].T) if layer.weight_axis == 1 else (lambda c: c[0])
    flat = None if float_rows is None else float_rows[:, None, :]
    return wt[None], sc, Moments.of(x_rows[:, None, :], flat, centered), back


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


def _run(bench, model, names: list[str]) -> dict[str, np.ndarray]:
    """These tensors of `model` on the first SAMPLES calibration samples."""
    from qsearch.calibration import observing
    from qsearch.engine.onnxruntime import make_session

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
    return {n: np.concatenate(v) for n, v in got.items()}


def _float_inputs(bench, plan, layers: Sequence[Layer]) -> dict[str, np.ndarray]:
    """Each layer's input in the float model, as the plan's float weights expect it: divided by
    its equalization scales (a tail of an equalized pair) or smoothing factors."""
    from qsearch.recovery.techniques import uses

    got = _run(bench, bench.prepared.proto, sorted({la.activations[0] for la in layers}))
    pairs = {p.head: p for p in bench.rewriter.pairs}
    per_tensor = {t: s for head, s in plan.sidecar.scales().items() for t in pairs[head].tensors}
    smooth = plan.sidecar.of("smooth")
    out = {}
    for la in layers:
        x = got[la.activations[0]]
        if la.activations[0] in per_tensor:
            x = x / per_tensor[la.activations[0]].reshape(1, -1, *[1] * (x.ndim - 2))
        if uses(plan.choice(la.name).recovery, "smooth") and la.activations[0] in smooth:
            x = x / smooth[la.activations[0]]
        out[la.name] = x
    return out


def _rows(bench, layer: Layer, node, x: np.ndarray, seed: int, rows: int = ROWS) -> np.ndarray:
    """`rows` input rows of a layer at places fixed by `seed`: Conv patches (rows, cin, kh*kw),
    else (rows, in)."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    if layer.op_type == "Conv":
        a = {at.name: helper.get_attribute_value(at) for at in node.attribute}
        dims = next(tuple(i.dims) for i in bench.prepared.proto.graph.initializer if i.name == layer.weight)
        return conv_rows(x, dims[2:], a.get("strides", [1, 1]), a.get("pads", [0, 0, 0, 0]), a.get("dilations", [1, 1]),
                         rows, rng)
    flat = x.reshape(-1, x.shape[-1])
    return flat[rng.choice(flat.shape[0], size=min(rows, flat.shape[0]), replace=False)]


FLOPS = 2e10  # a cautious one-core BLAS rate: what choosing the layers that fit the cap assumes
OVERHEAD_S = 0.5  # per layer: the plan's rewrite and one pass of the quantized model


def _within(bench, names: Sequence[str], cap_s: float) -> list[Layer]:
    """The roundable layers among `names` (most important first) whose estimated cost fits the
    cap, in graph order (each is fitted on what the ones before it feed it)."""
    dims = {i.name: tuple(i.dims) for i in bench.prepared.proto.graph.initializer}
    chosen, total = set(), 0.0
    for la in roundable(bench.prepared, [bench.prepared.layer(n) for n in names]):
        d = dims[la.weight]
        # a step costs out x in_g^2 multiply-adds (per group: out_g x in_g^2)
        out, inner = (d[0], int(np.prod(d[1:]))) if la.op_type == "Conv" else (d[la.weight_axis], d[1 - la.weight_axis])
        cost = OVERHEAD_S + 2 * STEPS * out * inner * inner / FLOPS
        if total + cost <= cap_s:
            chosen.add(la.name)
            total += cost
    return [la for la in bench.prepared.layers if la.name in chosen]


class RoundingBench(Protocol):
    """What learned rounding reads of the workbench (a protocol: rounding needs no workbench import,
    so the workbench, which calls it for naive plans, and rounding stay acyclic)."""

    prepared: PreparedModel
    rewriter: Any  # `rewrite.Rewriter`: plan -> model, `.pairs`, `.float_weights(plan)`
    calib_data: Any  # `data.Dataset`: `.batches`
    workload: Any  # `config.Workload`: `.threads`


def learn_for_plan(bench: RoundingBench, plan: Plan, layer_names: Sequence[str], cap_s: float = CAP_S):
    """The plan with learned rounding for these INT8 layers (most important first: those whose
    estimated cost fits `cap_s`; fitted in graph order, stopping at the cap): codes in its sidecar,
    `+round` in their recovery, what it bought in the notes. Each
    layer is fitted on the inputs the plan feeds it *with the codes learned before it* (the
    layers before it round differently now, and its codes correct what they still get wrong)."""
    from qsearch.recovery.equalization import group
    from qsearch.recovery.techniques import uses

    layers = _within(bench, [n for n in layer_names if plan.choice(n).quantized], cap_s)
    start = time.perf_counter()
    floats = _float_inputs(bench, plan, layers) if layers else {}
    weights = bench.rewriter.float_weights(plan)
    nodes = {n.name: n for n in bench.prepared.proto.graph.node}
    rounded: dict[str, Rounded] = {}
    for k, la in enumerate(layers):
        if time.perf_counter() - start > cap_s:
            break
        model = bench.rewriter(plan)
        src = next(n for n in model.graph.node if n.name == la.nodes[0]).input[0]
        node = nodes[la.nodes[0]]
        xq = _rows(bench, la, node, _run(bench, model, [src])[src], k)
        w, sc, mom, back = layer_problem(la, weights[la.name], plan.choice(la.name).granularity == "per_channel",
                                         xq, group(node) if la.op_type == "Conv" else 1,
                                         _rows(bench, la, node, floats[la.name], k),
                                         uses(plan.choice(la.name).recovery, "bias"), plan.choice(la.name).weights)
        codes, near, learned = learn(w, sc, mom, qmax=63 if plan.choice(la.name).weights == "int7" else 127)
        rounded[la.name] = Rounded(back(codes).astype(np.int8), near, learned)
        plan = with_rounding(plan, {la.name: rounded[la.name]})
    return plan, rounded


def with_rounding(plan: Plan, rounded: Mapping[str, Rounded]) -> Plan:
    """The plan with these layers' learned codes (sidecar `round/<layer>`) and `round` in their
    recovery; each layer's note says how much of its output error the codes removed."""
    from dataclasses import replace

    from qsearch.plan.sidecar import Sidecar

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
