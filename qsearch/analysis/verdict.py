"""The early verdict: stop before the search when no INT8 plan can beat FP32 beyond the timing noise.

The per-node profile answers first, for free: if neither all-INT8 nor the layers whose INT8 form
pays alone save `timing.TIE` of FP32's time, nothing will. Its per-layer attribution is only a
guide, though: where ONNX Runtime fuses an int8 layer's glue into a neighbour (the multiply of a
hardswish folded into its gate), the layer looks as if its INT8 form cost nothing, and the sum of
such apparent savings keeps the verdict from firing on models where INT8 plainly cannot pay. So
where the profile says all-INT8 is no faster than FP32 but cannot rule single layers out, the
two plans it points at (all-INT8, and INT8 exactly where a layer pays alone) are measured against
FP32 in interleaved rounds, and the measurement decides.
"""

from __future__ import annotations

from dataclasses import dataclass

from qsearch import timing
from qsearch.analysis.sensitivity import SensitivityProfile
from qsearch.plan.format import Plan


@dataclass(frozen=True)
class Measured:
    """A plan timed against FP32: its name, INT8 layer count and speed-up (FP32 time / its time)."""

    name: str
    int8_layers: int
    speedup: timing.Ratio


def applies(bench, profile: SensitivityProfile) -> bool:
    """Only a latency objective on a CPU target, with the verdict on and a measured FP32 profile."""
    w = bench.workload
    return (w.space.early_verdict and w.space.objective == "latency" and w.target == "cpu"
            and profile.meta.get("fp32_ms", 0.0) > 0)


def from_profile(profile: SensitivityProfile) -> str | None:
    """The profile's answer: the verdict's text, "" (INT8 can pay: search), or None (all-INT8 is no
    faster, but single layers' apparent savings cannot be ruled out: measure)."""
    fp32_ms, int8_ms = profile.meta["fp32_ms"], profile.meta.get("int8_ms", 0.0)
    singles = sum(max(0.0, x.gain_ms) for x in profile.layers)
    if max(singles, fp32_ms - int8_ms) < timing.TIE * fp32_ms:
        return (f"early verdict: no INT8 plan can beat FP32 here by more than the timing noise: all-INT8 runs "
                f"{int8_ms:.3g} ms against FP32's {fp32_ms:.3g} ms in the per-node profile, and the layers whose "
                f"INT8 form pays alone save {singles:.3g} ms together ({max(singles, fp32_ms - int8_ms) / fp32_ms:.1%}"
                f" at most, under the {timing.TIE:.0%} noise); no search was run, the measured profile is in "
                "sensitivity.yaml.")
    if fp32_ms - int8_ms >= timing.TIE * fp32_ms:
        return ""  # all-INT8 itself pays in the profile: regions may too
    return None


def candidates(bench, profile: SensitivityProfile) -> list[tuple[str, Plan, int]]:
    """(name, plan, INT8 layers): all-INT8 at each layer's best option, and INT8 only where a layer
    pays alone in the profile (skipped when that is no layer or every layer)."""
    best = {x.name: x.best_option for x in profile.layers}
    names = [la.name for la in bench.candidates() if la.name in best]
    paying = [x.name for x in profile.layers if x.gain_ms > 0 and x.name in best]
    out = [("all-INT8", bench.plan({n: best[n] for n in names}), len(names))]
    if 0 < len(paying) < len(names):
        out.append(("INT8 where a layer pays alone", bench.plan({n: best[n] for n in paying}), len(paying)))
    return out


def measure(bench, plans: list[tuple[str, Plan, int]]) -> list[Measured]:
    """Each plan against FP32 in interleaved rounds (`timing.interleaved`: until the rounds decide
    or the cap), on the thread's CPU clock with one thread, else the wall clock."""
    engine, feed = bench.engine, bench.latency_feed
    sessions = [engine.session(bench.prepared.proto)] + [engine.session(bench.rewriter(p)) for _, p, _ in plans]
    for s in sessions:
        engine.time(s, feed, warmup=3, repeat=1)
    cpu_clock = bench.workload.threads == 1

    def one_round(active) -> list[tuple[float, float]]:
        return [(t.wall_ms, t.cpu_ms) for t in (engine.time(sessions[k], feed, warmup=1, repeat=5) for k in active)]

    wall, cpu = timing.interleaved(one_round, len(sessions), range(len(sessions)), lambda w, c: cpu_clock)
    times = cpu if cpu_clock else wall
    out = []
    for k, (name, _, n8) in enumerate(plans, 1):
        r = timing.ratio(times[k], times[0])  # FP32's time over the plan's: the speed-up
        out.append(Measured(name, n8, r))
    return out


def from_measurement(fp32_ms: float, int8_ms: float, measured: list[Measured]) -> str:
    """The verdict when no measured plan can be faster than FP32 by more than `timing.TIE` even at
    the top of its interval, else ""."""
    if not measured or any(m.speedup.high > 1 + timing.TIE for m in measured):
        return ""
    said = "; ".join(f"{m.name} ({m.int8_layers} layers) runs {m.speedup.text()} FP32's speed" for m in measured)
    return (f"early verdict: no INT8 plan can beat FP32 here by more than the timing noise: all-INT8 runs "
            f"{int8_ms:.3g} ms against FP32's {fp32_ms:.3g} ms in the per-node profile, and measured against FP32 "
            f"in interleaved rounds, {said}; no search was run (set search_space.early_verdict: false to search "
            "anyway), the measured profile is in sensitivity.yaml.")


def early_verdict(bench, profile: SensitivityProfile) -> str:
    """One line when the analysis shows that no plan can beat FP32 by more than the timing noise,
    else "" (search)."""
    if not applies(bench, profile):
        return ""
    said = from_profile(profile)
    if said is not None:
        return said
    return from_measurement(profile.meta["fp32_ms"], profile.meta.get("int8_ms", 0.0),
                            measure(bench, candidates(bench, profile)))
