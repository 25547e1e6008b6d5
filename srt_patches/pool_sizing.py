"""Count the Twilight sidecar and the decode workspace in SGLang's KV memory budget.

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

The decode workspace (``ops.DecodeWorkspace``, one per attention backend, about
``$SGLANG_TWILIGHT_WORKSPACE_MB`` MiB = 512 at most) is a fixed amount, not per token. SGLang takes
fixed allocations out of the bytes it profiles for the KV pool before dividing by ``cell_size``:
the mamba state cache is subtracted inside ``KVCacheConfigurator._profile_available_bytes``
(``mem_cache/kv_cache_configurator.py:1614-1657``, via ``_handle_max_mamba_cache``; the
``DefaultPoolConfigurator`` of plain MHA models has no bias term of its own). A second AFTER hook,
on ``_profile_available_bytes``, subtracts the workspace the same way. Without it the workspace,
allocated after the pool (when the decode CUDA graphs are set up, or at the first eager decode
step with graphs off), comes out of the ``1 - --mem-fraction-static`` slack that SGLang keeps for
activations, and a full batch can run out of memory mid-serving.
"""

from __future__ import annotations

import logging
from typing import Any

from sglang_twilight.config import round_to_pages, uses_twilight

logger = logging.getLogger(__name__)

TARGET = (
    "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size"
)
RESERVE_TARGET = (
    "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._profile_available_bytes"
)

#: the most requests per scheduler SGLang 0.5.17 sizes the request pool for when
#: --max-running-requests is not given (``KVCacheConfigurator.resolve_max_num_reqs``)
SGLANG_AUTO_MAX_REQS = 4096

_logged = False
_logged_reserve = False


def _twilight_config(kvc: Any, cfg: Any = None) -> Any:
    """The Twilight config when the KV pool SGLang's ``KVCacheConfigurator`` ``kvc`` sizes gets
    a sidecar and a decode workspace, else None: the twilight backend is not in use, or the pool
    is a draft worker's or an MLA model's (the sidecar is never attached to those)."""
    server_args = getattr(kvc, "server_args", None)
    if server_args is None or not uses_twilight(server_args):
        return None
    if getattr(kvc, "is_draft_worker", False) or getattr(kvc, "use_mla_backend", False):
        return None
    if cfg is None:
        from sglang_twilight.config import get_config

        cfg = get_config()
    return cfg


def sidecar_bytes_per_token(kvc: Any, cfg: Any = None) -> int:
    """Sidecar bytes per KV slot for the layers this rank holds, given SGLang's
    ``KVCacheConfigurator`` ``kvc``; 0 where :func:`_twilight_config` says no sidecar."""
    cfg = _twilight_config(kvc, cfg)
    if cfg is None:
        return 0
    from sglang.srt.runtime_context import get_parallel

    from sglang_twilight.sidecar import TwilightSidecarPool, sparse_layer_ids

    mc = kvc.model_config
    heads = mc.get_num_kv_heads(get_parallel().attn_tp_size)
    info = kvc.layer_info
    n_sparse = len(sparse_layer_ids(range(info.start_layer, info.end_layer), cfg.dense_layers))
    return TwilightSidecarPool.bytes_per_token(heads, mc.head_dim, cfg.page_size, n_sparse)


def backends_per_process(server_args: Any) -> int:
    """Attention backends SGLang 0.5.17 builds in one scheduler process, each with its own decode
    workspace (``model_runner_components/attention_backend_setup.py``): PD-multiplexing one plus
    one per SM group, two-batch overlap a primary and two children, else one."""
    if getattr(server_args, "enable_pdmux", False):
        return 1 + int(getattr(server_args, "sm_group_num", 0) or 0)
    if getattr(server_args, "enable_two_batch_overlap", False):
        return 3
    return 1


