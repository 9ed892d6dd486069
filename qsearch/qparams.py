"""How a range and a weight become int8 codes: the one place the quantization arithmetic the
rewriter writes (and learned rounding starts from) is defined."""

from __future__ import annotations

import numpy as np


def activation_qparams(rmin: float, rmax: float) -> tuple[np.float32, np.uint8]:
    """uint8 asymmetric scale / zero point, the fast path for x86 VNNI kernels."""
    rmin, rmax = min(rmin, 0.0), max(rmax, 0.0)
    if rmax - rmin < 1e-12:
        return np.float32(1.0), np.uint8(0)
    scale = (rmax - rmin) / 255.0
    zp = int(np.clip(round(-rmin / scale), 0, 255))
    return np.float32(scale), np.uint8(zp)


def quantize_weight(w: np.ndarray, axis: int, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """int8 symmetric weights ([-127, 127], zero point 0); scale per output channel or per tensor."""
    w = np.asarray(w, dtype=np.float32)
    if per_channel:
        red = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.abs(w).max(axis=red) if red else np.abs(w)
    else:
        amax = np.array(np.abs(w).max())
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    if per_channel:
        shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale
