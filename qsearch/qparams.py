"""How a range and a weight become int8 codes: the one place the quantization arithmetic the
rewriter writes (and learned rounding starts from) is defined."""

from __future__ import annotations

import numpy as np

from qsearch.engine.isa import weight_limits


def activation_qparams(rmin: float, rmax: float, bits: int = 8) -> tuple[np.float32, np.unsignedinteger]:
    """Asymmetric scale / zero point: uint8 (bits 8, the fast path of x86 int8 kernels) or uint16
    (bits 16, an NPU's 16-bit activations); the zero point's dtype says which."""
    dtype = np.uint16 if bits == 16 else np.uint8
    top = float(np.iinfo(dtype).max)
    rmin, rmax = min(rmin, 0.0), max(rmax, 0.0)
    if rmax - rmin < 1e-12:
        return np.float32(1.0), dtype(0)
    scale = (rmax - rmin) / top
    zp = int(np.clip(round(-rmin / scale), 0, top))
    return np.float32(scale), dtype(zp)


def quantize_weight(w: np.ndarray, axis: int, per_channel: bool, codes: str = "int8") -> tuple[np.ndarray, np.ndarray]:
    """Symmetric weight codes, scale per output channel or per tensor: int8 [-127, 127]; int7 [-63, 63]
    (`codes`, `engine.isa.WEIGHT_CODES`; uint8 codes are int8's shifted by `stored_codes`)."""
    qmax = 63 if codes == "int7" else 127
    w = np.asarray(w, dtype=np.float32)
    if per_channel:
        red = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.abs(w).max(axis=red) if red else np.abs(w)
    else:
        amax = np.array(np.abs(w).max())
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    if per_channel:
        shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale


def stored_codes(q: np.ndarray, codes: str) -> tuple[np.ndarray, np.generic]:
    """Symmetric codes as the model stores them, with their zero point: int8 as they are, uint8
    shifted by 128 (ONNX Runtime then runs its u8u8 kernels)."""
    lo, hi, zp = weight_limits(codes)
    if codes == "uint8":
        return (q.astype(np.int16) + zp).astype(np.uint8), np.uint8(zp)
    return np.clip(q, lo, hi).astype(np.int8), np.int8(0)


INT32_MAX = 2**31 - 1
BIAS_MARGIN = 2.0  # room for a bias correction added after the weight scale is fixed
TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32: a bias scale below it is 0 or denormal


def bias_scale_floor(bias: np.ndarray | None, x_scale: float, per_channel: bool) -> np.ndarray | None:
    """The smallest weight scale whose int32 bias (scale s_x * s_w) holds `bias`: a channel whose
    weights are all but zero (a dead channel after BatchNorm folding: 1e-40) gets a scale so small
    that its bias overflows int32 and is clipped away (PP-OCRv4's recognizer lost a -0.65 bias so).
    ONNX Runtime's quantizer raises such scales too. The bias scale s_x * s_w must also stay a
    normal float32: a zero (or denormal) scale is no scale (a uint16 input's s_x times a dead
    channel's 1e-40 underflowed to 0). None: no floor needed."""
    if bias is None:
        return None
    need = np.maximum(BIAS_MARGIN * np.abs(np.asarray(bias, np.float64)) / (float(x_scale) * INT32_MAX),
                      TINY / float(x_scale))
    return need if per_channel else np.asarray(need.max(initial=0.0))


def requantize_with_floor(w: np.ndarray, q: np.ndarray, scale: np.ndarray, floor: np.ndarray | None, axis: int,
                          codes: str = "int8") -> tuple[np.ndarray, np.ndarray]:
    """`quantize_weight`'s codes and scale with the scale raised to `floor` where it is below it
    (those channels' codes recomputed; every other channel unchanged)."""
    if floor is None or not np.any(floor > scale):
        return q, scale
    qmax = 63 if codes == "int7" else 127
    new = np.maximum(scale.astype(np.float64), floor).astype(np.float32)
    shape = [1] * w.ndim
    if new.ndim:
        shape[axis] = -1
    q = np.clip(np.round(np.asarray(w, np.float32) / new.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, new
