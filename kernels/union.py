"""Union: the GQA union of the q heads' kept sets, the budget clamps, the compaction.

Stage 5 of a decode step, a program per (request, KV head) row. The kept set of the row is the
union of its G q heads' top-p sets (the byte marks ``topp`` left) plus the newest token, which
is always kept. Its size is clamped to ``[min_budget, max_budget]`` (``max_budget`` 0: no cap):
when a clamp binds, exactly that many entries are kept, the heaviest by the weight ``w = max over
the group of exp(s - max) / sum`` (recomputed from the scores only then), with the union before
the rest and the newest first of all, ties to the lower index (``topp._topk_mask``). The kept
slots are written in candidate order, so ``attend`` reads them in logical order; the marks are
cleared for the next call. A row with ``p >= 1`` keeps every candidate and skips the clamps.

Quest alone (every candidate attended) runs the same kernel as an expansion of page lists into
slot lists (``expand_candidates_triton``).

Shapes: ``scores`` fp32 ``[R, H, G, C]`` (only read), ``marks`` int8 ``[R, H, >= C]``,
candidates as page lists int32 ``[R, H, K]`` (``page_size > 0``) or slot lists ``[R, H, C]``
with counts int32 ``[R, H]``; out: ``kept_slots`` int32 ``[R, H, C]`` and ``kept_counts`` int32
``[R, H]``.
"""

from __future__ import annotations

import torch

from . import launch
from .launch import next_pow2
from .topp import _KEEP_ALL_P, _rows_p

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def _topk_by_key_ref(key: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """key [..., N] float, k [...] -> mask of the k largest (ties -> lower index)."""
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(key.shape[-1], device=key.device).expand_as(order).contiguous())
    return rank < k[..., None]


def union_ref(probs, kept, cand_slots, cand_counts, p, min_budget, max_budget):
    """The definition.

    Parameters
    ----------
    probs, kept : torch.Tensor
        fp32 and bool ``[R, H, G, C]``: each q head's probabilities and top-p set
        (``topp.topp_heads_ref``).
    cand_slots : torch.Tensor
        int ``[R, H, C]`` candidate slots.
    cand_counts : torch.Tensor
        int ``[R, H]``.
    p : float or torch.Tensor
        Top-p, one value or fp32 ``[R]``: rows with ``p >= 1`` keep every candidate.
    min_budget, max_budget : int
        Kept tokens per row, at least (at most the count) and at most (0: no cap).

    Returns
    -------
    (kept_slots, kept_counts) : (torch.Tensor, torch.Tensor)
        int32 ``[R, H, C]`` (candidate order, 0 past the count) and int32 ``[R, H]``.
    """
    R, H, G, C = probs.shape
    pr = _rows_p(p, R, probs.device)
    mask = kept
    idx = torch.arange(C, device=probs.device)[None, None, :]
    counts = cand_counts.long()[:, :, None]
    valid = idx < counts
    newest = idx == counts - 1
    union = (mask.any(2) & valid) | newest
    w = probs.amax(2)
    key = torch.where(valid, w + 2.0 * union, -1.0)
    key = torch.where(newest, 4.0, key)
    n_union = union.sum(-1)
    n_valid = cand_counts.long()
    k = torch.maximum(n_union, torch.minimum(torch.full_like(n_union, int(min_budget)), n_valid))
    if max_budget and max_budget > 0:
        k = torch.minimum(k, torch.full_like(k, int(max_budget)))
    keep_all = (pr >= _KEEP_ALL_P)[:, None]
    k = torch.where(keep_all, n_valid, k)
    keep = _topk_by_key_ref(key, k) & valid
    kept_counts = keep.sum(-1)
    rank = torch.cumsum(keep.long(), -1) - 1
    out = torch.zeros(R, H, C + 1, dtype=torch.long, device=probs.device)
    out.scatter_(-1, torch.where(keep, rank, C), torch.where(keep, cand_slots.long(), 0))
    return out[..., :C].to(torch.int32).contiguous(), kept_counts.to(torch.int32)


def kept_set_differences(k1, n1, k2, n2):
    """Kept slot lists [R, H, C] with counts [R, H], twice -> (rows, rows whose sets differ, the
    largest symmetric difference of a row); near-ties of fp32 summation order may flip an entry."""
    C = k1.shape[-1]
    idx = torch.arange(C, device=k1.device)
    big = torch.iinfo(torch.int64).max

    def sorted_rows(k, n):
        k = torch.where(idx < n.long()[..., None], k.long(), big)
        return k.flatten(0, 1).sort(-1).values

    a, b = sorted_rows(k1, n1), sorted_rows(k2, n2)

    def missing(x, y):  # entries of x (not padding) absent from y, per row
        pos = torch.searchsorted(y, x).clamp_max(C - 1)
        return ((y.gather(-1, pos) != x) & (x != big)).sum(-1)

    d = missing(a, b) + missing(b, a)
    return d.numel(), int((d > 0).sum()), int(d.max())


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------

