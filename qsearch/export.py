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
import re
from pathlib import Path
from typing import Any

from qsearch.errors import ModelError
from qsearch.files import check_keys, where

DTYPES = ("float32", "float16", "int64", "int32", "bool")


def cache_dir() -> Path:
    return Path(os.environ.get("QSEARCH_CACHE", Path.home() / ".cache" / "qsearch")) / "torch"


def _examples(p: Path, spec: dict) -> list[tuple[tuple[int, ...], str]]:
    """example_input: one shape ([1, 3, 224, 224]), a list of shapes, or {shape, dtype} entries."""
    v = spec.get("example_input")
    items = [v] if isinstance(v, (list, dict)) and (isinstance(v, dict) or all(isinstance(x, int) for x in v)) else v
    bad = ModelError(f"{where(p, spec, 'example_input')}: model.example_input must be a shape ([1, 3, 224, 224]), "
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


def torch_model(p: Path, spec: Any, base: Path) -> tuple[Path, str]:
    """The ONNX file for a `model: {torch: ..., example_input: ...}` entry, exported on first use,
    and a note for the user when the module was converted to export it ('' when not)."""
    if not isinstance(spec, dict):
        raise ModelError(f"{where(p, {'model': spec}, 'model')}: 'model' must be a file path or "
                           "{torch: 'pkg.module:factory', example_input: [...]}")
    check_keys(p, spec, {"torch", "example_input"}, "model")
    entry = spec.get("torch")
    if not isinstance(entry, str) or ":" not in entry:
        raise ModelError(f"{where(p, spec, 'torch')}: model.torch must be 'package.module:factory' (a function "
                           f"returning a torch.nn.Module), got {entry!r}"[:300])
    examples = _examples(p, spec)
    try:
        import torch
    except ImportError:
        raise ModelError(f"{where(p, spec, 'torch')}: model.torch needs PyTorch, which is not installed: "
                           "pip install -c constraints.txt \"qsearch[torch]\"") from None
    from qsearch.data import import_entry
    from qsearch.torchcompat import torchvision_works

    torchvision_works()  # a torchvision that cannot load beside CPU torch is absent to the user's code too

    factory = import_entry(entry, f"{where(p, spec, 'torch')}: model.torch", base)
    try:
        module = factory()
    except (Exception, SystemExit) as exc:  # a factory that calls sys.exit(0) must not end qsearch with 0
        raise ModelError(f"{where(p, spec, 'torch')}: '{entry}' raised {type(exc).__name__}: {exc}"[:400]) from None
    if not isinstance(module, torch.nn.Module):
        raise ModelError(f"{where(p, spec, 'torch')}: '{entry}' returned {type(module).__name__}, not a "
                           "torch.nn.Module")
    module, note = _float32(module, torch, where(p, spec, "torch"), entry)
    h = _weights_hash(module, torch, repr((entry, examples, torch.__version__)))
    from qsearch.files import ensure_writable_dir

    ensure_writable_dir(cache_dir(), "the export cache (QSEARCH_CACHE/torch)", create=False)
    path = cache_dir() / f"{entry.split(':')[-1]}-{h.hexdigest()[:16]}.onnx"
    if path.is_file():
        return path, note
    # batch 2 in the example: torch.export specializes a dimension of size 1
    try:
        args = tuple(torch.zeros((2, *shape[1:]), dtype=getattr(torch, dtype)) for shape, dtype in examples)
    except (RuntimeError, MemoryError) as exc:
        raise ModelError(f"{where(p, spec, 'example_input')}: model.example_input {[list(s) for s, _ in examples]} "
                           f"is too large to allocate ({type(exc).__name__})"[:400]) from None
    dynamic = tuple({0: torch.export.Dim("batch", min=1)} for _ in args)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    log = path.with_suffix(".export.log")  # the exporter's own output, kept beside the export
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), \
                _logging_to(sink), torch.no_grad():
            program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic, verbose=False)
            program.save(str(tmp))
        os.replace(tmp, path)
    except Exception as exc:
        first = ANSI.sub("", str(exc)).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelError(f"{where(p, spec, 'torch')}: exporting '{entry}' to ONNX failed: {type(exc).__name__}: "
                           f"{first}"[:400] + f" (the exporter's log: {log})") from None
    finally:
        with contextlib.suppress(OSError):  # (nothing was written there)
            tmp.unlink(missing_ok=True)
    return path, note


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@contextlib.contextmanager
def _logging_to(sink):
    """torch's exporter logs through `logging` (about 40 lines, colored): into the log file, not
    the user's terminal."""
    import logging

    handler = logging.StreamHandler(sink)
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = [handler]
    try:
        yield
    finally:
        root.handlers = saved


def _float32(module, torch, at: str, entry: str):
    """(the module as qsearch quantizes it, a note): float32 weights on the CPU. bf16/fp16 weights
    are widened, and the note says so (the exported model then computes in float32, not as the
    module did); weights on the meta device have no values and are refused."""
    tensors = [*module.parameters(), *module.buffers()]
    if any(t.is_meta for t in tensors):
        raise ModelError(f"{at}: '{entry}' returned a module with weights on the meta device (no values): "
                           "load or initialize its weights before returning it")
    narrow = sorted({str(t.dtype).removeprefix("torch.") for t in tensors
                     if t.is_floating_point() and t.dtype != torch.float32})
    note = ""
    if narrow:
        module = module.float()
        note = (f"{at}: '{entry}' has {' and '.join(narrow)} weights: widened to float32 for export, so the FP32 "
                f"baseline and every plan start from a float32 model, which computes more precisely than the "
                f"{'/'.join(narrow)} module did")
    return module.cpu().eval(), note


def _weights_hash(module, torch, head: str):
    """Hash of the entry, the example input and every state_dict entry: tensors by their bytes (bf16
    included, through an integer view), anything else a module keeps (`get_extra_state`) by repr."""
    h = hashlib.sha256(head.encode())
    for k, t in module.state_dict().items():
        h.update(k.encode())
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().contiguous()
            if t.dtype == torch.bfloat16:
                t = t.view(torch.int16)
            h.update(t.numpy().tobytes())
        else:
            h.update(repr(t)[:100_000].encode())
    return h
