"""Safe file I/O shared by every stage: atomic writes and YAML that remembers line numbers."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from qsearch.errors import QsearchError

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename: readers never see half a file."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as exc:
        raise QsearchError(f"{p}: cannot write output ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are shared like any other file
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class OutputSet:
    """The files that make up one command's result, written to a staging folder inside `out` and
    moved into place together by `commit()` with SIGINT/SIGTERM held back for those few renames:
    an interrupt leaves the previous set or the new one, never plan.yaml of one run beside the
    model of another. Members the new set lacks are removed (a stale plan.yaml next to a new
    closest/ would contradict it)."""

    def __init__(self, out: str | os.PathLike, names: tuple[str, ...]):
        self.out, self.names = Path(out), names
        self.out.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.out))

    def path(self, name: str) -> Path:
        if name.split("/")[0] not in self.names:
            raise ValueError(f"{name} is not part of this output set")
        return self.dir / name

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)  # after commit it is empty; after an error, discarded

    def commit(self) -> None:
        import signal

        held = {signal.SIGINT, signal.SIGTERM}
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            old = self.dir / ".replaced"
            old.mkdir()
            for name in self.names:
                src, dst = self.dir / name, self.out / name
                if dst.is_dir() and not dst.is_symlink():
                    os.replace(dst, old / name)  # a rename: the folder's removal waits till after
                elif dst.exists() or dst.is_symlink():
                    dst.unlink()
                if src.exists():
                    os.replace(src, dst)
        except OSError as exc:
            raise QsearchError(f"{self.out}: cannot move the results into place ({exc.strerror or exc})") from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def save_figure(fig, path: str | os.PathLike) -> None:
    """A matplotlib figure as PNG, atomically (several workers may write the same report)."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def ensure_writable_dir(path: str | os.PathLike, what: str, create: bool = True) -> None:
    """Fail before the work, not after it: create the folder and prove a file can be made there.
    With create=False, prove it could be made (its nearest existing folder is writable) without
    making it, so a command that fails later leaves no empty folder behind."""
    p = Path(path)
    if not create:
        probe = p
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if probe.exists() and not probe.is_dir():
            raise QsearchError(f"{what} {p}: not a writable folder ({probe} is a file)")
        p = probe
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".qsearch-probe-", dir=p)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise QsearchError(f"{what} {p}: not a writable folder ({exc.strerror or exc})") from None


def ensure_writable_file(path: str | os.PathLike, what: str, inputs: tuple = ()) -> None:
    """A file we may write: not a folder, in a writable folder, and none of the command's
    `inputs` (writing the result over the user's model or plan would destroy the source)."""
    p = Path(path)
    if p.is_dir():
        raise QsearchError(f"{what} {p}: is a folder, expected a file path")
    for src in inputs:
        if src is not None and Path(src).exists() and p.exists() and os.path.samefile(p, src):
            raise QsearchError(f"{what} {p}: is an input of this command ({src}); write the result elsewhere")
    try:
        ensure_writable_dir(p.parent, what, create=False)  # folders are made when the file is written
    except QsearchError:
        raise QsearchError(f"{what} {p}: cannot write there ({p.parent} is not a writable folder)") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


class LinedDict(dict):
    """A YAML mapping that knows the line of each key, so errors can point at it."""

    lines: dict[str, int]
    line: int


MAX_DEPTH = 50  # nesting a config or plan never needs; ~400 levels overflow Python's recursion


class _Loader(yaml.SafeLoader):
    """No aliases: a few hundred bytes of nested `*ref`s expand to gigabytes when a value is
    printed or walked (a "billion laughs"), and a config or plan never needs them. Nesting is
    bounded, so a few hundred bytes of `[[[[...` are an error, not a RecursionError."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"aliases are not allowed (*{event.anchor})",
                                              event.start_mark)
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LinedDict:
    loader.flatten_mapping(node)
    d = LinedDict()
    d.lines = {}
    d.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):  # `? [a, b]`: no key of a config or plan is one
            raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a plain value, not a "
                                                    "list or mapping", key_node.start_mark)
        key = loader.construct_object(key_node, deep=True)
        if key in d:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        d[key] = loader.construct_object(value_node, deep=True)
        d.lines[key] = key_node.start_mark.line + 1
    return d


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

if getattr(yaml, "__with_libyaml__", False):
    class _FastLoader(yaml.CSafeLoader):
        """libyaml's parser (a 10,000-layer plan loads in about a second, not six); aliases and
        depth are refused by `_prescan` first, since the C composer cannot be overridden. Tag
        resolution (regexes per scalar) is memoized: a plan repeats the same few words."""

        _plain: dict = {}  # plain scalar -> tag: with no path resolvers, a plain scalar's tag is its value's

        def resolve(self, kind, value, implicit, _scalar=yaml.ScalarNode, _str="tag:yaml.org,2002:str"):
            if kind is not _scalar:
                return super().resolve(kind, value, implicit)
            if not implicit[0]:  # quoted: a string
                return _str
            tag = self._plain.get(value)
            if tag is None:
                tag = super().resolve(kind, value, implicit)
                if len(self._plain) < 200_000:
                    self._plain[value] = tag
            return tag

    _FastLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
else:  # pragma: no cover - PyYAML built without libyaml
    _FastLoader = None


def _prescan(text: str) -> None:
    """What `_Loader.compose_node` refuses, checked on libyaml's event stream: aliases, deep nesting."""
    depth = 0
    for ev in yaml.parse(text, Loader=yaml.CSafeLoader):
        if isinstance(ev, yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, f"aliases are not allowed (*{ev.anchor})", ev.start_mark)
        if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep",
                                                  ev.start_mark)
        elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def load_yaml(path: str | os.PathLike, what: str = "YAML file") -> Any:
    """Safe-load YAML (no Python objects) with line-aware mappings; one-line errors."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QsearchError(f"{p}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise QsearchError(f"{p}: cannot read {what}: {exc}") from None
    try:
        if _FastLoader is None:
            return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader derives from SafeLoader
        from qsearch import yamlread

        try:
            return yamlread.load(text, LinedDict, MAX_DEPTH)  # one pass over libyaml's events
        except yamlread.Unusual:  # merge keys, tagged collections: the full loader
            pass
        _prescan(text)
        return yaml.load(text, Loader=_FastLoader)  # noqa: S506 - _FastLoader derives from CSafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise QsearchError(f"{p}:{where.split()[-1]}: YAML error: {problem}") from None


def where(path: str | os.PathLike, mapping: Any, key: str | None = None) -> str:
    """'file:line' for a key of a loaded mapping (or the mapping itself)."""
    line = None
    if isinstance(mapping, LinedDict):
        line = mapping.lines.get(key) if key is not None else mapping.line
    return f"{path}:{line}" if line else str(path)


def check_keys(path: str | os.PathLike, mapping: Any, allowed: set[str], section: str) -> None:
    if not isinstance(mapping, dict):
        raise QsearchError(f"{where(path, mapping)}: '{section}' must be a mapping")
    for key in mapping:
        if key not in allowed:
            raise QsearchError(
                f"{where(path, mapping, key)}: unknown key '{section + '.' if section else ''}{key}'"
                f" (expected one of: {', '.join(sorted(allowed))})"
            )
