"""PyPI's torchvision wheel links CUDA torch: beside the CPU torch wheel its import fails with a
RuntimeError (its C ops never load). onnx2torch depends on it (for NMS and RoiAlign only) and so
installs it with the `train` extra; transformers then tries to import it and fails too. Where the
import fails, torchvision is marked absent, which is what both libraries handle."""

from __future__ import annotations

import sys


def torchvision_works() -> bool:
    """False (and torchvision marked absent for this process) when it is installed but cannot load."""
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"] is not None
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = None  # type: ignore[assignment]  # find_spec: absent; import: ImportError
        return False
    return True
