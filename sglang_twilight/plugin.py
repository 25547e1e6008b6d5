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

from sglang_twilight.config import BACKEND_NAME

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "sglang.srt.plugins"
ENTRY_POINT_NAME = "twilight"


def create_twilight_backend(runner: Any) -> Any:
    """Attention-backend factory handed to SGLang's registry: called by the model runner
    (in the scheduler process) with the ``ModelRunner``."""
    from sglang_twilight.backend import TwilightAttnBackend

    return TwilightAttnBackend(runner)


def register() -> None:
    """Register the ``twilight`` attention backend and its ``--attention-backend`` choice,
    and SGLang's hooks in ``srt_patches`` (each registered once; ``load_plugins()`` applies
    them). Safe to call any number of times."""

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

    from sglang_twilight.srt_patches import graph_variants, pool_sizing, server_args, shared_prefix

    server_args.register()  # the Twilight page size as SGLang's page size
    pool_sizing.register()  # the sidecar counted in the KV pool budget (idempotent)
    graph_variants.register()  # dense and sparse decode graphs for --twilight-dispatch auto
    shared_prefix.register()  # a decode step's shared prefix tokens, for the cost model

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
