"""Lazy package exports (PEP 562), so importing a light module never loads torch or diffusers.

``from huvidpo.training import run_dpo`` still works: the package resolves the name on first use by
importing the module that defines it. Packages list their exports under ``TYPE_CHECKING`` too, so
type checkers and editors see them as ordinary imports.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose ``exports`` map a public name to the submodule
    (relative to the package, e.g. ``"dpo"``) that defines it."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        # cached on the package: the next lookup is an ordinary attribute read
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(importlib.import_module(package)), *exports})

    return __getattr__, __dir__
