"""Fake quantization in PyTorch with the rewriter's numerics (`qsearch.qparams`): uint8 asymmetric
activations over a range (fixed, or learned LSQ-style through a straight-through estimator),
symmetric int8/int7 weights whose scale follows the weight (max-abs, per channel or per tensor,
as `quantize_weight` recomputes it from the weights written back), and the uint8 constant of an
Add/Mul layer over its own range. Rounding is half-to-even in both torch and ONNX Runtime."""

from __future__ import annotations

import torch
from torch import nn

from qsearch.qparams import activation_qparams
from qsearch.rewrite import WeightQuant

DEGENERATE = 1e-12  # a range narrower than this quantizes with scale 1, as `activation_qparams` does


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """round() forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def uint8_fake(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    q = torch.clamp(ste_round(x / scale) + zp, 0.0, 255.0)
    return (q - zp) * scale


class RangeQuant(nn.Module):
    """The Q/DQ pair `apply` writes on one activation tensor. Fixed: the plan's scale and zero
    point exactly as `activation_qparams` computes them. Learned: `lo` and `hi` are parameters
    (what the new plan's range becomes); scale and zero point follow them, the zero point rounded
    through the straight-through estimator."""

    def __init__(self, tensor: str, lo: float, hi: float, learn: bool, group: int = 0):
        super().__init__()
        self.tensor, self.group = tensor, group
        scale, zp = activation_qparams(lo, hi)
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("zp", torch.tensor(float(zp)))
        self.learn = learn and max(hi, 0.0) - min(lo, 0.0) >= DEGENERATE
        bounds = torch.tensor([min(lo, 0.0), max(hi, 0.0)], dtype=torch.float32)
        self.bounds = nn.Parameter(bounds, requires_grad=self.learn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.learn:
            return uint8_fake(x, self.scale, self.zp)
        lo, hi = torch.clamp(self.bounds[0], max=0.0), torch.clamp(self.bounds[1], min=0.0)
        scale = torch.clamp((hi - lo) / 255.0, min=DEGENERATE)
        zp = torch.clamp(ste_round(-lo / scale), 0.0, 255.0)
        return uint8_fake(x, scale, zp)

    def range(self) -> tuple[float, float]:
        """The range the new plan writes for this tensor."""
        lo, hi = (float(v) for v in self.bounds.detach())
        return min(lo, 0.0), max(hi, 0.0)


class WeightFake(nn.Module):
    """A parametrization: the weight as `apply` stores it (codes times a scale that `quantize_weight`
    recomputes from the weight), or an Add/Mul constant as uint8 over its own range. `transposed`:
    the converter holds the tensor transposed (a Linear made from a Gemm without transB)."""

    def __init__(self, spec: WeightQuant | None, transposed: bool = False):
        super().__init__()
        self.spec, self.transposed = spec, transposed

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        out = w if self.spec is None else constant_fake(w) if self.spec.constant else weight_fake(w, self.spec)
        return out.T if self.transposed else out


def weight_fake(w: torch.Tensor, spec: WeightQuant) -> torch.Tensor:
    qmax = 63.0 if spec.codes == "int7" else 127.0
    if spec.per_channel and w.dim() > 1:
        dims = [d for d in range(w.dim()) if d != spec.axis % w.dim()]
        amax = w.detach().abs().amax(dim=dims, keepdim=True)
    else:
        amax = w.detach().abs().max()
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    if spec.floor:  # as the rewriter raises a scale its int32 bias cannot hold
        floor = torch.tensor(spec.floor, dtype=scale.dtype).reshape(scale.shape if len(spec.floor) > 1 else ())
        scale = torch.maximum(scale, floor)
    return torch.clamp(ste_round(w / scale), -qmax, qmax) * scale


def constant_fake(c: torch.Tensor) -> torch.Tensor:
    lo, hi = float(min(c.detach().min(), 0.0)), float(max(c.detach().max(), 0.0))
    scale, zp = activation_qparams(lo, hi)
    return uint8_fake(c, torch.tensor(float(scale)), torch.tensor(float(zp)))
