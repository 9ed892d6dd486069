"""Model import from PyTorch: a workload may name a module factory instead of an ONNX file,

    model: {torch: "mypkg.models:build", example_input: [1, 3, 224, 224]}

and qsearch exports it once with torch's dynamo exporter (opset 18, dynamic batch), cached by a
hash of the weights, the entry point and the example input, so the study and every plan bind to
the same ONNX file. PyTorch is needed only here (the `torch` extra).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any

from qsearch.errors import QsearchError
from qsearch.files import check_keys, where

DTYPES = ("float32", "float16", "int64", "int32", "bool")


def cache_dir() -> Path:
    return Path(os.environ.get("QSEARCH_CACHE", Path.home() / ".cache" / "qsearch")) / "torch"


def _examples(p: Path, spec: dict) -> list[tuple[tuple[int, ...], str]]:
    """example_input: one shape ([1, 3, 224, 224]), a list of shapes, or {shape, dtype} entries."""
    v = spec.get("example_input")
    items = [v] if isinstance(v, (list, dict)) and (isinstance(v, dict) or all(isinstance(x, int) for x in v)) else v
    bad = QsearchError(f"{where(p, spec, 'example_input')}: model.example_input must be a shape ([1, 3, 224, 224]), "
                       f"a list of shapes, or {{shape: [...], dtype: int64}} entries, got {v!r}"[:300])
    if not isinstance(items, list) or not items:
        raise bad
    out = []
    for it in items:
        shape, dtype = (it.get("shape"), it.get("dtype", "float32")) if isinstance(it, dict) else (it, "float32")
        if isinstance(it, dict) and set(it) - {"shape", "dtype"}:
            raise bad
        if (not isinstance(shape, list) or not shape or dtype not in DTYPES
                or not all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 1 << 16 for d in shape)):
            raise bad
        out.append((tuple(shape), dtype))
    return out


def torch_model(p: Path, spec: Any, base: Path) -> Path:
    """The ONNX file for a `model: {torch: ..., example_input: ...}` entry, exported on first use."""
    if not isinstance(spec, dict):
        raise QsearchError(f"{where(p, {'model': spec}, 'model')}: 'model' must be a file path or "
                           "{torch: 'pkg.module:factory', example_input: [...]}")
    check_keys(p, spec, {"torch", "example_input"}, "model")
    entry = spec.get("torch")
    if not isinstance(entry, str) or ":" not in entry:
        raise QsearchError(f"{where(p, spec, 'torch')}: model.torch must be 'package.module:factory' (a function "
                           f"returning a torch.nn.Module), got {entry!r}"[:300])
    examples = _examples(p, spec)
    try:
        import torch
    except ImportError:
        raise QsearchError(f"{where(p, spec, 'torch')}: model.torch needs PyTorch, which is not installed: "
                           "pip install -c constraints.txt \"qsearch[torch]\"") from None
    from qsearch.data import import_entry

    factory = import_entry(entry, f"{where(p, spec, 'torch')}: model.torch", base)
    try:
        module = factory()
    except (Exception, SystemExit) as exc:  # a factory that calls sys.exit(0) must not end qsearch with 0
        raise QsearchError(f"{where(p, spec, 'torch')}: '{entry}' raised {type(exc).__name__}: {exc}"[:400]) from None
    if not isinstance(module, torch.nn.Module):
        raise QsearchError(f"{where(p, spec, 'torch')}: '{entry}' returned {type(module).__name__}, not a "
                           "torch.nn.Module")
    module.eval()
    h = hashlib.sha256(repr((entry, examples, torch.__version__)).encode())
    for k, t in module.state_dict().items():
        h.update(k.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    from qsearch.files import ensure_writable_dir

    ensure_writable_dir(cache_dir(), "the export cache (QSEARCH_CACHE/torch)", create=False)
    path = cache_dir() / f"{entry.split(':')[-1]}-{h.hexdigest()[:16]}.onnx"
    if path.is_file():
        return path
    # batch 2 in the example: torch.export specializes a dimension of size 1
    args = tuple(torch.zeros((2, *shape[1:]), dtype=getattr(torch, dtype)) for shape, dtype in examples)
    dynamic = tuple({0: torch.export.Dim("batch", min=1)} for _ in args)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic, verbose=False)
        program.save(str(tmp))
        os.replace(tmp, path)
    except Exception as exc:
        raise QsearchError(f"{where(p, spec, 'torch')}: exporting '{entry}' to ONNX failed: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}"[:400]) from None
    finally:
        with contextlib.suppress(OSError):  # (nothing was written there)
            tmp.unlink(missing_ok=True)
    return path
