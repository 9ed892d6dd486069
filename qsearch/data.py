"""Data sources (.npz, folder of .npy, Python entry point) -> validated batches of feeds.

Data is loaded once and kept in memory as batches: calibration, analysis and every trial of the
search reuse the same arrays. Everything is checked against the model's inputs up front, so a
mismatch is one clear error instead of an ONNX Runtime failure in trial 37.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qsearch.errors import DataError
from qsearch.model.load import InputSpec

MAX_ENTRY_BATCHES = 100_000  # batches read from a data entry point without a `limit`


@dataclass(frozen=True)
class DataSpec:
    """Where one split comes from. Exactly one of npz / npy_dir / entry is set."""

    name: str  # calibration | search | test
    where: str  # 'config.yaml:12' for error messages
    npz: Path | None = None
    npy_dir: Path | None = None
    entry: str | None = None
    labels: str | None = None
    limit: int | None = None  # first N samples only


@dataclass(frozen=True)
class Dataset:
    name: str
    batches: tuple[Mapping[str, np.ndarray], ...]
    labels: tuple[np.ndarray | None, ...]
    samples: int
    fingerprint: str

    def __len__(self) -> int:
        return len(self.batches)

    def head(self, samples: int) -> Dataset:
        """The first batches holding at least `samples` samples (for quick analyses)."""
        out, lab, n = [], [], 0
        for b, y in zip(self.batches, self.labels):
            if n >= samples:
                break
            out.append(b)
            lab.append(y)
            n += len(next(iter(b.values())))
        return Dataset(self.name, tuple(out), tuple(lab), n, f"{self.fingerprint}:{samples}")


def chunks(batches: Iterable[Mapping[str, np.ndarray]], samples: int | None) -> Iterator[dict[str, np.ndarray]]:
    """The batches cut into runs of at most `samples` samples (None: as they are). Passes that only
    sum over samples (calibration, the proxy) run in cache-sized pieces: on a 2-core machine a
    32-sample PP-LCNet probe pass is memory-bound and two side by side ran 1.7x slower each."""
    for b in batches:
        n = len(next(iter(b.values())))
        step = n if samples is None else max(1, samples)
        for i in range(0, n, step):
            yield {k: v[i:i + step] for k, v in b.items()} if step < n else dict(b)


def rechunked(ds: Dataset, samples: int | None) -> Dataset:
    """The same samples in runs of at most `samples` (labels cut alike): see `chunks`."""
    if samples is None or all(len(next(iter(b.values()))) <= samples for b in ds.batches):
        return ds
    labels: list[np.ndarray | None] = []
    for b, y in zip(ds.batches, ds.labels):
        n = len(next(iter(b.values())))
        labels += [None if y is None else y[i:i + samples] for i in range(0, n, samples)]
    return Dataset(ds.name, tuple(chunks(ds.batches, samples)), tuple(labels), ds.samples,
                   f"{ds.fingerprint}/{samples}")


def _forget_other_folders(mod_name: str, base: Path | None) -> None:
    """A module of this name imported earlier in this process from another config's folder (two
    workloads with their own `hook.py`, one Python session) would answer for this one: when the
    config's folder has its own file of that name, it is imported afresh."""
    cached = sys.modules.get(mod_name)
    if base is None or cached is None or "." in mod_name:
        return
    local = Path(base) / f"{mod_name}.py"
    here = getattr(cached, "__file__", None)
    if local.is_file() and (here is None or Path(here).resolve() != local.resolve()):
        del sys.modules[mod_name]


def import_entry(spec: str, where: str, base: Path | None = None):
    """Import `package.module:function` from the config's folder or PYTHONPATH."""
    if ":" not in spec:
        raise DataError(f"{where}: entry point '{spec}' must look like 'package.module:function'")
    mod_name, func_name = spec.split(":", 1)
    _forget_other_folders(mod_name, base)
    added = False
    if base is not None and str(base) not in sys.path:
        sys.path.insert(0, str(base))
        added = True
    try:
        module = importlib.import_module(mod_name)
    except (Exception, SystemExit) as exc:  # a module that exits on import: an error, never a silent success
        raise DataError(f"{where}: cannot import '{mod_name}' for entry point '{spec}': {type(exc).__name__}: {exc}") from None
    finally:
        if added:
            sys.path.remove(str(base))
    func = getattr(module, func_name, None)
    if not callable(func):
        raise DataError(f"{where}: entry point '{spec}': '{mod_name}' has no function '{func_name}'")
    return func


