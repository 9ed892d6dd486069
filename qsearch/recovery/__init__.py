"""Accuracy recovery: one module per technique (equalization and bias correction, smoothing, learned rounding) and the registry that names them (`techniques`)."""

from qsearch._exports import lazy

_EXPORTS = {
    "techniques": ("SEP", "Technique", "register", "techniques", "technique", "split", "combine", "uses", "recoveries",),
    "equalization": ("SCALE_LIMIT", "Pair", "find_pairs", "group", "pair_scales", "equalized_weights", "compute_scales", "equalized_model", "correctable", "bias_delta", "input_channels", "RecoveryStats", "active_pairs", "channel_tensors",),
    "smoothing": ("ALPHAS", "Group", "Smoothing", "input_axis", "find_groups", "oriented", "scales_for", "smoothed_range", "output_noise", "choose", "compute", "scaled_weight", "fold_target", "width",),
    "rounding": ("STEPS", "ROWS", "Rounded", "Moments", "learn", "conv_rows", "layer_problem", "CAP_S", "SAMPLES", "roundable", "FLOPS", "OVERHEAD_S", "learn_for_plan", "with_rounding",),
}
__all__, __getattr__, __dir__ = lazy(__name__, _EXPORTS)
