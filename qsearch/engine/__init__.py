"""Where a plan runs: the engine seam (sessions, timing, profiles) and the CPU's int8 arithmetic."""

from qsearch.engine.isa import WEIGHT_CODES, Int8Path, detect, mismatch, safe_weights, weight_limits

__all__ = ["WEIGHT_CODES", "Int8Path", "detect", "mismatch", "safe_weights", "weight_limits"]
