"""The analysis stage: per-layer sensitivity (probe proxy, fidelity screen) and latency profiles -> `SensitivityProfile`."""

from qsearch._exports import lazy

_EXPORTS = {
    "sensitivity": ("PROFILE_VERSION", "LayerSensitivity", "SensitivityProfile", "spearman", "analyze", "FORM_TIE", "choose_forms", "save_profile", "plot_profile",),
    "proxy": ("PROXY_PARTS", "options_for", "proxy_sqnr", "rank_options", "coherent",),
    "screen": ("SCREEN_SAMPLES", "Screen", "run_jobs",),
    "verdict": ("Measured", "applies", "from_profile", "candidates", "measure", "from_measurement", "early_verdict",),
    "profiling": ("INT8_KERNELS", "QDQ_OPS", "KINDS", "OTHER", "LatencyProfile", "kind_of", "attribute", "profile",),
}
__all__, __getattr__, __dir__ = lazy(__name__, _EXPORTS)
