"""SGLang plugin: makes ``--attention-backend twilight`` exist in every SGLang process.

Entry point (pyproject.toml): group ``sglang.srt.plugins``, name ``twilight``, value
``sglang_twilight.plugin:register``. SGLang 0.5.17's ``sglang.srt.plugins.load_plugins()``
calls ``ep.load()()`` — the function with no arguments — in the launcher, in
``Engine.__init__``, in ``Engine._launch_subprocesses`` and first thing in every scheduler
process (spawned, so nothing patched in the parent survives there). It logs and swallows
exceptions from a plugin, then runs ``HookRegistry.apply_hooks()``.

``register()`` is idempotent: it may run several times in one process (entry point and
launcher both call it).
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

BACKEND_NAME = "twilight"
ENTRY_POINT_GROUP = "sglang.srt.plugins"
ENTRY_POINT_NAME = "twilight"

_SERVER_ARGS_POST_INIT = "sglang.srt.server_args.ServerArgs.__post_init__"
_hook_registered = False


def create_twilight_backend(runner: Any) -> Any:
    """Attention-backend factory handed to SGLang's registry: called by the model runner
    (in the scheduler process) with the ``ModelRunner``."""
    from sglang_twilight.backend import TwilightAttnBackend

    return TwilightAttnBackend(runner)


def _uses_twilight(server_args: Any) -> bool:
    return BACKEND_NAME in (
        getattr(server_args, "attention_backend", None),
        getattr(server_args, "decode_attention_backend", None),
        getattr(server_args, "prefill_attention_backend", None),
    )


def _server_args_post_init_hook(original_fn, self, *args, **kwargs):
    """AROUND hook on ``ServerArgs.__post_init__``.

    With the twilight backend chosen and no ``--page-size`` given, sets ``page_size`` to
    the Twilight page size before SGLang resolves its arguments — the same as passing
    ``--page-size`` — so that plain ``python -m sglang.launch_server --attention-backend
    twilight`` gets the page size the sidecar is indexed by. A different explicit
    ``--page-size``, or one changed during resolution, is an error.
    """
    if not _uses_twilight(self):
        return original_fn(self, *args, **kwargs)

    from sglang_twilight.config import FLAGS, get_config

    cfg = get_config()
    allowed = (
        f"{cfg.page_size}, the Twilight page size ({FLAGS['page_size']}); "
        "leave --page-size out to get it"
    )
    if self.page_size is None:
        self.page_size = cfg.page_size
    elif self.page_size != cfg.page_size:
        raise ValueError(f"--page-size: invalid value {self.page_size} (allowed: {allowed})")
    result = original_fn(self, *args, **kwargs)
    if self.page_size != cfg.page_size:
        raise ValueError(
            f"--page-size: SGLang resolved it to {self.page_size} for this model/backend "
            f"setup (allowed with the twilight backend: {allowed})"
        )
    return result


def register() -> None:
    """Register the ``twilight`` attention backend and its ``--attention-backend`` choice,
    and the page-size hook on ``ServerArgs``. Safe to call any number of times."""
    global _hook_registered

    from sglang_twilight.srt_patches import check_sglang_version

    check_sglang_version()

    from sglang.srt.layers.attention.attention_registry import (
        ATTENTION_BACKENDS,
        register_attention_backend,
    )
    from sglang.srt.server_args import (
        ATTENTION_BACKEND_CHOICES,
        add_attention_backend_choices,
    )

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    if ATTENTION_BACKENDS.get(BACKEND_NAME) is not create_twilight_backend:
        # register_attention_backend(name) returns a decorator
        register_attention_backend(BACKEND_NAME)(create_twilight_backend)

    if not _hook_registered:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        # Applied by load_plugins() right after all plugins ran (never apply here: that
        # would mark the target patched before other plugins registered their hooks).
        HookRegistry.register(
            _SERVER_ARGS_POST_INIT, _server_args_post_init_hook, HookType.AROUND
        )
        _hook_registered = True
    from sglang_twilight.srt_patches import graph_variants, pool_sizing

    pool_sizing.register()  # the sidecar counted in the KV pool budget (idempotent)
    graph_variants.register()  # dense and sparse decode graphs for --twilight-dispatch auto

    # per-request p (custom_params["top_p_attn"]): HTTP 400 on a bad value, device table
    # written at admission (idempotent)
    from sglang_twilight.srt_patches.request_top_p import register_hooks

    register_hooks()
    logger.debug("sglang-twilight: attention backend %r registered", BACKEND_NAME)


def is_registered() -> bool:
    """True if this process knows the twilight backend (choice and factory)."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES

    return BACKEND_NAME in ATTENTION_BACKEND_CHOICES and BACKEND_NAME in ATTENTION_BACKENDS


def entry_point_installed() -> bool:
    """True if the ``sglang.srt.plugins`` entry point is installed (so spawned SGLang
    processes will load the plugin). Does not import SGLang."""
    from importlib.metadata import entry_points

    return any(
        ep.name == ENTRY_POINT_NAME and ep.value.startswith(__name__ + ":")
        for ep in entry_points(group=ENTRY_POINT_GROUP)
    )


__all__ = [
    "BACKEND_NAME",
    "create_twilight_backend",
    "entry_point_installed",
    "is_registered",
    "register",
]
