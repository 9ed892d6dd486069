"""qsearch: sensitivity-driven selective quantization search for ONNX models.

The Python API (`qsearch.analyze`, `optimize`, `apply`, `evaluate`, `show`, `diff`, `baseline`,
`profile`, `finetune`) lives in
`qsearch.api` and is imported on first use, so `import qsearch` stays cheap.
"""

from qsearch._version import __version__

__all__ = ["analyze", "apply", "baseline", "diff", "evaluate", "finetune", "optimize", "profile", "show", "__version__"]


def __getattr__(name: str):
    if name in __all__:
        from qsearch import api

        return getattr(api, name)
    raise AttributeError(f"module 'qsearch' has no attribute '{name}'")
