"""Twilight's functional API: one function per stage of a sparse decode step.

Every function has a plain-torch reference (runs anywhere, the definition) and a Triton kernel (CUDA,
or the CPU under ``TRITON_INTERPRET=1``) with the same result; ``backend`` picks: ``"auto"`` (Triton
for CUDA tensors, torch otherwise), ``"torch"`` or ``"triton"``. The contract - shapes, dtypes,
tie rules - is written down in docs/OPS.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_twilight.kernels import attend as _attend
from sglang_twilight.kernels import int4 as _int4
from sglang_twilight.kernels import quest as _quest
from sglang_twilight.kernels import topp as _topp

__all__ = [
    "quantize_int4",
    "dequantize_int4",
    "store_sidecar",
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

capacity_for = _quest.capacity_for


def _use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        if _int4.triton is None:
            raise RuntimeError("backend='triton' requested but Triton is not installed")
        return True
    if backend != "auto":
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    return _int4.triton is not None and all(t.is_cuda for t in tensors)


def quantize_int4(k: torch.Tensor):
    """k [..., D] -> (packed uint8 [..., D//2], scale fp16 [...], zero fp16 [...])."""
    return _int4.quantize_int4_ref(k)


def dequantize_int4(packed, scale, zero, dtype=torch.float32):
    """Inverse of quantize_int4: -> [..., D] in ``dtype``; error <= scale / 2 per element."""
    return _int4.dequantize_int4_ref(packed, scale, zero, dtype)


def store_sidecar(k_buffer, loc, kq, kscale, kzero, kmax, kmin, page_size, *, backend="auto"):
    """Write int4 K of ``k_buffer[loc]`` and recompute the Quest bounds of every page ``loc`` touches."""
    if _use_triton(backend, k_buffer):
        return _int4.store_sidecar_triton(k_buffer, loc, kq, kscale, kzero, kmax, kmin, page_size)
    return _int4.store_sidecar_ref(k_buffer, loc, kq, kscale, kzero, kmax, kmin, page_size)


def quest_page_scores(q, kmax, kmin, page_table, num_pages):
    """GQA Quest upper bound per (request, KV head, page): [R, Hkv, NP] fp32, -inf past the end."""
    return _quest.quest_page_scores_ref(q, kmax, kmin, page_table, num_pages)


def quest_select(q, kmax, kmin, req_to_token, req_pool_indices, seq_lens, budget, page_size, *,
                 backend="auto", max_pages=None):
    """-> (cand_slots int32 [R, Hkv, C], cand_counts int32 [R, Hkv]), C = capacity_for(budget)."""
    if _use_triton(backend, q):
        return _quest.quest_select_triton(q, kmax, kmin, req_to_token, req_pool_indices, seq_lens,
                                          budget, page_size, max_pages=max_pages)
    return _quest.quest_select_ref(q, kmax, kmin, req_to_token, req_pool_indices, seq_lens, budget,
                                   page_size)


def int4_scores(q, kq, kscale, kzero, cand_slots, cand_counts, sm_scale, *, backend="auto"):
    """sm_scale * q . dequant(k) over the candidates: [R, Hkv, G, C] fp32 (-inf past the count
    with the torch backend; the Triton kernel leaves the tail untouched)."""
    if _use_triton(backend, q):
        return _topp.int4_scores_triton(q, kq, kscale, kzero, cand_slots, cand_counts, sm_scale)
    return _topp.int4_scores_ref(q, kq, kscale, kzero, cand_slots, cand_counts, sm_scale)


def topp_mask(probs: torch.Tensor, p) -> torch.Tensor:
    """Smallest set per row whose sum reaches p (ties at the threshold kept), by bisection."""
    return _topp.topp_mask_ref(probs, p)


def twilight_prune(q, kq, kscale, kzero, cand_slots, cand_counts, p, sm_scale, min_budget=1,
                   max_budget=0, *, backend="auto"):
    """-> (kept_slots int32 [R, Hkv, C], kept_counts int32 [R, Hkv])."""
    if _use_triton(backend, q):
        return _topp.twilight_prune_triton(q, kq, kscale, kzero, cand_slots, cand_counts, p,
                                           sm_scale, min_budget, max_budget)
    return _topp.twilight_prune_ref(q, kq, kscale, kzero, cand_slots, cand_counts, p, sm_scale,
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
    num_sms: int
    mid_o: torch.Tensor
    mid_lse: torch.Tensor

    @classmethod
    def allocate(cls, max_rows, num_kv_heads, group, head_dim, budget, page_size, max_context,
                 device):
        C = capacity_for(budget, page_size)
        max_pages = max(1, -(-int(max_context) // page_size))
        H, G = num_kv_heads, group
        np_alloc = -(-max_pages // 64) * 64
        sms = (torch.cuda.get_device_properties(device).multi_processor_count
               if torch.device(device).type == "cuda" else 8)
        # the split count depends on R only; size the scratch for the worst R
        mid_rows = max(r * H * _attend.attend_splits(r * H, sms, keep_all)
                       for r in range(1, max_rows + 1) for keep_all in (False, True))
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
            topp_scratch=torch.empty(2 * max_rows * H * G * _topp.topp_scratch_width(C),
                                     dtype=torch.int32, **kw),
            num_sms=sms,
            mid_o=torch.empty(mid_rows * G, head_dim, dtype=torch.float32, **kw),
            mid_lse=torch.empty(mid_rows * G, dtype=torch.float32, **kw),
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (
            self.page_scores, self.cand_pages, self.cand_counts, self.scores, self.kept_slots,
            self.kept_counts, self.head_lo, self.head_tot, self.head_max, self.union_marks,
            self.topp_scratch, self.mid_o, self.mid_lse))


def _static_keep_all(p) -> bool:
    """p known on the host to be >= 1 for every row: the prune stage would keep everything."""
    return isinstance(p, (int, float)) and p >= 1.0


def twilight_decode(q, k_buffer, v_buffer, kq, kscale, kzero, kmax, kmin, req_to_token,
                    req_pool_indices, seq_lens, p, *, budget, page_size, sm_scale, min_budget=1,
                    max_budget=0, min_sparse_len=0, selector="quest", backend="auto",
                    workspace: DecodeWorkspace | None = None, out=None):
    """One sparse decode step of one layer: select -> prune -> attend. -> (o [R, Hq, D], kept_counts).

    A Python-float ``p >= 1`` skips the estimate and top-p (Quest alone); a tensor ``p`` always
    runs them (rows with ``p >= 1`` keep every candidate). Rows with ``seq_len < min_sparse_len``
    keep every token (exact dense attention); that needs
    ``min_sparse_len <= budget``. ``selector="none"`` takes every token as a candidate (needs
    ``budget >= max seq_len``). All shapes depend on (R, budget, max context) only.
    """
    R = q.shape[0]
    if min_sparse_len > capacity_for(budget, page_size):
        raise ValueError(f"min_sparse_len {min_sparse_len} must be <= budget {budget}")
    pr = _topp._rows_p(p, R, q.device)
    if min_sparse_len > 0:
        pr = torch.where(seq_lens.to(q.device) < min_sparse_len, torch.ones_like(pr), pr)
    if selector not in ("quest", "none"):
        raise ValueError(f"selector must be 'quest' or 'none', got {selector!r}")
    if not _use_triton(backend, q):
        sel_budget = budget
        if selector == "none":
            sel_budget = max(budget, int(seq_lens.max().item()))
        cand, cnt = _quest.quest_select_ref(q, kmax, kmin, req_to_token, req_pool_indices, seq_lens,
                                            sel_budget, page_size)
        kept, kcnt = _topp.twilight_prune_ref(q, kq, kscale, kzero, cand, cnt, pr, sm_scale,
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
    pages, cnt = _quest.quest_select_pages_triton(
        q, kmax, kmin, req_to_token, req_pool_indices, seq_lens, ws.capacity, page_size,
        max_pages=ws.max_pages, scores=ws.page_scores[:R], cand_pages=ws.cand_pages[:R],
        cand_counts=ws.cand_counts[:R])
    if _static_keep_all(p):  # Quest alone: attend over every candidate
        kept, kcnt = _topp.expand_candidates_triton(pages, cnt, page_size, ws.kept_slots[:R])
    else:
        G = q.shape[1] // kq.shape[1]
        n_heads = R * kq.shape[1] * G
        kept, kcnt = _topp.twilight_prune_triton(
            q, kq, kscale, kzero, pages, cnt, pr, sm_scale, min_budget, max_budget,
            scores=ws.scores[:R], kept_slots=ws.kept_slots[:R], kept_counts=ws.kept_counts[:R],
            lo=ws.head_lo[:n_heads], tot=ws.head_tot[:n_heads], page_size=page_size,
            scratch=ws.topp_scratch, mx=ws.head_max[:n_heads],
            marks=ws.union_marks[:R])
    o = _attend.sparse_decode_attention_triton(
        q, k_buffer, v_buffer, kept, kcnt, sm_scale, out=out,
        splits=_attend.attend_splits(R * ws.num_kv_heads, ws.num_sms, _static_keep_all(p)),
        mid_o=ws.mid_o, mid_lse=ws.mid_lse)
    return o, kcnt