def _raw(spec: DataSpec, base: Path | None) -> tuple[list[dict], list[np.ndarray | None], bytes]:
    """Arrays as the source gives them: one dict per chunk, plus labels and content bytes."""
    if spec.npz is not None:
        try:
            with np.load(spec.npz, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise DataError(f"{spec.npz}: {spec.name} data file not found ({spec.where})") from None
        except Exception as exc:
            raise DataError(f"{spec.npz}: cannot read {spec.name} data: {type(exc).__name__}: {exc}") from None
        labels = None
        if spec.labels is not None:
            if spec.labels not in arrays:
                raise DataError(f"{spec.npz}: no labels array '{spec.labels}' (arrays: {', '.join(sorted(arrays))})")
            labels = arrays.pop(spec.labels)
        return [arrays], [labels], Path(spec.npz).read_bytes()
    if spec.npy_dir is not None:
        d = Path(spec.npy_dir)
        if not d.is_dir():
            raise DataError(f"{d}: {spec.name} data folder not found ({spec.where})")
        arrays, labels, h = {}, None, hashlib.sha256()
        for f in sorted(d.glob("*.npy")):
            try:
                a = np.load(f, allow_pickle=False)
            except Exception as exc:
                raise DataError(f"{f}: cannot read array: {type(exc).__name__}: {exc}") from None
            h.update(f.name.encode() + a.tobytes())
            if spec.labels is not None and f.stem == spec.labels:
                labels = a
            else:
                arrays[f.stem] = a
        if spec.labels is not None and labels is None:
            raise DataError(f"{d}: no labels file '{spec.labels}.npy'")
        return [arrays], [labels], h.digest()
    func = import_entry(spec.entry, spec.where, base)
    items, samples = [], 0
    try:
        # read lazily and stop: an endless generator must not eat the machine's memory
        for item in func():
            items.append(item)
            feed = item[0] if isinstance(item, tuple) and len(item) == 2 else item
            if isinstance(feed, Mapping) and feed:
                first = np.asarray(next(iter(feed.values())))
                samples += len(first) if first.ndim else 1
            if spec.limit is not None and samples >= spec.limit:
                break
            if len(items) > MAX_ENTRY_BATCHES:
                raise DataError(f"{spec.where}: data entry point '{spec.entry}' yields more than "
                                   f"{MAX_ENTRY_BATCHES} batches (endless?); set data.{spec.name}.limit")
    except DataError:
        raise
    except (Exception, SystemExit) as exc:  # sys.exit() in a data function is an error naming it
        raise DataError(f"{spec.where}: data entry point '{spec.entry}' raised {type(exc).__name__}: {exc}") from None
    feeds, labels, h = [], [], hashlib.sha256()
    for item in items:
        feed, label = (item if isinstance(item, tuple) and len(item) == 2 else (item, None))
        if not isinstance(feed, Mapping):
            raise DataError(f"{spec.where}: data entry point '{spec.entry}' must yield dicts of arrays "
                               f"(or (dict, label) pairs), got {type(feed).__name__}")
        feed = {k: np.asarray(v) for k, v in feed.items()}
        for k in sorted(feed):
            h.update(k.encode() + str(feed[k].dtype).encode() + repr(feed[k].shape).encode() + feed[k].tobytes())
        if label is not None:  # labels define the scores too: cached profiles must not outlive them
            h.update(b"\0label" + np.asarray(label).tobytes())
        feeds.append(feed)
        labels.append(None if label is None else np.asarray(label))
    return feeds, labels, h.digest()


def load(spec: DataSpec, inputs: Sequence[InputSpec], batch_size: int, base: Path | None = None) -> Dataset:
    """Load, validate against the model inputs, and cut into batches."""
    chunks, labels, content = _raw(spec, base)
    src = spec.npz or spec.npy_dir or spec.entry
    want = {i.name: i for i in inputs}
    batches: list[dict] = []
    batch_labels: list[np.ndarray | None] = []
    fixed_batch = next((i.shape[0] for i in inputs if i.shape and i.shape[0] is not None), None)
    for chunk, lab in zip(chunks, labels):
        missing = sorted(set(want) - set(chunk))
        extra = sorted(set(chunk) - set(want))
        if missing or extra:
            raise DataError(f"{src}: {spec.name} data has arrays {sorted(chunk)} but the model's inputs are "
                               f"{sorted(want)}" + (f" (missing {missing})" if missing else f" (unexpected {extra})"))
        n = None
        for name, arr in chunk.items():
            _check_array(src, spec.name, name, arr, want[name])
            n = len(arr) if n is None else n
            if len(arr) != n:
                raise DataError(f"{src}: {spec.name} arrays have different sample counts ({name}: {len(arr)} vs {n})")
        if n == 0:
            raise DataError(f"{src}: {spec.name} data has an empty batch (zero samples)")
        if fixed_batch and spec.entry is None and n % fixed_batch:
            raise DataError(f"{src}: the model's inputs have a fixed batch of {fixed_batch}, but the {spec.name} "
                               f"data has {n} samples, not a multiple of it")
        if lab is not None and (lab.ndim == 0 or len(lab) != n):
            raise DataError(f"{src}: {spec.name} labels have "
                               f"{'a single value (0-d array)' if lab.ndim == 0 else f'{len(lab)} entries'} "
                               f"for {n} samples; give one label per sample")
        if spec.entry is not None:  # entry points give batches already shaped for the model
            batches.append(chunk)
            batch_labels.append(lab)
            continue
        step = fixed_batch or batch_size
        for i in range(0, n, step):
            batches.append({k: np.ascontiguousarray(v[i : i + step]) for k, v in chunk.items()})
            batch_labels.append(None if lab is None else lab[i : i + step])
    ds = Dataset(spec.name, tuple(batches), tuple(batch_labels),
                 sum(len(next(iter(b.values()))) for b in batches) if batches else 0,
                 hashlib.sha256(content + f"{batch_size}".encode()).hexdigest()[:16])
    if spec.limit is not None:
        ds = ds.head(spec.limit)
    if ds.samples == 0:
        raise DataError(f"{src}: {spec.name} data set is empty (zero samples)")
    if spec.labels is not None and any(y is None for y in ds.labels):
        raise DataError(f"{src}: {spec.name} data needs labels for every batch")
    return ds


def _check_array(src, split: str, name: str, arr: np.ndarray, spec: InputSpec) -> None:
    if not spec.shape or arr.ndim == 0:
        raise DataError(f"{src}: {split} input '{name}' is a scalar (rank 0) in the "
                           f"{'model' if not spec.shape else 'data'}: qsearch batches samples along the first axis")
    if arr.dtype == object:
        raise DataError(f"{src}: {split} input '{name}' holds Python objects, not numbers")
    if arr.dtype != spec.dtype:
        raise DataError(f"{src}: {split} input '{name}' has dtype {arr.dtype}, the model expects {spec.dtype}")
    if arr.ndim != len(spec.shape):
        raise DataError(f"{src}: {split} input '{name}' has shape {arr.shape}, the model expects rank {len(spec.shape)} "
                           f"{_shape_str(spec.shape)}")
    for got, exp in zip(arr.shape[1:], spec.shape[1:]):
        if exp is not None and got != exp:
            raise DataError(f"{src}: {split} input '{name}' has shape {arr.shape}, the model expects {_shape_str(spec.shape)}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise DataError(f"{src}: {split} input '{name}' contains {bad} NaN/Inf values")


def _shape_str(shape) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"
