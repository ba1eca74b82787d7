"""Lazy re-exports for the public namespaces (after spatialdata's ``_LAZY_IMPORTS``).

Each namespace maps its public names to the private module that defines them; the module is imported on first
access, which keeps ``import stpred.pp`` free of torch, lightning and squidpy until they are needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping


def attach(package: str, names: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """Return ``__getattr__``, ``__dir__`` and ``__all__`` for ``package`` exporting ``names`` (name → submodule)."""

    def __getattr__(name: str) -> Any:
        if name in names:
            module = importlib.import_module(f"{package}.{names[name]}")
            value = getattr(module, name)
            setattr(importlib.import_module(package), name, value)
            return value
        msg = f"module {package!r} has no attribute {name!r}"
        raise AttributeError(msg)

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__, sorted(names)
