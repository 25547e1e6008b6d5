"""Count the Twilight sidecar in SGLang's KV memory budget.

SGLang 0.5.17 sizes the KV pool as ``available_bytes // cell_size`` tokens, where ``cell_size``
(bytes per token over all local layers) comes from
``DefaultPoolConfigurator._compute_cell_size(self, kvc, num_layers)``
(``model_executor/pool_configurator.py:183-315``, called once from ``__init__`` at ``:134``).
The twilight backend attaches a sidecar (int4 K + Quest page bounds) per KV slot of every sparse
layer right after the pool is built; unless ``cell_size`` includes it, the pool takes the memory the
sidecar then needs and the server OOMs under load.

This module registers an AFTER hook on that method (through SGLang's own ``HookRegistry``, applied
by ``load_plugins()`` in every process, the scheduler included) that adds
``TwilightSidecarPool.bytes_per_token(...)`` -- the one formula, also what the sidecar allocates --
when the twilight backend is selected. Other backends: unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

TARGET = (
    "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size"
)

_registered = False
_logged = False


def _uses_twilight(server_args: Any) -> bool:
    from sglang_twilight.plugin import BACKEND_NAME

    return BACKEND_NAME in (
        getattr(server_args, "attention_backend", None),
        getattr(server_args, "decode_attention_backend", None),
        getattr(server_args, "prefill_attention_backend", None),
    )


def sidecar_bytes_per_token(kvc: Any, cfg: Any = None) -> int:
    """Sidecar bytes per KV slot for the layers this rank holds, given SGLang's
    ``KVCacheConfigurator`` ``kvc``; 0 when the twilight backend is not in use (or for a draft
    worker, an MLA model: pools the sidecar is never attached to)."""
    server_args = getattr(kvc, "server_args", None)
    if server_args is None or not _uses_twilight(server_args):
        return 0
    if getattr(kvc, "is_draft_worker", False) or getattr(kvc, "use_mla_backend", False):
        return 0
    from sglang.srt.runtime_context import get_parallel

    from sglang_twilight.sidecar import TwilightSidecarPool, sparse_layer_ids

    if cfg is None:
        from sglang_twilight.config import get_config

        cfg = get_config()
    mc = kvc.model_config
    heads = mc.get_num_kv_heads(get_parallel().attn_tp_size)
    info = kvc.layer_info
    n_sparse = len(sparse_layer_ids(range(info.start_layer, info.end_layer), cfg.dense_layers))
    return TwilightSidecarPool.bytes_per_token(heads, mc.head_dim, cfg.page_size, n_sparse)


def after_compute_cell_size(result: int, self: Any, kvc: Any, *args: Any, **kwargs: Any) -> int:
    """AFTER hook: ``cell_size + sidecar bytes per token``."""
    global _logged
    extra = sidecar_bytes_per_token(kvc)
    if extra and not _logged:
        _logged = True
        logger.info(
            "sglang-twilight: KV budget counts the sidecar: %d + %d bytes per token (+%.1f%%)",
            result, extra, 100.0 * extra / max(result, 1))
    return result + extra


def register() -> None:
    """Register the hook (idempotent). Applied by ``HookRegistry.apply_hooks()``, which
    ``load_plugins()`` runs right after the plugins."""
    global _registered
    if _registered:
        return
    from sglang_twilight.srt_patches import check_sglang_version

    check_sglang_version()
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, after_compute_cell_size, HookType.AFTER)
    _registered = True


__all__ = ["TARGET", "after_compute_cell_size", "register", "sidecar_bytes_per_token"]
