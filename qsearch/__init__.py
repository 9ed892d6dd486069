"""qsearch: sensitivity-driven selective quantization search for ONNX models."""

__version__ = "0.1.0"
