"""The Twilight sidecar pool: int4 keys and Quest page bounds beside SGLang's KV pool.

Indexed exactly like the KV pool it sits beside:

* per token slot ``s`` (same index as ``k_buffer[s]``): ``kq[s]`` (int4 K, two nibbles a byte),
  ``kscale[s]`` / ``kzero[s]`` (fp16, per KV head);
* per physical page ``s // page_size``: ``kmax`` / ``kmin`` (Quest bounds: int8 codes) and their
  fp32 scale ``kbscale`` (one per page and KV head, ``store.quantize_bounds_ref``).

Because the radix cache shares whole pages of slots between requests and the paged allocator
hands out whole pages that one request fills in order, a request that hits a cached prefix reads
the prefix's sidecar rows as they are (no work), and a page that is freed and handed out again is
rewritten (int4 rows and bounds) by the next :meth:`TwilightSidecarPool.write` of its new owner.

Only layers that decode sparsely (``layer_id >= dense_layers``) get buffers. The one place that
computes the sidecar's size is :meth:`TwilightSidecarPool.bytes_per_token`; the KV pool budget
(SGLang's per-token ``cell_size``) must add it so the KV pool shrinks by what the sidecar takes.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Dict, Iterable, List, Optional

import torch

from sglang_twilight import ops
from sglang_twilight.kernels import store as store_k
from sglang_twilight.kernels.store import bounds_buffers, code_buffer, scale_zero_buffers
from sglang_twilight.ops import SidecarLayer

#: attribute under which :func:`attach_sidecar` stores the sidecar on the KV pool object
POOL_ATTR = "twilight_sidecar"


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class TwilightSidecarPool:
    """Int4 keys + Quest page bounds for the sparse layers of one SGLang KV pool.

    Args:
        num_slots: rows of the KV pool's per-layer ``k_buffer`` (SGLang 0.5.17:
            ``size + page_size``, the first page being the padding page that dummy tokens of
            padded CUDA-graph batches write to).
        head_num: KV heads of this rank (``MHATokenToKVPool.head_num``).
        head_dim: ``MHATokenToKVPool.head_dim``.
        dtype: the KV dtype (``MHATokenToKVPool.dtype``), for the record: the bounds are int8
            codes with an fp32 scale whatever it is.
        sparse_layer_ids: global layer ids that get a sidecar (layers >= dense_layers).
        page_size: SGLang's page size = Quest page.
        device: where the buffers live.
        kv_pool: the KV pool whose ``get_key_buffer(layer_id)`` :meth:`write` reads; may be set
            later with :meth:`bind`. Given here, the buffers are allocated in its memory region
            (:func:`kv_cache_region`: released and resumed with the KV cache under
            ``--enable-memory-saver``).
    """

    def __init__(
        self,
        num_slots: int,
        head_num: int,
        head_dim: int,
        dtype: torch.dtype,
        sparse_layer_ids: Iterable[int],
        page_size: int,
        device: Any,
        kv_pool: Any = None,
    ):
        if head_dim % 2:
            raise ValueError(f"TwilightSidecarPool: head_dim must be even, got {head_dim}")
        if page_size < 1:
            raise ValueError(f"TwilightSidecarPool: page_size must be >= 1, got {page_size}")
        layer_ids = sorted(set(int(x) for x in sparse_layer_ids))
        if layer_ids and layer_ids[0] < 0:
            raise ValueError(f"TwilightSidecarPool: negative layer id in {layer_ids}")
        self.num_slots = int(num_slots)
        self.num_pages = _ceil_div(self.num_slots, page_size)
        self.head_num = int(head_num)
        self.head_dim = int(head_dim)
        self.dtype = dtype
        self.page_size = int(page_size)
        self.device = torch.device(device)
        self.sparse_layer_ids: List[int] = layer_ids
        self.kv_pool = kv_pool

        S, H, D, NP = self.num_slots, self.head_num, self.head_dim, self.num_pages
        self._layers: Dict[int, SidecarLayer] = {}
        with kv_cache_region(kv_pool):
            for lid in layer_ids:
                kscale, kzero = scale_zero_buffers(S, H, self.device)
                kmax, kmin, kbscale = bounds_buffers(NP, H, D, self.device)
                self._layers[lid] = SidecarLayer(
                    layer_id=lid,
                    kq=code_buffer(S, H, D, self.device),
                    kscale=kscale,
                    kzero=kzero,
                    kmax=kmax,
                    kmin=kmin,
                    kbscale=kbscale,
                )
        # rows written per layer (host-side count of eager writes; see write())
        self._rows_written: Dict[int, int] = {lid: 0 for lid in layer_ids}
        # the sparse layers' buffer addresses for write_all's one launch (built at first use)
        self._addresses: Optional[store_k.LayerAddresses] = None

    # ------------------------------------------------------------------ size

    @staticmethod
    def bytes_per_token(
        head_num: int,
        head_dim: int,
        page_size: int,
        num_sparse_layers: int,
    ) -> int:
        """Sidecar bytes per KV slot, summed over ``num_sparse_layers`` layers (rounded up).

        Per layer and KV head: ``D/2`` bytes of int4 K + 2 + 2 bytes of fp16 scale and zero per
        token, plus per page the two Quest bounds as ``D`` int8 codes each and their fp32 scale,
        i.e. ``(2 * D + 4) / page_size`` per token (whatever the KV dtype). This is THE place the
        sidecar size is computed: the pool allocates exactly this many bytes per slot (when the
        slot count is a multiple of ``page_size``), and the KV budget hook adds it to SGLang's
        ``cell_size``.
        """
        if head_dim % 2:
            raise ValueError(f"bytes_per_token: head_dim must be even, got {head_dim}")
        if num_sparse_layers <= 0 or head_num <= 0:
            return 0
        n = num_sparse_layers * head_num
        per_token = n * (head_dim // 2 + 2 + 2)
        bounds = _ceil_div(n * (2 * head_dim + 4), page_size)
        return per_token + bounds

    @staticmethod
    def overhead_ratio(head_dim: int, page_size: int, kv_dtype_bytes: int = 2) -> float:
        """Sidecar bytes over the KV bytes (K and V) of the same sparse layer, per token.

        D=128, page 16, bf16: (64 + 4 + ceil(260 / 16)) / 512 = 0.166.
        """
        kv = 2 * head_dim * kv_dtype_bytes  # K + V of one head
        side = TwilightSidecarPool.bytes_per_token(1, head_dim, page_size, 1)
        return side / kv

    def nbytes(self) -> int:
        """Bytes actually allocated by this pool."""
        total = 0
        for lay in self._layers.values():
            for t in lay.as_tuple():
                total += t.numel() * t.element_size()
        return total

    # ------------------------------------------------------------------ access

    def bind(self, kv_pool: Any) -> "TwilightSidecarPool":
        """Attach the KV pool that :meth:`write` reads the keys from."""
        self.kv_pool = kv_pool
        return self

    def has_layer(self, layer_id: int) -> bool:
        return layer_id in self._layers

    def layer(self, layer_id: int) -> SidecarLayer:
        """The buffers of a sparse layer; KeyError for a dense one."""
        try:
            return self._layers[layer_id]
        except KeyError:
            raise KeyError(
                f"layer {layer_id} has no Twilight sidecar (sparse layers: "
                f"{self.sparse_layer_ids})"
            ) from None

    def rows_written(self, layer_id: Optional[int] = None):
        """Rows written by eager :meth:`write` calls: for one layer, or a dict of all."""
        if layer_id is None:
            return dict(self._rows_written)
        return self._rows_written[layer_id]

    def reset_counters(self) -> None:
        for lid in self._rows_written:
            self._rows_written[lid] = 0

    # ------------------------------------------------------------------ write

    def write(self, layer_id: int, loc: torch.Tensor, k_buffer: Optional[torch.Tensor] = None,
              *, backend: str = "auto") -> bool:
        """Update the sidecar of ``layer_id`` for the slots ``loc`` (already written to the KV
        pool): int4 K of those slots and the bounds of every page they touch.

        ``loc`` is SGLang's ``out_cache_loc`` of this forward (requests' runs in order). Call it
        after ``set_kv_buffer`` for every sparse layer, in extend (chunked prefill included) and
        decode. A dense layer is a no-op (returns False). Device-side only, so it can be
        captured in a CUDA graph; the host-side row counter counts eager calls only (it is not
        advanced while a graph is being captured, and graph replays do not run Python).
        """
        lay = self._layers.get(layer_id)
        if lay is None:
            return False
        if k_buffer is None:
            if self.kv_pool is None:
                raise RuntimeError("TwilightSidecarPool.write: no KV pool bound (use bind())")
            k_buffer = self.kv_pool.get_key_buffer(layer_id)
        if loc.dtype != torch.int64:
            loc = loc.to(torch.int64)
        ops.store_sidecar(k_buffer, loc, lay, self.page_size, backend=backend)
        if not (loc.is_cuda and torch.cuda.is_current_stream_capturing()):
            self._rows_written[layer_id] += int(loc.numel())
        return True

    def write_all(self, loc: torch.Tensor, *, backend: str = "auto") -> None:
        """:meth:`write` for every sparse layer, with Triton in one launch (a decode step that
        ran dense attention in every layer: the K of all its layers is in the pool)."""
        if not self._layers:
            return
        if self.kv_pool is None:
            raise RuntimeError("TwilightSidecarPool.write_all: no KV pool bound (use bind())")
        if loc.dtype != torch.int64:
            loc = loc.to(torch.int64)
        layers = [(self.kv_pool.get_key_buffer(lid), self._layers[lid])
                  for lid in self.sparse_layer_ids]
        # the buffers' addresses, as the one launch reads them; rebuilt if one ever moved
        pairs = [(k, lay.as_tuple()) for k, lay in layers]
        if self._addresses is None or \
                self._addresses.ptrs != store_k.LayerAddresses.pointers(pairs):
            self._addresses = store_k.LayerAddresses(pairs)
        ops.store_sidecar_layers(layers, loc, self.page_size, addresses=self._addresses,
                                 backend=backend)
        if not (loc.is_cuda and torch.cuda.is_current_stream_capturing()):
            for lid in self.sparse_layer_ids:
                self._rows_written[lid] += int(loc.numel())

    def __repr__(self) -> str:
        return (
            f"TwilightSidecarPool(slots={self.num_slots}, pages={self.num_pages}, "
            f"heads={self.head_num}, head_dim={self.head_dim}, dtype={self.dtype}, "
            f"page_size={self.page_size}, sparse_layers={self.sparse_layer_ids}, "
            f"bytes={self.nbytes()})"
        )


# ---------------------------------------------------------------------- SGLang glue


def kv_cache_region(kv_pool: Any):
    """The memory region SGLang allocates ``kv_pool``'s K/V buffers in: with
    ``--enable-memory-saver``, the pool's ``memory_saver_adapter.region(GPU_MEMORY_TYPE_KV_CACHE)``
    (SGLang 0.5.17 ``MHATokenToKVPool._create_buffers_normal``), so that
    ``/release_memory_occupation`` frees the sidecar with the KV cache and
    ``/resume_memory_occupation`` maps it back at the same addresses (CUDA graphs keep pointing
    at it). Contents are not kept, as for the KV cache: SGLang flushes the radix cache on
    release, and every slot is written (K/V and sidecar) before it is read again. Without a
    pool, or with the memory saver off, a no-op."""
    adapter = getattr(kv_pool, "memory_saver_adapter", None)
    if adapter is None or not getattr(adapter, "enabled", False):
        return nullcontext()
    from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE

    return adapter.region(GPU_MEMORY_TYPE_KV_CACHE)


def kv_pool_geometry(kv_pool: Any) -> dict:
    """What the sidecar needs from an SGLang 0.5.17 ``MHATokenToKVPool`` (NHD layout).

    ``k_buffer`` is a list over the pool's local layers (global ids ``start_layer ..
    start_layer + layer_num - 1``) of ``[size + page_size, head_num, head_dim]`` tensors.
    """
    if getattr(kv_pool, "use_hnd", False) or getattr(kv_pool, "kv_cache_layout", "nhd") != "nhd":
        raise ValueError(
            "Twilight sidecar needs SGLang's NHD KV layout (slot-major k_buffer); got "
            f"{getattr(kv_pool, 'kv_cache_layout', '?')!r}"
        )
    k0 = kv_pool.k_buffer[0] if kv_pool.k_buffer else None
    num_slots = int(k0.shape[0]) if k0 is not None else int(kv_pool.size + kv_pool.page_size)
    start = int(getattr(kv_pool, "start_layer", 0) or 0)
    return dict(
        num_slots=num_slots,
        head_num=int(kv_pool.head_num),
        head_dim=int(kv_pool.head_dim),
        dtype=kv_pool.dtype,
        page_size=int(kv_pool.page_size),
        device=kv_pool.device,
        layer_ids=list(range(start, start + int(kv_pool.layer_num))),
    )


def sparse_layer_ids(layer_ids: Iterable[int], dense_layers: int) -> List[int]:
    """The layers that decode sparsely: every layer id >= ``dense_layers``."""
    return [int(i) for i in layer_ids if int(i) >= int(dense_layers)]


def attach_sidecar(kv_pool: Any, cfg: Any = None) -> TwilightSidecarPool:
    """Build the sidecar for an SGLang ``MHATokenToKVPool`` and attach it to the pool object
    (``kv_pool.twilight_sidecar``). Idempotent: a pool that already has one returns it (several
    backends may be built over one pool: two-batch overlap, PD-multiplexing).

    ``cfg`` is a :class:`sglang_twilight.config.TwilightConfig` (default: ``get_config()``);
    its ``page_size`` must equal the pool's and ``dense_layers`` picks the sparse layers.
    """
    existing = getattr(kv_pool, POOL_ATTR, None)
    if existing is not None:
        return existing
    if cfg is None:
        from sglang_twilight.config import get_config

        cfg = get_config()
    geo = kv_pool_geometry(kv_pool)
    if geo["page_size"] != int(cfg.page_size):
        raise ValueError(
            f"Twilight page size {cfg.page_size} != SGLang KV page size {geo['page_size']} "
            "(start SGLang with --page-size equal to the Twilight page size)"
        )
    side = TwilightSidecarPool(
        num_slots=geo["num_slots"],
        head_num=geo["head_num"],
        head_dim=geo["head_dim"],
        dtype=geo["dtype"],
        sparse_layer_ids=sparse_layer_ids(geo["layer_ids"], cfg.dense_layers),
        page_size=geo["page_size"],
        device=geo["device"],
        kv_pool=kv_pool,
    )
    setattr(kv_pool, POOL_ATTR, side)
    return side


__all__ = [
    "POOL_ATTR",
    "SidecarLayer",
    "TwilightSidecarPool",
    "attach_sidecar",
    "kv_cache_region",
    "kv_pool_geometry",
    "sparse_layer_ids",
]
