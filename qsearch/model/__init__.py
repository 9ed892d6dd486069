"""The model stage: load and prepare an ONNX graph (named passes), find its quantizable layers and patterns."""

from qsearch._exports import lazy

_EXPORTS = {
    "load": ("MIN_OPSET", "PREPARE_VERSION", "PREPARATIONS", "InputSpec", "PreparedModel", "load_model", "fingerprint", "prepare", "with_input_shapes", "load_prepared",),
    "layers": ("WEIGHT_OPS", "BINARY_OPS", "UNARY_OPS", "VARIADIC_OPS", "LAYER_OPS", "FUSED_ACTIVATIONS", "PATTERN_FORMS", "PASSTHROUGH_OPS", "Layer", "node_reads", "find_layers",),
    "patterns": ("hardswish_gates", "readable_name",),
    "folding": ("fold_affine",),
}
__all__, __getattr__, __dir__ = lazy(__name__, _EXPORTS)
