"""Workload YAML -> validated, frozen `Workload` and `SearchSpace`.

Every error names the file, the line and the key. Paths are relative to the config file.
A search space may be inline, a path, or the name of one shipped in `qsearch/search_spaces/`, optionally
with overrides (`search_space: {extends: cnn_cpu, calibration: [minmax]}`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qsearch.calibration import GRANULARITIES, METHODS
from qsearch.data import DataSpec
from qsearch.engine import EXACT_TARGETS
from qsearch.engine.isa import WEIGHT_CODES, safe_weights
from qsearch.errors import ConfigError, as_kind
from qsearch.files import LinedDict, check_keys, load_yaml, where
from qsearch.model.load import LAYER_OPS
from qsearch.plan.format import TARGETS, WIDE_TARGETS
from qsearch.recovery.techniques import techniques

PACKAGE_DIR = Path(__file__).resolve().parent
SPACES_DIRS = (PACKAGE_DIR / "search_spaces",)  # shipped inside the package (wheel included)
DEFAULT_WORKLOAD = PACKAGE_DIR / "examples" / "digits" / "workload.yaml"
METRICS = ("top1", "cosine", "sqnr")
OBJECTIVES = ("latency", "size", "bitops")
SAMPLERS = ("tpe", "nsga2", "random", "gp", "qmc")


@dataclass(frozen=True)
class SearchSpace:
    op_types: tuple[str, ...] = LAYER_OPS
    include: tuple[str, ...] = ()  # regexes on layer names; empty = all
    exclude: tuple[str, ...] = ()
    precisions: tuple[str, ...] = ("int8", "float")
    calibration: tuple[str, ...] = METHODS
    granularity: tuple[str, ...] = GRANULARITIES
    recovery: tuple[str, ...] = field(default_factory=techniques)  # accuracy recovery the search may use (`recovery: [none]`: plain PTQ)
    # weight encodings (`engine.isa`): by default the one exact on this CPU's int8 path (int7 where u8s8 saturates)
    weights: tuple[str, ...] = field(default_factory=lambda: (safe_weights(),))
    percentile: float = 99.99
    objective: str = "latency"  # cost to minimize under the accuracy budget
    multi_objective: bool = False  # True: Pareto search over (metric, cost) with NSGA-II
    sampler: str = "tpe"
    seed: int = 0
    fix_below: float = 0.25  # share of the budget the fixed-INT8 set may use, measured together (search.choose_fixed)
    options_per_layer: int = 3  # best int8 options kept per searched layer (plus float)
    min_searched: int = 8  # the most sensitive layers are searched even when each alone looks harmless
    warm_start: bool = True
    prune: bool = True
    prune_fraction: float = 0.3  # share of the search data scored before deciding to prune
    early_verdict: bool = True  # stop before the search when no plan can beat FP32 beyond the timing noise
    stop_at_ceiling: bool = True  # stop the study once all-INT8 within half the budget stays best (`search.stopping`)

    def matches(self, name: str, op_type: str) -> bool:
        if op_type not in self.op_types:
            return False
        if self.include and not any(re.search(p, name) for p in self.include):
            return False
        return not any(re.search(p, name) for p in self.exclude)


@dataclass(frozen=True)
class MetricSpec:
    name: str  # top1 | cosine | sqnr | custom
    search_entry: str | None = None
    test_entry: str | None = None


@dataclass(frozen=True)
class Workload:
    path: Path
    name: str
    model: Path
    calibration: DataSpec
    search: DataSpec
    test: DataSpec
    metric: MetricSpec
    max_drop: float
    relative: bool  # max_drop is a fraction of the FP32 score
    target: str
    space: SearchSpace
    batch_size: int = 64
    threads: int = 1  # ORT intra-op threads per session: 1 keeps latency stable and lets workers scale
    latency_batch: int = 64
    latency: str | None = None  # a user's latency hook 'pkg.module:function' (`engine.hook`), where set
    latency_where: str = ""  # 'file:line' of runtime.latency, for its errors
    engine: str = "onnxruntime"  # runtime.engine: what scores and times every model (`engine.ENGINES`)
    extra: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # what loading changed and the user should know (a widened bf16 module)

    @property
    def base(self) -> Path:
        return self.path.parent

    def files_read(self) -> tuple[Path, ...]:
        """Every file this workload reads (config, model, data): no command may write over one."""
        files = [self.path, self.model]
        for spec in (self.calibration, self.search, self.test):
            if spec.npz is not None:
                files.append(Path(spec.npz))
            if spec.npy_dir is not None and Path(spec.npy_dir).is_dir():
                files += sorted(Path(spec.npy_dir).glob("*.npy"))
        return tuple(files)

    def allowed_drop(self, fp32_score: float) -> float:
        return self.max_drop * abs(fp32_score) if self.relative else self.max_drop


_ENTRY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
TOP_KEYS = {"name", "model", "target", "data", "metric", "max_drop", "search_space", "runtime"}


@as_kind(ConfigError)
def load_workload(path: str | Path | None) -> Workload:
    p = Path(path) if path is not None else DEFAULT_WORKLOAD
    doc = load_yaml(p, "config")
    if not isinstance(doc, dict):
        raise ConfigError(f"{p}: config must be a YAML mapping")
    check_keys(p, doc, TOP_KEYS, "")
    base = p.resolve().parent
    for key in ("model", "data", "metric", "max_drop"):
        if key not in doc:
            raise ConfigError(f"{p}: missing required key '{key}'")
    notes: tuple[str, ...] = ()
    if isinstance(doc["model"], dict):  # a PyTorch module factory: exported once, cached
        from qsearch.export import torch_model

        model, note = torch_model(p, doc["model"], base)
        notes = (note,) if note else ()
    else:
        model = _path(p, doc, "model", base)
    target = doc.get("target", "cpu")
    if target not in TARGETS:
        raise ConfigError(f"{where(p, doc, 'target')}: target {target!r} is not one of {', '.join(TARGETS)}")
    data = doc["data"]
    check_keys(p, data, {"calibration", "search", "test", "batch_size"}, "data")
    batch = _int(p, data, "batch_size", 64, 1)
    splits = {}
    for split in ("calibration", "search", "test"):
        if split not in data:
            raise ConfigError(f"{where(p, data)}: missing required key 'data.{split}'")
        splits[split] = _data_spec(p, data, split, base)
    metric = _metric(p, doc)
    if metric.name == "top1":
        for split in ("search", "test"):
            if splits[split].labels is None:
                raise ConfigError(f"{where(p, data, split)}: metric top1 needs 'labels' for data.{split}")
    max_drop, relative = _budget(p, doc)
    runtime = doc.get("runtime") or LinedDict()
    check_keys(p, runtime, {"threads", "latency_batch", "latency", "engine"}, "runtime")
    hook = runtime.get("latency")
    if hook is not None and not (isinstance(hook, str) and _ENTRY.fullmatch(hook)):
        raise ConfigError(f"{where(p, runtime, 'latency')}: runtime.latency must be a latency hook "
                          f"'package.module:function', not {hook!r}")
    engine = _engine(p, runtime)
    space = load_space(p, doc.get("search_space", "default"), base, "search_space", doc)
    space = _target_space(p, doc, runtime, space, target, engine, hook)
    return Workload(
        path=p, name=str(doc.get("name", model.stem)), model=model, calibration=splits["calibration"],
        search=splits["search"], test=splits["test"], metric=metric, max_drop=max_drop, relative=relative,
        target=target, space=space, batch_size=batch, threads=_int(p, runtime, "threads", 1, 0),
        latency_batch=_int(p, runtime, "latency_batch", 64, 1), notes=notes, latency=hook,
        latency_where=f"{where(p, runtime, 'latency')} (runtime.latency)" if hook else "", engine=engine,
    )


def _target_space(p: Path, doc: dict, runtime: dict, space: SearchSpace, target: str, engine: str,
                  hook: str | None) -> SearchSpace:
    """The search space as the target takes it: int16 layers (uint16 activations) need a target that
    runs them and an engine that scores them; on an NPU target without a latency hook the cost is
    bit-operations (this CPU's time, with Q/DQ unfused, says nothing about an NPU)."""
    if target in EXACT_TARGETS and not hook and space.objective == "latency":
        space = replace(space, objective="bitops")
    if "int16" not in space.precisions:
        return space
    if target not in WIDE_TARGETS:
        raise ConfigError(f"{where(p, doc, 'search_space')}: search_space.precision lists int16 (uint16 activations), "
                          f"which target {target!r} cannot run: set target: {' or '.join(WIDE_TARGETS)}")
    if engine != "onnxruntime":
        raise ConfigError(f"{where(p, runtime, 'engine')}: runtime.engine {engine} does not compute int16 layers' "
                          "uint16 Q/DQ as written; score them with onnxruntime (a latency hook may time the device)")
    return space


def _engine(p: Path, runtime: dict) -> str:
    """runtime.engine: a known engine, installed (else the extra that installs it). With a latency
    hook it scores accuracy and the hook times."""
    from qsearch.engine import ENGINE_EXTRAS, installed

    name = runtime.get("engine", "onnxruntime")
    if name not in ENGINE_EXTRAS:
        raise ConfigError(f"{where(p, runtime, 'engine')}: runtime.engine {name!r} is not one of "
                          f"{', '.join(ENGINE_EXTRAS)}")
    if not installed(name):
        raise ConfigError(f"{where(p, runtime, 'engine')}: runtime.engine {name} is not installed: "
                          f"pip install -c constraints.txt \"qsearch[{ENGINE_EXTRAS[name]}]\"")
    return name


def _path(p: Path, d: dict, key: str, base: Path) -> Path:
    v = d.get(key)
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{where(p, d, key)}: '{key}' must be a file path")
    return (base / v).resolve()


def _int(p: Path, d: dict, key: str, default: int, lo: int, hi: int = 2**31 - 1) -> int:
    """An integer in [lo, hi]: the upper bound keeps values inside what ORT, NumPy seeds and
    SQLite take (a seed of 2**32 or a batch of 10**30 would fail deep inside a stage)."""
    v = d.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ConfigError(f"{where(p, d, key)}: '{key}' must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _data_spec(p: Path, data: dict, split: str, base: Path) -> DataSpec:
    d = data[split]
    if isinstance(d, str):
        d = LinedDict({"npz": d} if d.endswith(".npz") else {"entry": d} if ":" in d else {"npy_dir": d})
        d.lines, d.line = {}, data.lines.get(split, 0) if isinstance(data, LinedDict) else 0
    check_keys(p, d, {"npz", "npy_dir", "entry", "labels", "limit"}, f"data.{split}")
    kinds = [k for k in ("npz", "npy_dir", "entry") if k in d]
    if len(kinds) != 1:
        raise ConfigError(f"{where(p, data, split)}: data.{split} needs exactly one of npz, npy_dir, entry")
    kind = kinds[0]
    if not isinstance(d[kind], str):
        raise ConfigError(f"{where(p, d, kind)}: data.{split}.{kind} must be a string")
    labels = d.get("labels")
    if labels is not None and not isinstance(labels, str):
        raise ConfigError(f"{where(p, d, 'labels')}: data.{split}.labels must be an array name")
    limit = _int(p, d, "limit", 0, 1) if "limit" in d else None
    return DataSpec(
        name=split, where=where(p, data, split),
        npz=(base / d["npz"]) if kind == "npz" else None,
        npy_dir=(base / d["npy_dir"]) if kind == "npy_dir" else None,
        entry=d["entry"] if kind == "entry" else None,
        labels=labels, limit=limit,
    )


def _metric(p: Path, doc: dict) -> MetricSpec:
    m = doc["metric"]
    if isinstance(m, str):
        if m not in METRICS:
            raise ConfigError(f"{where(p, doc, 'metric')}: metric {m!r} is not one of {', '.join(METRICS)} "
                               "(or {search: module:function, test: module:function})")
        return MetricSpec(m)
    check_keys(p, m, {"search", "test"}, "metric")
    if not all(isinstance(m.get(k), str) and ":" in m[k] for k in ("search", "test")):
        raise ConfigError(f"{where(p, doc, 'metric')}: a custom metric needs 'search' and 'test' entry points "
                           "('package.module:function')")
    return MetricSpec("custom", m["search"], m["test"])


def _budget(p: Path, doc: dict) -> tuple[float, bool]:
    v = doc["max_drop"]
    relative = isinstance(v, str) and v.strip().endswith("%")
    try:
        x = float(v.strip().rstrip("%")) if isinstance(v, str) else float(v)
    except (TypeError, ValueError):
        x = float("nan")
    if not x >= 0 or x == float("inf") or isinstance(v, bool):
        raise ConfigError(f"{where(p, doc, 'max_drop')}: max_drop must be a number >= 0 or a percentage like '1%', got {v!r}")
    return (x / 100.0, True) if relative else (x, False)


def _find_space(name: str, base: Path) -> Path | None:
    for cand in (base / name, base / f"{name}.yaml", *(d / f"{name}.yaml" for d in SPACES_DIRS)):
        if cand.is_file():
            return cand
    return None


SPACE_KEYS = {
    "extends", "candidates", "precision", "calibration", "granularity", "recovery", "weights", "percentile", "objective", "multi_objective",
    "sampler", "seed", "fix_below", "options_per_layer", "min_searched", "warm_start", "prune", "prune_fraction",
    "early_verdict", "stop_at_ceiling",
}


def load_space(p: Path, v: Any, base: Path, section: str = "search_space", parent: Any = None, depth: int = 0) -> SearchSpace:
    """A search space from a name, a file, or an inline mapping that may extend one of those."""
    if depth > 5:
        raise ConfigError(f"{p}: search_space 'extends' chain is too deep (a cycle?)")
    if isinstance(v, str):
        f = _find_space(v, base)
        if f is None:
            raise ConfigError(f"{where(p, parent, section)}: search space {v!r} not found (looked next to the config "
                               f"and in {SPACES_DIRS[0]})")
        doc = load_yaml(f, "search space")
        if isinstance(doc, dict) and "search_space" in doc and len(doc) == 1:
            doc = doc["search_space"]
        return load_space(f, doc if doc is not None else LinedDict(), f.parent, "search_space", None, depth + 1)
    if not isinstance(v, dict):
        raise ConfigError(f"{where(p, parent, section)}: '{section}' must be a name, a path or a mapping")
    check_keys(p, v, SPACE_KEYS, section)
    s = load_space(p, v["extends"], base, "extends", v, depth + 1) if "extends" in v else SearchSpace()
    kw: dict[str, Any] = {}
    if "candidates" in v:
        c = v["candidates"]
        check_keys(p, c, {"op_types", "include", "exclude"}, f"{section}.candidates")
        if "op_types" in c:
            kw["op_types"] = _choice_list(p, c, "op_types", LAYER_OPS, f"{section}.candidates")
        for key in ("include", "exclude"):
            if key in c:
                pats = c[key] if isinstance(c[key], list) else [c[key]]
                for pat in pats:
                    try:
                        re.compile(str(pat))
                    except re.error as exc:
                        raise ConfigError(f"{where(p, c, key)}: {section}.candidates.{key}: {pat!r} is not a valid "
                                           f"regular expression ({exc})") from None
                kw[key] = tuple(str(x) for x in pats)
    if "precision" in v:
        kw["precisions"] = _choice_list(p, v, "precision", ("int8", "int16", "float"), section)
        if "int16" in kw["precisions"] and "int8" not in kw["precisions"]:
            raise ConfigError(f"{where(p, v, 'precision')}: {section}.precision: int16 is searched beside int8 "
                              f"(each layer's int16 option widens its best int8 one): list int8 too")
    if "calibration" in v:
        kw["calibration"] = _choice_list(p, v, "calibration", METHODS, section)
    if "granularity" in v:
        kw["granularity"] = _choice_list(p, v, "granularity", GRANULARITIES, section)
    if "recovery" in v:
        got = _choice_list(p, v, "recovery", ("none", *techniques()), section)
        if "none" in got and len(got) > 1:
            raise ConfigError(f"{where(p, v, 'recovery')}: {section}.recovery: 'none' cannot be listed with "
                               f"techniques, got {list(got)}")
        kw["recovery"] = tuple(x for x in got if x != "none")
    if "weights" in v:
        kw["weights"] = tuple(dict.fromkeys(_choice_list(p, v, "weights", WEIGHT_CODES, section)))
    if "objective" in v:
        kw["objective"] = _one_of(p, v, "objective", OBJECTIVES, section)
    if "sampler" in v:
        kw["sampler"] = _one_of(p, v, "sampler", SAMPLERS, section)
    for key, lo, hi in (("percentile", 50.0, 100.0), ("fix_below", 0.0, 1.0), ("prune_fraction", 0.05, 1.0)):
        if key in v:
            x = v[key]
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not lo <= x <= hi:
                raise ConfigError(f"{where(p, v, key)}: {section}.{key} must be a number in [{lo}, {hi}], got {x!r}")
            kw[key] = float(x)
    for key in ("options_per_layer", "seed", "min_searched"):
        if key in v:
            kw[key] = _int(p, v, key, 0, 1 if key == "options_per_layer" else 0)
    for key in ("warm_start", "prune", "multi_objective", "early_verdict", "stop_at_ceiling"):
        if key in v:
            if not isinstance(v[key], bool):
                raise ConfigError(f"{where(p, v, key)}: {section}.{key} must be true or false")
            kw[key] = v[key]
    return replace(s, **kw)


def _choice_list(p: Path, d: dict, key: str, allowed: tuple[str, ...], section: str) -> tuple[str, ...]:
    v = d[key]
    items = v if isinstance(v, list) else [v]
    if not items:
        raise ConfigError(f"{where(p, d, key)}: {section}.{key} must not be empty")
    for x in items:
        if x not in allowed:
            raise ConfigError(f"{where(p, d, key)}: {section}.{key}: {x!r} is not one of {', '.join(allowed)}")
    return tuple(items)


def _one_of(p: Path, d: dict, key: str, allowed: tuple[str, ...], section: str) -> str:
    if d[key] not in allowed:
        raise ConfigError(f"{where(p, d, key)}: {section}.{key} is {d[key]!r}, expected one of {', '.join(allowed)}")
    return d[key]
