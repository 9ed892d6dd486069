"""The CPU's int8 arithmetic path: part of the target, because it changes accuracy.

Without VNNI, ONNX Runtime's x86 u8s8 kernels multiply uint8 activations by int8 weights in
adjacent pairs into 16 bits (`vpmaddubsw`), which saturates when both products are large
(255 * 127 * 2 > 32767). The same plan then loses accuracy on an AVX2 machine that it keeps on a
VNNI or AMX one. Two weight encodings avoid the saturation, as ONNX Runtime's own guidance says:
7-bit weights (`int7`, its `reduce_range`) and uint8 weights (`uint8`, the u8u8 kernels, which
widen to 16 bits before multiplying).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache

from qsearch.errors import QsearchError

# how a plan's int8 layer stores its weight: int8 codes [-127, 127]; int7 codes [-63, 63] (no pair of
# u8 x s7 products can reach 2^15); uint8 codes 128 +- 127 (ORT runs u8u8 kernels: no 16-bit pairs)
WEIGHT_CODES = ("int8", "int7", "uint8")
PATHS = ("vnni", "amx", "avx2", "avx512", "arm-dot", "arm", "other")
SATURATING = ("avx2", "avx512")


@dataclass(frozen=True)
class Int8Path:
    """`name`: vnni | amx | avx2 | avx512 (x86 without VNNI) | arm-dot | arm | other;
    `saturates`: u8 x s8 products are summed in pairs into 16 bits."""

    name: str
    saturates: bool

    def describe(self) -> str:
        return f"{self.name} (u8s8 saturates: 7-bit or uint8 weights are safe)" if self.saturates else self.name


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo: x86 `flags`, ARM `Features`)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def classify(machine: str, flags: set[str]) -> Int8Path:
    """The int8 path of a CPU from its architecture and feature flags (pure: tested on planted flags)."""
    machine = machine.lower()
    if machine in ("x86_64", "amd64", "i686", "x86"):
        if "amx_int8" in flags:
            return Int8Path("amx", False)
        if flags & {"avx512_vnni", "avx_vnni", "avx512vnni"}:
            return Int8Path("vnni", False)
        if "avx512bw" in flags:
            return Int8Path("avx512", True)
        return Int8Path("avx2", True)
    if machine in ("aarch64", "arm64"):
        return Int8Path("arm-dot" if "asimddp" in flags else "arm", False)
    return Int8Path("other", False)


@lru_cache(maxsize=1)
def detect() -> Int8Path:
    """This machine's int8 path. `QSEARCH_INT8_PATH` (a name above, `saturating` or not) overrides
    detection, for a machine whose flags the operating system does not show."""
    forced = os.environ.get("QSEARCH_INT8_PATH", "").strip()
    if forced:
        if forced not in PATHS:
            raise QsearchError(f"QSEARCH_INT8_PATH: {forced!r} is not one of {', '.join(PATHS)}"[:300])
        return Int8Path(forced, forced in SATURATING)
    return classify(platform.machine(), cpu_flags())


def safe_weights(path: Int8Path | None = None) -> str:
    """The weight encoding a plan uses by default on `path`: int8 where the kernels are exact,
    7-bit weights where u8s8 saturates (as fast as int8, exact on every path)."""
    return "int7" if (path or detect()).saturates else "int8"


def weight_limits(codes: str) -> tuple[int, int, int]:
    """(lowest code, highest code, zero point) of a weight encoding (symmetric around the zero point)."""
    if codes == "int7":
        return -63, 63, 0
    if codes == "uint8":
        return 1, 255, 128
    return -127, 127, 0


def mismatch(recorded: object, what: str) -> str | None:
    """One line when `what` (a plan, a model) was measured on another int8 path than this machine's,
    saying what that means for its accuracy; None when they agree or nothing was recorded."""
    here = detect()
    if recorded is None or recorded == here.name:
        return None
    if not isinstance(recorded, str) or recorded not in PATHS:  # a hand edit: shown as text, not trusted
        return (f"{what} names int8 path {str(recorded)[:60]!r}, which is none of {', '.join(PATHS)}: which CPU "
                f"measured it is unknown (`qsearch evaluate` measures it here, on {here.name})")
    there = recorded in SATURATING
    if here.saturates and not there:
        risk = "its int8-coded weights may saturate in u8s8 kernels here and lose accuracy"
    elif there and not here.saturates:
        risk = "its accuracy here is at least what was measured"
    else:
        risk = "int8 results may differ slightly"
    return (f"{what} was measured on int8 path {recorded}; this machine's is {here.describe()}: {risk} "
            f"(`qsearch evaluate` measures it here)")
