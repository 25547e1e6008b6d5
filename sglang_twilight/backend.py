"""The ``twilight`` attention backend: FlashInfer for prefill and dense layers, Twilight sparse
decode for the rest.

``TwilightAttnBackend`` subclasses SGLang 0.5.17's ``FlashInferAttnBackend`` (see
docs/SGLANG_SURFACE.md section 1 for every line this relies on):

* ``forward_extend``: FlashInfer prefill (it writes K/V into the pool), then the sidecar (int4 K and
  Quest page bounds) of every new slot of a sparse layer. Only the slots of this forward are
  written (``out_cache_loc``), so chunked prefill continues where the last chunk stopped and a
  prefix-cache hit reuses the prefix's sidecar rows untouched.
* ``forward_decode``: dense layers (``layer_id < --twilight-dense-layers``) go to FlashInfer.
  Sparse layers write K/V exactly as FlashInfer does, then the sidecar of the new slot, then
  ``ops.twilight_decode`` (Quest select -> int4 estimate + top-p -> exact attention over the kept
  tokens). Requests shorter than ``--twilight-min-seq-len`` keep every token inside that call
  (dense-equivalent), so one batch mixes both. Device work only, fixed shapes: this is what the
  decode CUDA graph records.
* CUDA graphs: ``init_cuda_graph_state`` sizes the fixed-capacity :class:`ops.DecodeWorkspace` for
  the graphs' ``max_bs``; the FlashInfer plan of the dense layers is still made on the host before
  each replay by the parent's ``init_forward_metadata_out_graph``; the sparse layers read only
  static graph buffers (``req_pool_indices``, ``seq_lens``, ``out_cache_loc``) and the per-request
  p table (gathered on the device).

Unsupported setups are refused when the backend is built, with one line naming the flag
(:class:`TwilightUnsupportedError`).

The sparse decode itself lives in :class:`TwilightDecoder`, which needs no FlashInfer: the tests
drive it (and the backend) on CPU with SGLang's real pools.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable, List, Optional

import torch

from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from sglang_twilight import ops
from sglang_twilight.config import BACKEND_NAME, FLAGS, TwilightConfig, get_config, round_to_pages
from sglang_twilight.dispatch import DispatchPolicy
from sglang_twilight.metrics import KeptStats, PrefillRowCounter
from sglang_twilight.request_params import RequestTopP
from sglang_twilight.sidecar import TwilightSidecarPool, attach_sidecar
from sglang_twilight.srt_patches import shared_prefix

logger = logging.getLogger(__name__)

#: cap on the decode workspace (MiB); a decode batch with more rows than fit runs in chunks
WORKSPACE_MB_ENV = "SGLANG_TWILIGHT_WORKSPACE_MB"
DEFAULT_WORKSPACE_MB = 512

_KV_DTYPES = (torch.bfloat16, torch.float16)
_KV_DTYPE_STRS = ("auto", "bf16", "bfloat16", "fp16", "float16")

#: head dims the Twilight kernels compile for. Powers of two: every kernel spans head_dim with
#: one Triton block. At least 32: the int4 estimate's tensor-core dot runs over head_dim / 2,
#: which must be >= 16. At most 512: at 1024 the attend kernel's K and V tiles need 290 KiB of
#: shared memory, more than an A100 or H100 block may have (at 512: 146 KiB; compiled for sm80
#: and sm90 by tests/test_refusals.py).
SUPPORTED_HEAD_DIMS = (32, 64, 128, 256, 512)

#: SGLang's fault injection for its KV canary: each > 0 overwrites real K/V in place (no backend
#: call, so the sidecar of those slots would go stale)
_KV_PERTURB_ENVS = (
    "SGLANG_KV_CANARY_PERTURB_REAL_KV_USED_PROB",
    "SGLANG_KV_CANARY_PERTURB_REAL_KV_UNUSED_CACHE_PROB",
    "SGLANG_KV_CANARY_PERTURB_REAL_KV_POST_FORWARD_PROB",
)


class TwilightUnsupportedError(ValueError):
    """A setup the twilight backend cannot serve correctly. ``str()`` is one line that names the
    flag (or environment variable) to change."""


def _refuse(flag: str, msg: str) -> TwilightUnsupportedError:
    return TwilightUnsupportedError(f"{flag}: {msg} (not supported by --attention-backend twilight)")


# --------------------------------------------------------------------------- startup checks


def check_server_args(server_args: Any, cfg: Optional[TwilightConfig] = None,
                      environ: Optional[dict] = None) -> None:
    """Refuse server setups whose KV writes bypass the sidecar or whose layout it cannot follow,
    and those whose results Twilight cannot give as asked (deterministic inference).

    Every SGLang 0.5.17 path that fills KV slots without the attention backend is refused here
    (docs/SGLANG_SURFACE.md section 7 lists them all, with the paths that are safe and why).
    Raises :class:`TwilightUnsupportedError`. ``server_args`` is SGLang's ``ServerArgs``.
    """
    cfg = cfg or get_config()
    env = os.environ if environ is None else environ

    prefill, decode = server_args.get_attention_backends()
    if prefill != BACKEND_NAME or decode != BACKEND_NAME:
        # prefill through another backend would leave the sidecar unwritten
        raise _refuse(
            "--prefill-attention-backend/--decode-attention-backend",
            f"prefill={prefill}, decode={decode}; twilight must run both (it writes the sidecar "
            "in prefill and reads it in decode)",
        )
    kvd = str(getattr(server_args, "kv_cache_dtype", "auto"))
    if kvd not in _KV_DTYPE_STRS:
        raise _refuse("--kv-cache-dtype", f"{kvd}; the sidecar needs a bf16/fp16 KV cache "
                      "(use auto, bf16 or fp16)")
    page = getattr(server_args, "page_size", None)
    if page is not None and int(page) != cfg.page_size:
        raise _refuse("--page-size", f"{page} != the Twilight page size {cfg.page_size} "
                      f"({FLAGS['page_size']}); leave --page-size out")
    if getattr(server_args, "speculative_algorithm", None):
        raise _refuse("--speculative-algorithm", f"{server_args.speculative_algorithm}; "
                      "speculative decoding moves KV between slots without the sidecar")
    if getattr(server_args, "enable_hierarchical_cache", False):
        raise _refuse("--enable-hierarchical-cache", "HiCache loads KV into new slots "
                      "without the sidecar")
    if getattr(server_args, "enable_lmcache", False):
        raise _refuse("--enable-lmcache", "LMCache loads KV into new slots without the sidecar")
    if getattr(server_args, "enable_hisparse", False):
        raise _refuse("--enable-hisparse", "another sparse attention scheme")
    if getattr(server_args, "disaggregation_mode", "null") not in (None, "null"):
        raise _refuse("--disaggregation-mode", f"{server_args.disaggregation_mode}; PD "
                      "disaggregation transfers KV without the sidecar")
    if int(getattr(server_args, "dcp_size", 1) or 1) > 1:
        raise _refuse("--dcp-size", f"{server_args.dcp_size}; decode context parallelism "
                      "splits the KV of a request across ranks")
    if str(env.get("SGLANG_ENABLE_POST_CAPTURE_KV_SIZING", "")).lower() in ("1", "true", "yes"):
        raise _refuse("SGLANG_ENABLE_POST_CAPTURE_KV_SIZING",
                      "post-capture KV re-sizing rebuilds the KV pool after the sidecar was "
                      "attached; unset it")
    if str(env.get("SGLANG_USE_HND_KVCACHE", "")).lower() in ("1", "true", "yes"):
        raise _refuse("SGLANG_USE_HND_KVCACHE", "the sidecar needs the NHD (slot-major) KV "
                      "layout; unset it")
    # host / storage tiers and pluggable caches that load KV into new slots
    if getattr(server_args, "enable_flexkv", False):
        raise _refuse("--enable-flexkv", "FlexKV loads KV from its host/SSD tiers into new "
                      "slots without the sidecar")
    rcb = getattr(server_args, "radix_cache_backend", None)
    if rcb:
        raise _refuse("--radix-cache-backend", f"{rcb}; a registered radix-cache backend may "
                      "load KV into slots without the sidecar (leave the flag out for "
                      "SGLang's default cache)")
    hsb = getattr(server_args, "hicache_storage_backend", None)
    if hsb:
        raise _refuse("--hicache-storage-backend", f"{hsb}; storage tiers load KV into new "
                      "slots without the sidecar")
    if getattr(server_args, "enable_deterministic_inference", False):
        raise _refuse("--enable-deterministic-inference", "the sparse layers' results depend "
                      "on the batch they run in (row groups, attention splits)")
    if int(getattr(server_args, "attn_cp_size", 1) or 1) > 1:
        raise _refuse("--attn-cp-size", f"{server_args.attn_cp_size}; context-parallel "
                      "prefill writes KV outside the FlashInfer prefill twilight runs")
    if getattr(server_args, "enable_prefill_cp", False):
        raise _refuse("--enable-prefill-cp", "context-parallel prefill writes KV outside the "
                      "FlashInfer prefill twilight runs")
    if getattr(server_args, "enable_unified_memory", False):
        raise _refuse("--enable-unified-memory", "the unified memory pool is not the plain MHA "
                      "KV pool the sidecar sits beside")
    if getattr(server_args, "enable_page_major_kv_layout", False):
        raise _refuse("--enable-page-major-kv-layout", "the sidecar needs the slot-major KV "
                      "layout")
    if getattr(server_args, "prefill_only_disable_kv_cache", False):
        raise _refuse("--prefill-only-disable-kv-cache", "a server without a KV cache never "
                      "decodes")
    role = getattr(server_args, "decoupled_spec_role", "null")
    if role not in (None, "null"):
        raise _refuse("--decoupled-spec-role", f"{role}; speculative decoding moves KV "
                      "between slots without the sidecar")
    for var in _KV_PERTURB_ENVS:
        raw = str(env.get(var, "") or "").strip()
        try:
            prob = float(raw) if raw else 0.0
        except ValueError:
            prob = 1.0  # SGLang would refuse it itself; do not guess
        if prob > 0:
            raise _refuse(var, f"{raw}; the KV canary's fault injection overwrites K/V in "
                          "place without the sidecar; unset it")


def check_model(model_runner: Any) -> None:
    """Refuse model setups the kernels do not implement (MLA, sliding window, soft-capping,
    cross attention, non-bf16/fp16 KV, a KV pool other than plain MHA)."""
    from sglang.srt.configs.model_config import AttentionArch

    mc = model_runner.model_config
    arch = ",".join(getattr(mc.hf_config, "architectures", None) or ["?"])
    if getattr(model_runner, "use_mla_backend", False) or getattr(mc, "attention_arch", None) == AttentionArch.MLA:
        raise _refuse("--model-path", f"{arch} uses MLA attention")
    if getattr(model_runner, "sliding_window_size", None) is not None:
        raise _refuse("--model-path", f"{arch} uses sliding-window attention")
    hd = getattr(mc, "head_dim", None)
    if hd is not None and int(hd) not in SUPPORTED_HEAD_DIMS:
        raise _refuse("--model-path", f"{arch} has head_dim {hd} (allowed: "
                      f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))}; the Twilight kernels "
                      "compile for those only)")
    text_cfg = getattr(mc, "hf_text_config", mc.hf_config)
    cap = getattr(text_cfg, "attn_logit_softcapping", None)
    if cap:
        raise _refuse("--model-path", f"{arch} uses attention logit soft-capping ({cap})")
    if getattr(mc, "is_encoder_decoder", False):
        raise _refuse("--model-path", f"{arch} is an encoder-decoder model (cross attention)")
    kv_dtype = getattr(model_runner, "kv_cache_dtype", None)
    if kv_dtype is not None and kv_dtype not in _KV_DTYPES:
        raise _refuse("--kv-cache-dtype", f"KV cache dtype {kv_dtype}; the sidecar needs "
                      "bf16/fp16")
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    pool = model_runner.token_to_kv_pool
    if type(pool) is not MHATokenToKVPool:
        raise _refuse("--model-path", f"{arch} needs KV pool {type(pool).__name__}; twilight "
                      "supports the plain MHA pool (MHATokenToKVPool) only")
    model = getattr(model_runner, "model", None)
    if model is not None and hasattr(model, "modules"):
        for layer in _radix_layers(model):
            check_layer(layer)


def _radix_layers(model) -> Iterable[Any]:
    from sglang.srt.layers.radix_attention import RadixAttention

    for m in model.modules():
        if isinstance(m, RadixAttention):
            yield m


def check_layer(layer: Any) -> None:
    """Refuse an attention layer the sparse path cannot compute exactly like FlashInfer would."""
    lid = getattr(layer, "layer_id", "?")
    if float(getattr(layer, "logit_cap", 0.0) or 0.0) > 0:
        raise _refuse("--model-path", f"layer {lid} uses logit soft-capping ({layer.logit_cap})")
    sw = getattr(layer, "sliding_window_size", -1)
    if sw is not None and int(sw) >= 0:
        raise _refuse("--model-path", f"layer {lid} uses sliding-window attention ({sw})")
    if getattr(layer, "is_cross_attention", False):
        raise _refuse("--model-path", f"layer {lid} is a cross-attention layer")
    if int(layer.head_dim) not in SUPPORTED_HEAD_DIMS:
        raise _refuse("--model-path", f"layer {lid} has head_dim {layer.head_dim} (allowed: "
                      f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))}; the Twilight kernels "
                      "compile for those only)")
    vd = getattr(layer, "v_head_dim", None)
    if vd is not None and int(vd) != int(layer.head_dim):
        raise _refuse("--model-path", f"layer {lid} has v_head_dim {vd} != head_dim "
                      f"{layer.head_dim}")


# --------------------------------------------------------------------------- workspace sizing


def workspace_bytes(rows: int, num_kv_heads: int, group: int, head_dim: int, budget: int,
                    max_context: int, page_size: int, num_sms: Optional[int] = None) -> int:
    """Bytes of an :class:`ops.DecodeWorkspace` of ``rows`` rows, measured on the ``meta`` device
    from the workspace's own ``allocate``/``nbytes`` (so it follows its layout). The attention
    split scratch depends on the GPU's SM count: ``meta`` sizes it for 8 SMs; ``num_sms`` gives
    the bytes on a GPU with that many (what the KV budget reserves)."""
    ws = ops.DecodeWorkspace.allocate(int(rows), num_kv_heads, group, head_dim, budget,
                                      page_size, max_context, "meta")
    n = ws.nbytes()
    if num_sms is not None and int(num_sms) != ws.num_sms:
        # mid_o [mid_rows * G, D] and mid_lse [mid_rows * G], fp32
        extra = split_rows(rows, num_kv_heads, int(num_sms)) - split_rows(rows, num_kv_heads,
                                                                           ws.num_sms)
        n += extra * group * (head_dim + 1) * 4
    return n


def split_rows(rows: int, num_kv_heads: int, num_sms: int) -> int:
    """(request, KV head, split) partial rows the attend stage needs for any decode step of up
    to ``rows`` requests on a GPU of ``num_sms`` SMs: what ``ops.DecodeWorkspace.allocate``
    sizes ``mid_o`` / ``mid_lse`` by (the same plan functions)."""
    return max(ops._mid_rows(ops._group_plan(r, num_kv_heads, num_sms, keep_all), num_kv_heads)
               for r in range(1, int(rows) + 1) for keep_all in (False, True))


def workspace_rows(max_bs: int, num_kv_heads: int, group: int, head_dim: int, budget: int,
                   max_context: int, page_size: int, limit_bytes: Optional[int] = None) -> int:
    """Rows to give the decode workspace: ``max_bs``, or fewer if that would take more than
    ``limit_bytes`` (default ``$SGLANG_TWILIGHT_WORKSPACE_MB`` MiB, 512); larger batches then
    run in chunks of that many rows. At least 1."""
    if limit_bytes is None:
        limit_bytes = int(float(os.environ.get(WORKSPACE_MB_ENV, DEFAULT_WORKSPACE_MB)) * (1 << 20))
    geo = (num_kv_heads, group, head_dim, budget, max_context, page_size)
    max_bs = max(1, int(max_bs))
    if workspace_bytes(max_bs, *geo) <= limit_bytes:
        return max_bs
    lo, hi = 1, max_bs - 1  # bytes grow with rows: the largest rows that fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if workspace_bytes(mid, *geo) <= limit_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _card_name(device: Any) -> str:
    """The GPU's name as torch reports it (the dispatch profiles' key), or "cpu"."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return dev.type