def eager_rows_bound(server_args: Any) -> int:
    """At least the rows of the largest decode batch a twilight backend is built for: the
    FlashInfer parent sizes its per-batch buffers (and the backend its eager workspace) for
    ``get_cuda_graph_max_batch_size(server_args, req_to_token_pool.size)``, and the request pool
    has ``resolve_max_num_reqs(...)`` rows, at most ``max(4096, --max-running-requests)``. Known
    before the pool size is (which it depends on), so an upper bound."""
    from sglang.srt.utils.common import get_cuda_graph_max_batch_size

    reqs = max(SGLANG_AUTO_MAX_REQS, int(getattr(server_args, "max_running_requests", 0) or 0))
    return int(get_cuda_graph_max_batch_size(server_args, reqs))


def workspace_reserve_bytes(kvc: Any, cfg: Any = None, num_sms: Any = None) -> int:
    """Bytes the decode workspaces of this scheduler process will take, given SGLang's
    ``KVCacheConfigurator`` ``kvc``: per backend, the workspace of
    ``workspace_rows(eager_rows_bound(...))`` rows (capped by ``$SGLANG_TWILIGHT_WORKSPACE_MB``, as
    the backend caps it) on this GPU's SM count. 0 when the twilight backend is not in use, for a
    draft worker or an MLA model, and when no layer decodes sparsely."""
    cfg = _twilight_config(kvc, cfg)
    if cfg is None:
        return 0
    server_args = kvc.server_args
    from sglang.srt.mem_cache.allocation_sizing import get_req_to_token_extra_context_len
    from sglang.srt.runtime_context import get_parallel

    from sglang_twilight.backend import workspace_bytes, workspace_rows
    from sglang_twilight.sidecar import sparse_layer_ids

    info = kvc.layer_info
    if not sparse_layer_ids(range(info.start_layer, info.end_layer), cfg.dense_layers):
        return 0
    mc = kvc.model_config
    tp = get_parallel().attn_tp_size
    num_q, num_kv = mc.num_attention_heads // tp, mc.get_num_kv_heads(tp)
    # the backend's geometry: req_to_token's width, and its candidate capacity
    max_context = int(mc.context_len) + int(get_req_to_token_extra_context_len(server_args))
    page = int(cfg.page_size)
    budget = round_to_pages(max_context, page) if cfg.selector == "none" else cfg.capacity
    geo = (num_kv, num_q // num_kv, int(mc.head_dim), budget, max_context, page)
    if num_sms is None:
        num_sms = _num_sms(kvc)
    rows = workspace_rows(eager_rows_bound(server_args), *geo)
    return backends_per_process(server_args) * workspace_bytes(rows, *geo, num_sms=num_sms)


def _num_sms(kvc: Any):
    import torch

    if str(getattr(kvc, "device", "")) == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(int(kvc.gpu_id or 0)).multi_processor_count
    return None  # workspace_bytes' own sizing (8 SMs, what a CPU allocation gets)


def after_profile_available_bytes(result: int, self: Any, *args: Any, **kwargs: Any) -> int:
    """AFTER hook: the KV pool's byte budget less the decode workspaces."""
    global _logged_reserve
    reserve = workspace_reserve_bytes(self)
    if not reserve:
        return result
    if not _logged_reserve:
        _logged_reserve = True
        logger.info(
            "sglang-twilight: KV budget reserves %.1f MiB for the decode workspace "
            "(%d backend(s)); %.1f MiB left for the KV pool",
            reserve / (1 << 20), backends_per_process(self.server_args),
            max(0, result - reserve) / (1 << 20))
    return max(0, int(result) - reserve)


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
    from sglang_twilight.srt_patches import register_once

    register_once(__name__, [(TARGET, after_compute_cell_size, "AFTER"),
                             (RESERVE_TARGET, after_profile_available_bytes, "AFTER")])


__all__ = [
    "RESERVE_TARGET",
    "TARGET",
    "after_compute_cell_size",
    "after_profile_available_bytes",
    "backends_per_process",
    "eager_rows_bound",
    "register",
    "sidecar_bytes_per_token",
    "workspace_reserve_bytes",
]