if triton is not None:
    from .select import _candidate_slots
    from .topp import _f32_key, _group_ranks, _topk_mask

    @triton.jit
    def _union_compact_kernel(
        s_ptr, mark_ptr, max_ptr, tot_ptr, cand_ptr, count_ptr, p_ptr, kept_ptr, kept_count_ptr,
        min_budget, max_budget, stride_sr, stride_sh, stride_sg, stride_mr, stride_mh, stride_cr,
        stride_ch, stride_kr, stride_kh, H: tl.constexpr, G: tl.constexpr, C_PAD: tl.constexpr,
        P: tl.constexpr, FROM_PAGES: tl.constexpr, KEEP_ALL: tl.constexpr, V: tl.constexpr,
    ):
        """One program per (request, kv head): the union over the group (the marks the top-p
        kernel left, plus the newest token), the budget clamps, the compaction; the marks are
        cleared for the next call. Only when a clamp binds are the weights needed: then
        w = max over the group of exp(s - max) / sum is recomputed from the scores.
        ``KEEP_ALL``: every candidate is kept (Quest alone; no score or mark is read): the row
        as [C_PAD], so that its C_PAD kept slots are stored coalesced. Else the row is held as
        [C_PAD / V, V], V neighbours in one thread (a page's tokens when V is the page size:
        one page id loaded for them), ranked by ``_group_ranks`` (the kept slots are few, their
        stores scattered anyway)."""
        rh = tl.program_id(0)
        r = rh // H
        h = rh % H
        count = tl.load(count_ptr + r * H + h)
        cbase = cand_ptr + r * stride_cr + h * stride_ch
        kbase = kept_ptr + r * stride_kr + h * stride_kh
        if KEEP_ALL:
            idx = tl.arange(0, C_PAD)
            keep = idx < count
            n_keep = count
            dest = tl.cumsum(keep.to(tl.int32), 0) - 1
            slot = _candidate_slots(cbase, idx, keep, P, FROM_PAGES)
        else:
            grp = tl.arange(0, C_PAD // V)
            idx = grp[:, None] * V + tl.arange(0, V)[None, :]
            valid = idx < count
            keep = valid
            n_keep = count
            if tl.load(p_ptr + r) < 1.0:
                mark_row = mark_ptr + r * stride_mr + h * stride_mh + idx
                marked = tl.load(mark_row, mask=valid, other=0) != 0
                tl.store(mark_row, tl.zeros([C_PAD // V, V], tl.int8), mask=marked)
                union = valid & (marked | (idx == count - 1))  # the newest token is always kept
                n_union = tl.sum(tl.sum(union.to(tl.int32), 1), 0)
                k = tl.maximum(n_union, tl.minimum(min_budget, count))
                if max_budget > 0:
                    k = tl.minimum(k, max_budget)
                if k != n_union:
                    w = tl.zeros([C_PAD // V, V], tl.float32)
                    for g in tl.static_range(G):
                        s = tl.load(s_ptr + r * stride_sr + h * stride_sh + g * stride_sg + idx,
                                    mask=valid, other=float("-inf"))
                        e = tl.exp(s - tl.load(max_ptr + rh * G + g))
                        w = tl.maximum(w, e / tl.load(tot_ptr + rh * G + g))
                    rank_key = tl.where(valid, w + 2.0 * union.to(tl.float32), -1.0)
                    rank_key = tl.where(idx == count - 1, 4.0, rank_key)
                    chosen = _topk_mask(tl.reshape(_f32_key(rank_key), [C_PAD]),
                                        tl.reshape(valid, [C_PAD]), k, count)
                    union = tl.reshape(chosen, [C_PAD // V, V])
                keep = union & valid
                n_keep = k  # the union, or exactly k when a clamp binds (k <= count)
            dest, n_grp = _group_ranks(keep)
            if FROM_PAGES and V == P:  # a group is one page: one id for its V slots
                page = tl.load(cbase + grp, mask=n_grp > 0, other=0).to(tl.int64)
                slot = page[:, None] * P + tl.arange(0, V)[None, :]
            else:
                slot = _candidate_slots(cbase, idx, keep, P, FROM_PAGES)
        tl.store(kbase + dest, slot.to(tl.int32), mask=keep)
        tl.store(kept_count_ptr + r * H + h, n_keep)  # known: not one more reduction


def _union_shape(c_pad: int, page_size: int, from_pages: bool) -> int:
    """V of ``_union_compact_kernel``'s pruned rows: a page's tokens when the page size is a
    power of two that fits the row (one page id loaded per group), else 4 neighbours."""
    if from_pages and page_size >= 4 and page_size & (page_size - 1) == 0 and page_size <= c_pad:
        return page_size
    return min(4, c_pad)


def _union_regs(step_heads: int) -> dict:
    """The union kernel's register cap: ``maxnreg["union"]`` when set, else ``union_cap`` from
    its ``from_heads`` q heads in the whole step on."""
    cap = launch.get("union_cap")
    if launch.get("maxnreg").get("union") is None and step_heads >= cap["from_heads"]:
        return dict(maxnreg=cap["maxnreg"])
    return launch.maxnreg("union")


def union_compact_triton(scores, marks, mx, tot, cand_slots, cand_counts, pr, kept_slots,
                         kept_counts, min_budget, max_budget, page_size=0, step_heads=None):
    """The union, clamps and compaction of every (request, KV head) row, one kernel launch.

    Parameters
    ----------
    scores : torch.Tensor
        fp32 ``[R, H, G, C]``, read only where a clamp binds.
    marks : torch.Tensor
        int8 ``[R, H, >= C]``: 1 where some q head keeps the entry (``topp.topp_marks_triton``);
        left all zero.
    mx, tot : torch.Tensor
        fp32 ``R * H * G``: each q head's row max and sum of ``exp(s - max)``.
    cand_slots, cand_counts : torch.Tensor
        Page lists int32 ``[R, H, K]`` (``page_size > 0``) or slot lists ``[R, H, C]``; int32
        ``[R, H]``.
    pr : torch.Tensor
        fp32 ``[R]``: rows with ``p >= 1`` keep every candidate.
    kept_slots, kept_counts : torch.Tensor
        Out: int32 ``[R, H, >= C]`` and int32 ``[R, H]``.
    min_budget, max_budget : int
        As in ``union_ref``.
    page_size : int
        ``P`` of the page lists, or 0.
    step_heads : int, optional
        q heads of the whole decode step (the register cap); default ``R * H * G``.
    """
    R, H, G, C = scores.shape
    C_PAD = next_pow2(C)
    strides = (scores.stride(0), scores.stride(1), scores.stride(2))
    mstrides = (marks.stride(0), marks.stride(1))
    _union_compact_kernel[(R * H,)](
        scores, marks, mx, tot, cand_slots, cand_counts, pr, kept_slots, kept_counts,
        int(min_budget), int(max_budget or 0), *strides, *mstrides, cand_slots.stride(0),
        cand_slots.stride(1), kept_slots.stride(0), kept_slots.stride(1), H=H, G=G, C_PAD=C_PAD,
        P=max(page_size, 1), FROM_PAGES=page_size > 0, KEEP_ALL=False,
        V=_union_shape(C_PAD, page_size, page_size > 0), num_warps=launch.row_warps(C_PAD),
        **_union_regs(step_heads or R * H * G),
    )
    return kept_slots, kept_counts


def expand_candidates_triton(cand_pages, cand_counts, page_size, kept_slots=None):
    """Every candidate kept (Quest alone): page lists int32 ``[R, H, K]`` with counts int32
    ``[R, H]`` -> (``kept_slots`` int32 ``[R, H, K * P]``, ``cand_counts``), the layout of the
    prune's output."""
    R, H, K = cand_pages.shape
    C = K * page_size
    if kept_slots is None:
        kept_slots = torch.zeros(R, H, C, dtype=torch.int32, device=cand_pages.device)
    ones = torch.ones(R, dtype=torch.float32, device=cand_pages.device)
    C_PAD = next_pow2(C)
    _union_compact_kernel[(R * H,)](
        cand_pages, cand_pages, cand_pages, cand_pages, cand_pages, cand_counts, ones, kept_slots,
        cand_counts, 0, 0, 0, 0, 0, 0, 0, cand_pages.stride(0), cand_pages.stride(1),
        kept_slots.stride(0), kept_slots.stride(1), H=H, G=1, C_PAD=C_PAD, P=page_size,
        FROM_PAGES=True, KEEP_ALL=True, V=1, num_warps=launch.row_warps(C_PAD),
    )
    return kept_slots, cand_counts
