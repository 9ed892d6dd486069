"""Lazy re-exports for the stage packages (PEP 562): `qsearch.plan.Plan` works as before, and
importing one module of a package never imports its siblings (so no package-level import cycle
can form through an `__init__`)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy(package: str, exports: Mapping[str, tuple[str, ...]]) -> tuple[list[str], Callable, Callable]:
    """(`__all__`, `__getattr__`, `__dir__`) for a package re-exporting `exports` (module -> names)."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str):
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    def __dir__() -> list[str]:
        return sorted(where)

    return sorted(where), __getattr__, __dir__
