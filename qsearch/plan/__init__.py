"""The plan: its format (at the bottom: nothing in it calls upward), reading (`io`), building from choices (`build`), checking against a model (`check`), and its recovery sidecar."""

from qsearch._exports import lazy

_EXPORTS = {
    "format": ("MAX_RANGE", "SCHEMA_VERSION", "PRECISIONS", "TARGETS", "LayerChoice", "LayerNote", "Plan", "layer_notes", "provenance", "closest", "good_range", "Figures", "number",),
    "sidecar": ("SIDECAR_KINDS", "SIDECAR_NAME", "Sidecar", "sidecar_name",),
    "io": ("read_plan", "plan_from_doc",),
    "build": ("allowed_granularities", "normalized", "inputs_of", "tensor_methods", "quantized_tensors", "build_plan", "weight_copies",),
    "widths": ("Widths", "activation_widths", "plan_widths",),
    "check": ("check_plan", "check_sidecar",),
    "recovery": ("smoothed_layers", "chosen_smoothing", "smoothing_arrays", "recovery_notes", "check_recovery",),
}
__all__, __getattr__, __dir__ = lazy(__name__, _EXPORTS)
