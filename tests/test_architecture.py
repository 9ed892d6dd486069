"""The layout is the architecture: no import cycle among qsearch's modules (imports inside
functions and under TYPE_CHECKING count), and stage code imports concrete modules, never a
package's lazy re-exports."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "qsearch"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every qsearch module this file imports, anywhere in it (`from pkg import mod` is `pkg.mod`)."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("qsearch")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("qsearch"):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in modules else base)
    return {m for m in out if m in modules and m != me}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) for m, p in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, if any (iterative DFS with colours)."""
    colour = dict.fromkeys(graph, 0)
    for root in sorted(graph):
        if colour[root]:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        colour[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour[child] == 1:
                return path[path.index(child):] + [child]
            elif colour[child] == 0:
                colour[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_no_import_cycle():
    graph = _graph()
    assert len(graph) > 40 and graph["qsearch.cli"]  # the parser sees the real tree
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_stage_code_never_imports_a_lazy_package():
    """Re-exports are for users and experiments; inside qsearch an import names the module that
    holds the thing, so importing one stage never drags in another's siblings."""
    lazy = {m for m, p in _modules().items() if p.name == "__init__.py" and "lazy(__name__" in p.read_text()}
    assert {"qsearch.plan", "qsearch.search", "qsearch.model"} <= lazy
    offenders = sorted(f"{m} imports {dep}" for m, deps in _graph().items() for dep in deps & lazy)
    assert not offenders, offenders
