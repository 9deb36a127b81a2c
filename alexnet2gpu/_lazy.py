"""Public names that load their module on first use (PEP 562's module ``__getattr__``).

The packages use it so that importing one (or a torch-free module in it, such as
``alexnet2gpu.models.names``) loads no torch: ``alexnet2gpu --help`` and a refused flag
answer at once, and ``from alexnet2gpu.models import build_model`` works as before.
The submodules named here are the package's own, so import-linter's layers see every
import that crosses a package where it is written, inside those submodules.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

__all__ = ["lazy_getattr"]


def lazy_getattr(package: str, names: dict[str, tuple[str, ...]]) -> Callable[[str], object]:
    """A ``__getattr__`` for ``package``: each name in ``names`` (relative submodule ->
    the names it defines) is imported from its submodule when first asked for, and kept."""
    where = {name: module for module, defined in names.items() for name in defined}

    def __getattr__(name: str) -> object:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
