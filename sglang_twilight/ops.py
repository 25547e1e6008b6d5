"""Twilight's functional API: one function per stage of a sparse decode step.

Every function has a plain-torch reference (runs anywhere, the definition) and a Triton kernel (CUDA,
or the CPU under ``TRITON_INTERPRET=1``) with the same result; ``backend`` picks: ``"auto"`` (Triton
for CUDA tensors, torch otherwise), ``"torch"`` or ``"triton"``. The contract - shapes, dtypes,
tie rules - is written down in docs/OPS.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sglang_twilight.kernels import attend as _attend
from sglang_twilight.kernels import launch as _launch
from sglang_twilight.kernels import prune as _prune  # estimate -> top-p -> union
from sglang_twilight.kernels import select as _select
from sglang_twilight.kernels import store as _store

__all__ = [
    "SidecarLayer",
    "quantize_int4",
    "dequantize_int4",
    "store_sidecar",
    "store_sidecar_layers",
    "quest_page_scores",
    "quest_select",
    "int4_scores",
    "topp_mask",
    "twilight_prune",
    "sparse_decode_attention",
    "twilight_decode",
    "DecodeWorkspace",
    "capacity_for",
]

capacity_for = _select.capacity_for


def _use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        if _store.triton is None:
            raise RuntimeError("backend='triton' requested but Triton is not installed")
        return True
    if backend != "auto":
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    return _store.triton is not None and all(t.is_cuda for t in tensors)


def quantize_int4(k: torch.Tensor):
    """k [..., D] -> (packed uint8 [..., D//2], scale fp16 [...], zero fp16 [...])."""
    return _store.quantize_int4_ref(k)


def dequantize_int4(packed, scale, zero, dtype=torch.float32):
    """Inverse of quantize_int4: -> [..., D] in ``dtype``; error <= scale / 2 per element."""
    return _store.dequantize_int4_ref(packed, scale, zero, dtype)


@dataclass(frozen=True)
class SidecarLayer:
    """The sidecar of one sparse layer, as the store and the decode step take it: ``S`` slots of
    the layer's KV pool, ``H`` KV heads, ``D`` head_dim, ``S_pages = S / page_size``. Views, no
    copies: ``sidecar.TwilightSidecarPool`` holds one per sparse layer (``layer_id`` set);
    tests and benchmarks build their own from ``kernels.store``'s buffer makers."""

    kq: torch.Tensor  # uint8 [S, H, D//2]: int4 K codes, two per byte (store.code_buffer)
    kscale: torch.Tensor  # fp16 [S, H]: int4 scale of each (slot, KV head)
    kzero: torch.Tensor  # fp16 [S, H]: int4 zero point
    kmax: torch.Tensor  # int8 [S_pages, H, D]: Quest page maximum per channel, int8 codes
    kmin: torch.Tensor  # int8 [S_pages, H, D]: Quest page minimum per channel
    kbscale: torch.Tensor  # fp32 [S_pages, H]: the bounds' scale (store.bounds_buffers)
    layer_id: int = -1  # the model layer (-1: not a pool's)

    def as_tuple(self):
        """``(kq, kscale, kzero, kmax, kmin, kbscale)``."""
        return self.kq, self.kscale, self.kzero, self.kmax, self.kmin, self.kbscale


def store_sidecar(k_buffer, loc, side: SidecarLayer, page_size, *, backend="auto"):
    """Write int4 K of ``k_buffer[loc]`` (``[S, H, D]``, ``loc`` int64 ``[N]``) into ``side`` and
    recompute the Quest bounds of every page ``loc`` touches."""
    fn = _store.store_sidecar_triton if _use_triton(backend, k_buffer) else \
        _store.store_sidecar_ref
    return fn(k_buffer, loc, *side.as_tuple(), page_size)


def store_sidecar_layers(layers, loc, page_size, *, addresses=None, backend="auto"):
    """:func:`store_sidecar` for every one of ``layers`` (``(k_buffer, SidecarLayer)`` pairs,
    one shape), the same ``loc`` for all: with Triton one launch, which reads the buffers
    through ``addresses`` (``kernels.store.LayerAddresses`` of exactly these layers, built once
    by the caller; built here when None)."""
    if not layers:
        return
    pairs = [(k, side.as_tuple()) for k, side in layers]
    if not _use_triton(backend, pairs[0][0]):
        return _store.store_sidecar_layers_ref(pairs, loc, page_size)
    if addresses is None:
        addresses = _store.LayerAddresses(pairs)
    return _store.store_sidecar_layers_triton(addresses, loc, page_size)


def quest_page_scores(q, kmax, kmin, kbscale, page_table, num_pages):
    """GQA Quest upper bound per (request, KV head, page): [R, Hkv, NP] fp32, -inf past the end."""
    return _select.quest_page_scores_ref(q, kmax, kmin, kbscale, page_table, num_pages)


def quest_select(q, kmax, kmin, kbscale, req_to_token, req_pool_indices, seq_lens, budget,
                 page_size, *, backend="auto", max_pages=None):
    """-> (cand_slots int32 [R, Hkv, C], cand_counts int32 [R, Hkv]), C = capacity_for(budget)."""
    if _use_triton(backend, q):
        return _select.quest_select_triton(q, kmax, kmin, kbscale, req_to_token, req_pool_indices,
                                          seq_lens, budget, page_size, max_pages=max_pages)
    return _select.quest_select_ref(q, kmax, kmin, kbscale, req_to_token, req_pool_indices,
                                   seq_lens, budget, page_size)


def int4_scores(q, kq, kscale, kzero, cand_slots, cand_counts, sm_scale, *, backend="auto"):
    """sm_scale * q . dequant(k) over the candidates: [R, Hkv, G, C] fp32 (-inf past the count
    with the torch backend; the Triton kernel leaves the tail untouched)."""
    if _use_triton(backend, q):
        return _prune.int4_scores_triton(q, kq, kscale, kzero, cand_slots, cand_counts, sm_scale)
    return _prune.int4_scores_ref(q, kq, kscale, kzero, cand_slots, cand_counts, sm_scale)


def topp_mask(probs: torch.Tensor, p) -> torch.Tensor:
    """Smallest set per row whose sum reaches p (ties at the threshold kept), by bisection."""
    return _prune.topp_mask_ref(probs, p)


def twilight_prune(q, kq, kscale, kzero, cand_slots, cand_counts, p, sm_scale, min_budget=1,
                   max_budget=0, *, backend="auto"):
    """-> (kept_slots int32 [R, Hkv, C], kept_counts int32 [R, Hkv])."""
    if _use_triton(backend, q):
        return _prune.twilight_prune_triton(q, kq, kscale, kzero, cand_slots, cand_counts, p,
                                           sm_scale, min_budget, max_budget)
    return _prune.twilight_prune_ref(q, kq, kscale, kzero, cand_slots, cand_counts, p, sm_scale,
                                    min_budget, max_budget)


def sparse_decode_attention(q, k_buffer, v_buffer, kept_slots, kept_counts, sm_scale, *,
                            backend="auto"):
    """Exact attention of every q head over its KV head's kept slots: [R, Hq, D] in q's dtype."""
    if _use_triton(backend, q):
        return _attend.sparse_decode_attention_triton(q, k_buffer, v_buffer, kept_slots,
                                                      kept_counts, sm_scale)
    return _attend.sparse_decode_attention_ref(q, k_buffer, v_buffer, kept_slots, kept_counts,
                                               sm_scale)


@dataclass
class DecodeWorkspace:
    """Fixed-capacity buffers for ``twilight_decode`` so a step allocates nothing (CUDA graphs).

    Sized for ``max_rows`` requests; a step with R <= max_rows uses the first R rows.
    """

    max_rows: int
    num_kv_heads: int
    group: int
    head_dim: int
    capacity: int
    max_pages: int
    page_scores: torch.Tensor
    cand_pages: torch.Tensor
    cand_counts: torch.Tensor
    scores: torch.Tensor
    kept_slots: torch.Tensor
    kept_counts: torch.Tensor
    head_lo: torch.Tensor
    head_tot: torch.Tensor
    head_max: torch.Tensor
    union_marks: torch.Tensor
    topp_scratch: torch.Tensor
    score_parts: torch.Tensor
    num_sms: int
    mid_o: torch.Tensor
    mid_lse: torch.Tensor
    # side streams of the row groups (CUDA): one more than the groups need (``side_streams``)
    streams: list = field(default_factory=list)
    # step layouts (see step_layout) by (requests, Quest alone), for one launch table version
    _layouts: dict = field(default_factory=dict, repr=False)
    _layouts_version: int = field(default=-1, repr=False)

    @classmethod
    def allocate(cls, max_rows, num_kv_heads, group, head_dim, budget, page_size, max_context,
                 device):
        C = capacity_for(budget, page_size)
        max_pages = max(1, -(-int(max_context) // page_size))
        H, G = num_kv_heads, group
        np_alloc = -(-max_pages // 64) * 64
        cuda = torch.device(device).type == "cuda"
        sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 8
        # the split counts depend on R only; size the partials for the worst R
        mid_rows = max(_mid_rows(_group_plan(r, H, sms, keep_all), H)
                       for r in range(1, max_rows + 1) for keep_all in (False, True))
        n_groups = max(decode_groups(r, keep_all) for r in range(1, max_rows + 1)
                       for keep_all in (False, True))
        kw = dict(device=device)
        return cls(
            max_rows, H, G, head_dim, C, max_pages,
            page_scores=torch.empty(max_rows, H, np_alloc, dtype=torch.float32, **kw),
            cand_pages=torch.zeros(max_rows, H, C // page_size, dtype=torch.int32, **kw),
            cand_counts=torch.zeros(max_rows, H, dtype=torch.int32, **kw),
            scores=torch.empty(max_rows, H, G, C, dtype=torch.float32, **kw),
            kept_slots=torch.zeros(max_rows, H, C, dtype=torch.int32, **kw),
            kept_counts=torch.zeros(max_rows, H, dtype=torch.int32, **kw),
            head_lo=torch.zeros(max_rows * H * G, dtype=torch.int32, **kw),
            head_tot=torch.zeros(max_rows * H * G, dtype=torch.float32, **kw),
            head_max=torch.zeros(max_rows * H * G, dtype=torch.float32, **kw),
            union_marks=torch.zeros(max_rows, H, C, dtype=torch.int8, **kw),
            topp_scratch=torch.empty(2 * max_rows * H * G * _prune.topp_scratch_width(C),
                                     dtype=torch.int32, **kw),
            score_parts=torch.empty(max_rows, H, G, 2, _prune.score_parts_width(C),
                                    dtype=torch.float32, **kw),
            num_sms=sms,
            mid_o=torch.empty(mid_rows * G, head_dim, dtype=torch.float32, **kw),
            mid_lse=torch.empty(mid_rows * G, dtype=torch.float32, **kw),
            streams=[torch.cuda.Stream(device) for _ in range(n_groups)]
            if cuda and n_groups > 1 else [],
        )

    def step_layout(self, R: int, keep_all: bool) -> list[tuple[int, int, int, dict]]:
        """The plan of a step of ``R`` requests, made once and reused by every layer of every
        such step: per row group, ``(r0, r1, attend splits, its slices of this workspace)``
        (the slices as ``_decode_rows_triton``'s keyword arguments). ``keep_all``: Quest alone.
        Raises ValueError when the partials cannot hold the plan's split rows."""
        if self._layouts_version != _launch.version():  # the table changed: plans may too
            self._layouts, self._layouts_version = {}, _launch.version()
        key = (R, bool(keep_all))
        layout = self._layouts.get(key)
        if layout is not None:
            return layout
        H, G = self.num_kv_heads, self.group
        plan = _group_plan(R, H, self.num_sms, keep_all)
        need = _mid_rows(plan, H) * G
        if self.mid_lse.numel() < need:
            raise ValueError(f"workspace partials hold {self.mid_lse.numel()} rows, a step of {R} "
                             f"requests needs {need}: allocate it under the same decode_groups "
                             f"launch shape")
        width = _prune.topp_scratch_width(self.capacity)
        layout, mid = [], 0
        for r0, r1, splits in plan:
            rows, heads = slice(r0, r1), slice(r0 * H * G, r1 * H * G)
            n_mid = (r1 - r0) * H * splits * G
            layout.append((r0, r1, splits, dict(
                page_scores=self.page_scores[rows], cand_pages=self.cand_pages[rows],
                cand_counts=self.cand_counts[rows], scores=self.scores[rows],
                kept_slots=self.kept_slots[rows], kept_counts=self.kept_counts[rows],
                lo=self.head_lo[heads], tot=self.head_tot[heads], mx=self.head_max[heads],
                marks=self.union_marks[rows], scratch=self.topp_scratch[2 * r0 * H * G * width:],
                parts=self.score_parts[rows], mid_o=self.mid_o[mid: mid + n_mid],
                mid_lse=self.mid_lse[mid: mid + n_mid])))
            mid += n_mid
        self._layouts[key] = layout
        return layout

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (
            self.page_scores, self.cand_pages, self.cand_counts, self.scores, self.kept_slots,
            self.kept_counts, self.head_lo, self.head_tot, self.head_max, self.union_marks,
            self.topp_scratch, self.score_parts, self.mid_o, self.mid_lse))


def twilight_decode(q, k_buffer, v_buffer, side: SidecarLayer, req_to_token, req_pool_indices,
                    seq_lens, p=None, *, budget, page_size, sm_scale, min_budget=1, max_budget=0,
                    min_sparse_len=0, selector="quest", quest_only=False, backend="auto",
                    workspace: DecodeWorkspace | None = None, out=None):
    """One sparse decode step of one layer: select -> prune -> attend. -> (o [R, Hq, D], kept_counts
    int32 [R, Hkv]).

    ``q`` ``[R, Hq, D]``; ``k_buffer`` / ``v_buffer`` the layer's KV pool ``[S, Hkv, D]``;
    ``side`` its sidecar; ``req_to_token`` int32 ``[rows, max_ctx]`` with ``req_pool_indices``
    ``[R]`` its row per request and ``seq_lens`` ``[R]``; ``p`` the top-p of each request, a
    float or fp32 ``[R]`` (rows with ``p >= 1`` keep every candidate). ``quest_only``: Quest
    alone, every candidate attended, no estimate and no top-p (``p`` unused; the counts are the
    candidates'). Rows with ``seq_len < min_sparse_len`` keep every token (exact dense
    attention); that needs ``min_sparse_len <= budget``. ``selector="none"`` takes every token
    as a candidate (needs ``budget >= max seq_len``). All shapes depend on (R, budget, max
    context) only. With the Triton backend the requests may run in row groups (the launch
    table's ``decode_groups``), each on one of the workspace's CUDA streams, forked from the
    caller's stream and joined back before returning.
    """
    R = q.shape[0]
    if min_sparse_len > capacity_for(budget, page_size):
        raise ValueError(f"min_sparse_len {min_sparse_len} must be <= budget {budget}")
    if quest_only:
        p = 1.0  # every candidate: rows keep what Quest selected
    elif p is None:
        raise ValueError("twilight_decode needs p (a float or one per request), or quest_only")
    kq, kscale, kzero, kmax, kmin, kbscale = side.as_tuple()
    pr = _prune._rows_p(p, R, q.device)
    if min_sparse_len > 0:
        pr = torch.where(seq_lens.to(q.device) < min_sparse_len, torch.ones_like(pr), pr)
    if selector not in ("quest", "none"):
        raise ValueError(f"selector must be 'quest' or 'none', got {selector!r}")
    if not _use_triton(backend, q):
        sel_budget = budget
        if selector == "none":
            sel_budget = max(budget, int(seq_lens.max().item()))
        cand, cnt = _select.quest_select_ref(q, kmax, kmin, kbscale, req_to_token, req_pool_indices,
                                            seq_lens, sel_budget, page_size)
        kept, kcnt = _prune.twilight_prune_ref(q, kq, kscale, kzero, cand, cnt, pr, sm_scale,
                                              min_budget, max_budget)
        o = _attend.sparse_decode_attention_ref(q, k_buffer, v_buffer, kept, kcnt, sm_scale)
        if out is not None:
            out.copy_(o)
            o = out
        return o, kcnt
    ws = workspace
    if ws is None:
        max_ctx = int(seq_lens.max().item())
        if selector == "none":
            budget = max(budget, max_ctx)
        ws = DecodeWorkspace.allocate(R, kq.shape[1], q.shape[1] // kq.shape[1], q.shape[2], budget,
                                      page_size, max_ctx, q.device)
    elif selector == "none" and ws.capacity < ws.max_pages * page_size:
        raise ValueError("selector 'none' needs a workspace whose capacity covers the max context")
    layout = ws.step_layout(R, quest_only)
    if out is None:
        out = torch.empty_like(q)
    main = torch.cuda.current_stream(q.device) if q.is_cuda else None
    streams = side_streams(ws.streams, main, len(layout) - 1)  # none: one after the other
    for s in streams:
        s.wait_stream(main)  # every group starts after what came before the step
    step_heads = R * ws.num_kv_heads * ws.group
    for i, (r0, r1, splits, bufs) in enumerate(layout):
        rows = slice(r0, r1)
        args = (q[rows], k_buffer, v_buffer, side, req_to_token, req_pool_indices[rows],
                seq_lens[rows], None if quest_only else pr[rows])
        kw = dict(budget=ws.capacity, page_size=page_size, sm_scale=sm_scale,
                  min_budget=min_budget, max_budget=max_budget, max_pages=ws.max_pages,
                  splits=splits, out=out[rows], step_heads=step_heads, **bufs)
        if i > 0 and streams:
            with torch.cuda.stream(streams[i - 1]):
                _decode_rows_triton(*args, **kw)
        else:
            _decode_rows_triton(*args, **kw)
    for s in streams:
        main.wait_stream(s)  # the step ends when every group has
    return out, (ws.cand_counts if quest_only else ws.kept_counts)[:R]  # Quest alone: candidates


def side_streams(pool, main, n):
    """``n`` streams of a workspace's ``pool`` for the row groups besides the caller's stream
    ``main``, or [] (the groups then run one after the other) when the pool has too few.
    PyTorch hands its streams out round-robin from a pool of 32, so one of a workspace's may be
    the caller's own (a CUDA graph's capture stream, created once per process): a group put on
    it ran after the others instead of beside them, and a step's time depended on how many
    streams the process had taken before (the benchmark's 8k batch 16 step: 0.1576 ms after the
    32k and 16k cases, 0.1167 alone). A workspace holds one stream more than its groups need."""
    side = [s for s in pool if s != main][:n]
    return side if n > 0 and len(side) == n else []


def _decode_rows_triton(q, k_buffer, v_buffer, side, req_to_token, req_pool_indices, seq_lens,
                        p, *, budget, page_size, sm_scale, min_budget, max_budget, max_pages,
                        splits, out, page_scores, cand_pages, cand_counts, scores, kept_slots,
                        kept_counts, lo, tot, mx, marks, scratch, parts, mid_o, mid_lse,
                        step_heads):
    """select -> prune -> attend of a group of rows, in the caller's workspace slices: ``p``
    fp32 ``[rows]``, or None for Quest alone (every candidate attended). ``step_heads``: q heads
    of the whole step (the top-p launch shape)."""
    pages, cnt = _select.quest_select_pages_triton(
        q, side.kmax, side.kmin, side.kbscale, req_to_token, req_pool_indices, seq_lens, budget,
        page_size, max_pages=max_pages, scores=page_scores, cand_pages=cand_pages,
        cand_counts=cand_counts)
    if p is None:
        kept, kcnt = _prune.expand_candidates_triton(pages, cnt, page_size, kept_slots)
    else:
        kept, kcnt = _prune.twilight_prune_triton(
            q, side.kq, side.kscale, side.kzero, pages, cnt, p, sm_scale, min_budget, max_budget,
            scores=scores, kept_slots=kept_slots, kept_counts=kept_counts, lo=lo, tot=tot,
            page_size=page_size, scratch=scratch, mx=mx, marks=marks, step_heads=step_heads,
            parts=parts)
    _attend.sparse_decode_attention_triton(q, k_buffer, v_buffer, kept, kcnt, sm_scale, out=out,
                                           splits=splits, mid_o=mid_o, mid_lse=mid_lse)


def decode_groups(num_requests: int, keep_all: bool = False) -> int:
    """How many row groups (streams) a step of ``num_requests`` requests runs in (the launch
    table's ``decode_groups``); ``keep_all``: Quest alone."""
    cfg = _launch.get("decode_groups")
    if num_requests < cfg["min_requests"]:
        return 1
    n = cfg["keep_all_groups"] if keep_all else cfg["groups"]
    return max(1, min(int(n), num_requests))


def _row_groups(R: int, n: int) -> list[tuple[int, int]]:
    """[r0, r1) of ``n`` groups of about R / n requests each (the larger ones first)."""
    base, extra = divmod(R, n)
    bounds, r0 = [], 0
    for i in range(n):
        r1 = r0 + base + (i < extra)
        bounds.append((r0, r1))
        r0 = r1
    return bounds


def _group_plan(R: int, H: int, sms: int, keep_all: bool) -> list[tuple[int, int, int]]:
    """(r0, r1, attend splits) of each row group of a step of R requests: each group splits its
    own (request, KV head) rows."""
    return [(r0, r1, _attend.attend_splits((r1 - r0) * H, sms, keep_all))
            for r0, r1 in _row_groups(R, decode_groups(R, keep_all))]


def _mid_rows(plan: list[tuple[int, int, int]], H: int) -> int:
    """(request, KV head, split) partial rows a step of ``plan``'s groups uses."""
    return sum((r1 - r0) * H * splits for r0, r1, splits in plan)
