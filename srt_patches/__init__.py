"""Every touch of SGLang internals lives in this package, one small module each.

Installed as ``sglang_twilight.srt_patches``. The patches are written against exactly one
SGLang release; :func:`check_sglang_version` guards them.
"""

from __future__ import annotations

import os

SGLANG_VERSION = "0.5.17"

# Escape hatch for trying another SGLang release on purpose (unsupported).
SKIP_CHECK_ENV = "SGLANG_TWILIGHT_SKIP_VERSION_CHECK"


class SGLangVersionError(RuntimeError):
    """The installed SGLang is not the release these patches were written for."""


def installed_sglang_version() -> str | None:
    """Version of the installed ``sglang`` distribution, read from its metadata
    (does not import sglang); ``None`` if it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sglang")
    except PackageNotFoundError:
        return None


def check_sglang_version() -> str:
    """Return the installed SGLang version; raise SGLangVersionError (one line naming the
    installed and the supported version) unless it is ``SGLANG_VERSION``."""
    installed = installed_sglang_version()
    if installed is None:
        raise SGLangVersionError(
            f"sglang is not installed; sglang-twilight supports sglang=={SGLANG_VERSION} "
            f"(pip install 'sglang=={SGLANG_VERSION}')"
        )
    public = installed.split("+", 1)[0]
    if public != SGLANG_VERSION and os.environ.get(SKIP_CHECK_ENV, "") not in ("1", "true"):
        raise SGLangVersionError(
            f"sglang {installed} is installed, but sglang-twilight supports only "
            f"sglang=={SGLANG_VERSION} (pip install 'sglang=={SGLANG_VERSION}', or set "
            f"{SKIP_CHECK_ENV}=1 to try anyway)"
        )
    return installed


_registered: set = set()  # the patch modules whose hooks are registered in this process


def register_once(owner: str, hooks) -> None:
    """Register ``hooks``, ``(target, function, kind)`` with ``kind`` a ``HookType`` name
    ("BEFORE", "AFTER", "AROUND"), with SGLang's ``HookRegistry``, once per process for
    ``owner`` (the patch module). Never applies them: ``load_plugins()`` does, right after every
    plugin ran (applied here, a target would be marked patched before other plugins registered
    their hooks)."""
    if owner in _registered:
        return
    check_sglang_version()
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for target, fn, kind in hooks:
        HookRegistry.register(target, fn, getattr(HookType, kind))
    _registered.add(owner)


__all__ = ["SGLANG_VERSION", "SGLangVersionError", "check_sglang_version",
           "installed_sglang_version", "register_once"]