# --------------------------------------------------------------------------- the sparse decoder


class TwilightDecoder:
    """Sidecar writes and the sparse decode of the Twilight layers, over SGLang's real pools.

    Needs no FlashInfer: the backend owns one; tests build one on CPU.

    Args:
        cfg: the Twilight config.
        kv_pool: SGLang's ``MHATokenToKVPool`` (the sidecar is attached to it).
        req_to_token: ``req_to_token_pool.req_to_token`` ``[rows, max_ctx]`` int32.
        num_q_heads, num_kv_heads, head_dim: of this attention-TP rank.
        max_rows: the largest decode batch this process can see (the eager bound); the
            workspace built lazily for eager decode is sized for it (capped, see
            :func:`workspace_rows`).
        backend: ``ops`` backend for the decode kernels ("triton" in serving).
        num_layers: the model's layers (for the dispatch cost model; default: the KV pool's).
    """

    def __init__(self, cfg: TwilightConfig, kv_pool: Any, req_to_token: torch.Tensor, *,
                 num_q_heads: int, num_kv_heads: int, head_dim: int, max_rows: int,
                 device: Any = None, backend: str = "triton",
                 workspace_limit_bytes: Optional[int] = None, tp_rank: int = 0,
                 num_layers: Optional[int] = None):
        if num_q_heads % num_kv_heads:
            raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads "
                             f"{num_kv_heads}")
        self.cfg = cfg
        self.kv_pool = kv_pool
        self.sidecar: TwilightSidecarPool = attach_sidecar(kv_pool, cfg)
        if self.sidecar.head_num != num_kv_heads or self.sidecar.head_dim != head_dim:
            raise ValueError(
                f"KV pool has {self.sidecar.head_num} heads x {self.sidecar.head_dim}, the model "
                f"{num_kv_heads} x {head_dim}")
        self.req_to_token = req_to_token
        self.num_q_heads = int(num_q_heads)
        self.num_kv_heads = int(num_kv_heads)
        self.group = self.num_q_heads // self.num_kv_heads
        self.head_dim = int(head_dim)
        self.page_size = int(cfg.page_size)
        # every seq_len is <= req_to_token's width (slots are read from it)
        self.max_context = int(req_to_token.shape[1])
        self.device = torch.device(device) if device is not None else req_to_token.device
        self.backend = backend
        self.max_rows = int(max_rows)
        self.workspace_limit_bytes = workspace_limit_bytes
        if cfg.selector == "none":
            # every token is a candidate: the capacity covers the whole context
            self.budget = round_to_pages(self.max_context, self.page_size)
        else:
            self.budget = cfg.capacity
        self.workspace: Optional[ops.DecodeWorkspace] = None
        self._retired: List[ops.DecodeWorkspace] = []  # never freed: graphs may point at them
        self.sparse_layer_ids: List[int] = list(self.sidecar.sparse_layer_ids)
        self.top_p = RequestTopP(req_to_token.shape[0], cfg.top_p, self.device)
        self.kept_stats = KeptStats(self.sparse_layer_ids, self.max_rows, self.num_kv_heads,
                                    self.device, tp_rank=tp_rank)
        self.prefill_rows = PrefillRowCounter(tp_rank=tp_rank)
        self.last_kept: Optional[torch.Tensor] = None
        self._captured = False  # a graph capture ran since the last real decode step
        self.policy = DispatchPolicy.for_backend(
            cfg.dispatch, _card_name(self.device), self.geometry(num_layers))
        # the step's tokens read by several of its requests, counted on the host from the radix
        # tree when the cost model prices them (0 otherwise)
        shared_prefix.want(self, self.policy.wants_shared)
        self.step_shared = 0
        # the way of the decode step being prepared or run: True = Twilight in the sparse layers
        self.step_sparse = cfg.dispatch != "dense"
        # per-step device tensors, made by the step's first sparse layer (see decode())
        self._plan: Optional[tuple] = None

    def geometry(self, num_layers: Optional[int] = None) -> dict:
        """What the dispatch cost model is keyed by (dispatch.StepCostModel's fields)."""
        return dict(num_kv_heads=self.num_kv_heads, group=self.group, head_dim=self.head_dim,
                    num_layers=int(num_layers or self.kv_pool.layer_num),
                    num_sparse_layers=len(self.sparse_layer_ids), capacity=self.budget,
                    max_budget=self.cfg.max_budget, page_size=self.page_size)

    # -- per decode step (host)

    def begin_step(self, forward_batch: Any) -> bool:
        """Host side, before a decode step (eager, or a graph replay): pick its way from the
        context lengths (``seq_lens_cpu``, else their sum) and the tokens its requests share,
        and count it. Returns step_sparse."""
        seq_cpu = getattr(forward_batch, "seq_lens_cpu", None)
        rows = int(getattr(forward_batch, "batch_size", 0) or 0)
        tokens = getattr(forward_batch, "seq_lens_sum", None)
        # a graph replay's view counts its padding rows too
        real = rows - int(getattr(forward_batch, "num_padding", 0) or 0)
        self.step_shared = shared_prefix.take(real) if self.policy.wants_shared else 0
        self.step_sparse = bool(self.policy.sparse_step(seq_cpu, rows=rows, tokens=tokens,
                                                        shared=self.step_shared))
        self.on_step()
        self.kept_stats.count_step(self.step_sparse)
        return self.step_sparse

    def set_capture_way(self, sparse: bool) -> None:
        """The way a CUDA graph about to be captured records (srt_patches.graph_variants)."""
        self.step_sparse = bool(sparse)

    # -- workspace

    def rows_for(self, max_bs: int) -> int:
        return workspace_rows(max_bs, self.num_kv_heads, self.group, self.head_dim, self.budget,
                              self.max_context, self.page_size, self.workspace_limit_bytes)

    def allocate_workspace(self, max_bs: int) -> ops.DecodeWorkspace:
        """(Re)size the workspace for batches of up to ``max_bs`` rows. Only grows; call it before
        any graph is captured (``init_cuda_graph_state``)."""
        rows = self.rows_for(max_bs)
        ws = self.workspace
        if ws is not None and ws.max_rows >= rows:
            return ws
        if ws is not None:
            self._retired.append(ws)
        self.workspace = ops.DecodeWorkspace.allocate(
            rows, self.num_kv_heads, self.group, self.head_dim, self.budget, self.page_size,
            self.max_context, self.device)
        logger.info("sglang-twilight: decode workspace %d rows x %d candidates, %.1f MiB",
                    rows, self.workspace.capacity, self.workspace.nbytes() / (1 << 20))
        return self.workspace

    def ensure_workspace(self) -> ops.DecodeWorkspace:
        """The workspace, built on first use (eager decode with CUDA graphs off)."""
        if self.workspace is None:
            self.allocate_workspace(self.max_rows)
        return self.workspace

    # -- per layer

    def is_sparse(self, layer_id: int) -> bool:
        return self.sidecar.has_layer(layer_id)

    def warm_up(self) -> None:
        """Compile the sidecar store kernels' variants now rather than inside the first long
        prefill: Triton specializes the token count (1, a multiple of 16, other), and on the H100
        the first 8192-token chunk of a fresh server took ~9.5 s instead of ~0.3 s compiling it.
        The all-layers store of dense-way decode steps too (and its address table is built
        here, before any CUDA graph is captured). Writes slots 0..16 (the padding page and page
        1); any later use of page 1 rewrites them (a page's first write recomputes its bounds
        from offset 0)."""
        if not self.sparse_layer_ids:
            return
        lid = self.sparse_layer_ids[0]
        for n in (1, 16, 17):
            loc = torch.arange(n, dtype=torch.int64, device=self.device)
            self.sidecar.write(lid, loc)
            self.sidecar.write_all(loc)
        self.sidecar.reset_counters()

    def write(self, layer_id: int, loc: torch.Tensor, extend: bool = False) -> bool:
        """Sidecar rows for the slots ``loc`` of ``layer_id`` (K already in the pool).
        ``extend``: a prefill/extend batch; the first sparse layer's rows are counted."""
        if loc is None or loc.numel() == 0:
            return False
        if extend and layer_id == self.sparse_layer_ids[0]:
            self.prefill_rows.add(loc.numel())  # a host-side shape: no sync
        return self.sidecar.write(layer_id, loc)

    def write_after_dense(self, layer_id: int, loc: torch.Tensor) -> None:
        """A dense-way decode step's sidecar rows: after its last sparse layer (the K of every
        layer is in the pool then), every sparse layer's at once, one launch where one per
        layer cost about 3 us each (0.09 ms of a 2k x 1 Llama-8B step on the H100)."""
        if layer_id == self.sparse_layer_ids[-1] and loc is not None and loc.numel():
            self.sidecar.write_all(loc)

    def _step_plan(self, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor) -> tuple:
        """The per-step device tensors every sparse layer of a step shares: p of each row (rows
        shorter than ``--twilight-min-seq-len`` get 1, i.e. keep every token) and the count of
        real rows (padding rows of a graph batch use req-pool row 0, which no request gets)."""
        p_rows = self.top_p.rows(req_pool_indices)
        if self.cfg.min_sparse_len > 0:
            p_rows = p_rows.masked_fill(seq_lens < self.cfg.min_sparse_len, 1.0)
        valid = (req_pool_indices != 0).sum()
        return p_rows, valid

    def decode(self, q: torch.Tensor, layer_id: int, sm_scale: float,
               req_pool_indices: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """Sparse decode of one layer: ``q [bs, Hq, D]`` -> ``o [bs, Hq, D]``. Device ops only,
        shapes fixed by ``bs`` and the config (graph-capturable). The step's first sparse layer
        makes the per-step tensors (:meth:`_step_plan`) that the later ones reuse; its last one
        adds the step's kept counts to the statistics."""
        bs = q.shape[0]
        if layer_id == self.sparse_layer_ids[0] or self._plan is None:
            self._plan = self._step_plan(req_pool_indices, seq_lens)
        p_rows, valid = self._plan
        side = self.sidecar.layer(layer_id)
        k_buffer = self.kv_pool.get_key_buffer(layer_id)
        v_buffer = self.kv_pool.get_value_buffer(layer_id)
        ws = self.ensure_workspace()
        out = q.new_empty(bs, self.num_q_heads, self.head_dim)
        step = ws.max_rows
        kept = None
        kw = dict(budget=self.budget, page_size=self.page_size, sm_scale=sm_scale,
                  min_budget=self.cfg.min_budget, max_budget=self.cfg.max_budget,
                  min_sparse_len=0, selector=self.cfg.selector,
                  backend=self.backend, workspace=ws)
        if bs <= step:
            _, kept = ops.twilight_decode(
                q, k_buffer, v_buffer, side, self.req_to_token, req_pool_indices,
                seq_lens, p_rows, out=out, **kw)
        else:  # more rows than the workspace holds: static chunks (the workspace is reused)
            kept = torch.empty(bs, self.num_kv_heads, dtype=torch.int32, device=q.device)
            for s in range(0, bs, step):
                e = min(bs, s + step)
                _, kc = ops.twilight_decode(
                    q[s:e], k_buffer, v_buffer, side, self.req_to_token,
                    req_pool_indices[s:e], seq_lens[s:e], p_rows[s:e], out=out[s:e], **kw)
                kept[s:e].copy_(kc)
        self.kept_stats.stage(layer_id, kept, bs)
        if layer_id == self.sparse_layer_ids[-1]:
            self.kept_stats.commit(bs, valid, seq_lens)
        self.last_kept = kept  # for tests / debugging (device tensor, no sync)
        return out

    def note_capture(self) -> None:
        """A CUDA graph is being captured: its warm-up and capture runs record dummy batches."""
        self._captured = True

    def on_step(self) -> None:
        """Host side, once per decode step, outside any graph."""
        if self._captured:  # first real step after capture: drop the dummy batches' data
            self._captured = False
            self.kept_stats.reset()
        self.kept_stats.on_step()


# --------------------------------------------------------------------------- the backend


class TwilightAttnBackend(FlashInferAttnBackend):
    """``--attention-backend twilight``: FlashInfer prefill + Twilight sparse decode."""

    def __init__(self, model_runner: Any, **kwargs: Any):
        cfg = get_config()
        # refuse before anything is allocated
        check_server_args(model_runner.server_args, cfg)
        check_model(model_runner)
        super().__init__(model_runner, **kwargs)

        from sglang.srt.runtime_context import get_parallel

        par = get_parallel()
        tp = par.attn_tp_size
        mc = model_runner.model_config
        num_q = mc.num_attention_heads // tp
        num_kv = mc.get_num_kv_heads(tp)
        self.twilight_cfg = cfg
        # the parent's per-batch buffers bound every batch this backend sees
        eager_rows = int(self.kv_indptr[0].shape[0]) - 1
        self.twilight = TwilightDecoder(
            cfg, model_runner.token_to_kv_pool, model_runner.req_to_token_pool.req_to_token,
            num_q_heads=num_q, num_kv_heads=num_kv, head_dim=mc.head_dim, max_rows=eager_rows,
            backend="triton", tp_rank=int(par.tp_rank), num_layers=mc.num_hidden_layers)
        self.twilight.warm_up()
        self._checked_layers: set = set()
        logger.info(
            "sglang-twilight: backend ready: p=%s selector=%s budget=%d page=%d dense layers=%d "
            "sparse layers=%d min_seq_len=%d clamp=[%d, %s] sidecar=%.1f MiB max_context=%d",
            cfg.top_p, cfg.selector, self.twilight.budget, cfg.page_size, cfg.dense_layers,
            len(self.twilight.sparse_layer_ids), cfg.min_sparse_len, cfg.min_budget,
            cfg.max_budget or "none", self.twilight.sidecar.nbytes() / (1 << 20),
            self.twilight.max_context)
        logger.info("sglang-twilight: %s", self.twilight.policy.describe())

    # -- host-side hooks

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int,
                              kv_indices_buf: Optional[torch.Tensor] = None):
        super().init_cuda_graph_state(max_bs, max_num_tokens, kv_indices_buf=kv_indices_buf)
        self.twilight.allocate_workspace(max_bs)

    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        if forward_batch.forward_mode.is_decode():
            self.twilight.begin_step(forward_batch)

    def _prepare_cuda_graph_metadata(self, bs, num_tokens, forward_mode, spec_info):
        """Capture-time FlashInfer wrappers of a decode batch size: made once per size, not once
        per capture. Under ``--twilight-dispatch auto`` every batch size is captured twice (the
        dense and the sparse way, srt_patches/graph_variants.py); the parent would make new
        wrappers for the second capture, and the replay then plans into those only, leaving the
        first graph's FlashInfer kernels on their capture-time plan (one token per request)."""
        if forward_mode.is_decode_or_idle() and bs in self.decode_cuda_graph_metadata \
                and self.twilight.policy.both_ways:
            from sglang.srt.layers.attention.flashinfer_backend import DecodeMetadata

            self.forward_metadata = DecodeMetadata(self.decode_cuda_graph_metadata[bs])
            return
        super()._prepare_cuda_graph_metadata(bs, num_tokens, forward_mode, spec_info)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        super().init_forward_metadata_out_graph(forward_batch, in_capture=in_capture)
        if in_capture:  # the way is the one the graph being captured records
            self.twilight.note_capture()
        elif forward_batch.forward_mode.is_decode():
            # before the replay: the graph runner then replays the graph of this way
            self.twilight.begin_step(forward_batch)

    # -- forward

    def _check(self, layer) -> None:
        if layer.layer_id not in self._checked_layers:
            check_layer(layer)
            if layer.tp_k_head_num != self.twilight.num_kv_heads or \
                    layer.tp_q_head_num != self.twilight.num_q_heads:
                raise TwilightUnsupportedError(
                    f"--model-path: layer {layer.layer_id} has {layer.tp_q_head_num}/"
                    f"{layer.tp_k_head_num} q/kv heads, the KV pool "
                    f"{self.twilight.num_q_heads}/{self.twilight.num_kv_heads}")
            self._checked_layers.add(layer.layer_id)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        sparse = self.twilight.is_sparse(layer.layer_id)
        if sparse:
            self._check(layer)
        o = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache,
                                   **kwargs)
        if sparse:
            # The new slots' K is in the pool now: either the parent wrote it, or the model
            # wrote it itself (fused rope + KV store, save_kv_cache=False).
            self.twilight.write(layer.layer_id, forward_batch.out_cache_loc, extend=True)
        return o

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if not self.twilight.is_sparse(layer.layer_id):
            return super().forward_decode(q, k, v, layer, forward_batch,
                                          save_kv_cache=save_kv_cache, **kwargs)
        self._check(layer)
        if not self.twilight.step_sparse:
            # this step decodes densely (--twilight-dispatch): FlashInfer's decode, which
            # writes K/V itself; the sidecar of the new slot is still written for later steps
            o = super().forward_decode(q, k, v, layer, forward_batch,
                                       save_kv_cache=save_kv_cache, **kwargs)
            self.twilight.write_after_dense(layer.layer_id, forward_batch.out_cache_loc)
            return o
        cache_loc = forward_batch.out_cache_loc
        if k is not None:
            assert v is not None
            if save_kv_cache:  # the same write as FlashInferAttnBackend.forward_decode
                self.token_to_kv_pool.set_kv_buffer(
                    layer,
                    KVWriteLoc(cache_loc, self.forward_metadata.swa_out_cache_loc),
                    k,
                    v,
                    *self._kv_write_scales(layer),
                )
        self.twilight.write(layer.layer_id, cache_loc)
        o = self.twilight.decode(
            q.contiguous().view(-1, layer.tp_q_head_num, layer.head_dim), layer.layer_id,
            layer.scaling, forward_batch.req_pool_indices, forward_batch.seq_lens)
        return o.view(-1, layer.tp_q_head_num * layer.head_dim)


__all__ = [
    "TwilightAttnBackend",
    "TwilightDecoder",
    "TwilightUnsupportedError",
    "check_layer",
    "check_model",
    "check_server_args",
    "split_rows",
    "workspace_bytes",
    "workspace_rows",
]
