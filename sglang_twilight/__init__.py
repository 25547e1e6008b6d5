"""sglang-twilight: Twilight budget-adaptive sparse decode attention inside SGLang.

Importing this package is cheap (no torch, no SGLang): submodules load on first use, e.g.
``sglang_twilight.ops`` or ``sglang_twilight.config``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# submodules reachable as attributes without an explicit import
_LAZY_SUBMODULES = frozenset(
    {"backend", "config", "kernels", "launch_server", "ops", "plugin", "srt_patches"}
)

if TYPE_CHECKING:  # pragma: no cover
    from . import config, ops, plugin  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY_SUBMODULES)


__all__ = ["__version__"]
