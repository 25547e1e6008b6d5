"""Stages 5-7: int4 score estimate, softmax, top-p by bisection, GQA union, budget clamps.

Top-p is found the way the paper's Algorithm 1 does it - a bisection on the threshold, no sort -
but over the *bit pattern* of the fp32 weights: for non-negative floats the int32 bits are ordered
like the values, so integer halvings land exactly on the largest threshold ``t`` with
``sum(w[w >= t]) >= target`` (no epsilon, no iteration count to tune). The reference halves the
whole bit range (31 steps); the kernel halves between the smallest and largest keys still possible
and stops when one is left (``quest._threshold_search``) - the same ``t``. The kept set ``w >= t``
is the smallest set reaching the target; values tied at ``t`` are all kept.
"""

from __future__ import annotations

import torch

from ._launch import interpreting, next_pow2

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

from .int4 import dequantize_int4_ref

_KEEP_ALL_P = 1.0  # p >= 1 keeps every candidate (and skips the budget clamps)


def _rows_p(p, rows: int, device) -> torch.Tensor:
    if isinstance(p, torch.Tensor):
        pt = p.to(device=device, dtype=torch.float32).reshape(-1)
        if pt.numel() == 1:
            pt = pt.expand(rows)
        if pt.numel() != rows:
            raise ValueError(f"p has {pt.numel()} values for {rows} rows")
        return pt
    return torch.full((rows,), float(p), dtype=torch.float32, device=device)


def topp_mask_ref(probs: torch.Tensor, p) -> torch.Tensor:
    """probs fp32 [N_rows, N] (>= 0), p float or [N_rows] -> bool [N_rows, N]."""
    if probs.dim() != 2:
        raise ValueError(f"topp_mask: probs must be 2-D [rows, n], got shape {tuple(probs.shape)}")
    w = probs.float().clamp_min(0.0)
    rows = w.shape[0]
    pt = _rows_p(p, rows, w.device)
    if bool(((pt <= 0) | torch.isnan(pt)).any()):
        raise ValueError("topp_mask: p must be in (0, 1]")
    keys = w.view(torch.int32).long()  # w >= +0.0 -> monotone non-negative ints
    target = torch.minimum(pt, w.sum(-1))
    lo = torch.zeros(rows, dtype=torch.long, device=w.device)  # mass(keys >= 0) = total >= target
    hi = keys.max(-1).values + 1 if w.shape[1] else lo + 1  # mass(keys >= hi) = 0
    while bool((hi - lo > 1).any()):
        mid = (lo + hi) // 2
        mass = torch.where(keys >= mid[:, None], w, 0.0).sum(-1)
        ok = mass >= target
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    return (keys >= lo[:, None]) | (pt >= _KEEP_ALL_P)[:, None]


def gather_heads(buf: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """buf [S, H, ...], slots [R, H, C] -> [R, H, C, ...] (row h reads head h)."""
    H = buf.shape[1]
    h = torch.arange(H, device=slots.device)[None, :, None]
    return buf[slots.long(), h]


def int4_scores_ref(q, kq, kscale, kzero, cand_slots, cand_counts, sm_scale):
    """-> [R, Hkv, G, C] fp32, -inf past the count."""
    R, Hq, D = q.shape
    H = kq.shape[1]
    k = dequantize_int4_ref(gather_heads(kq, cand_slots), gather_heads(kscale, cand_slots),
                            gather_heads(kzero, cand_slots))  # [R, H, C, D]
    qg = q.float().view(R, H, Hq // H, D)
    s = torch.einsum("rhgd,rhcd->rhgc", qg, k) * sm_scale
    C = cand_slots.shape[-1]
    valid = torch.arange(C, device=q.device)[None, None, :] < cand_counts.long()[:, :, None]
    return torch.where(valid[:, :, None, :], s, float("-inf"))


def _topk_by_key_ref(key: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """key [..., N] float, k [...] -> mask of the k largest (ties -> lower index)."""
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(key.shape[-1], device=key.device).expand_as(order).contiguous())
    return rank < k[..., None]


def prune_from_scores_ref(scores, cand_slots, cand_counts, p, min_budget, max_budget):
    R, H, G, C = scores.shape
    probs = torch.softmax(scores, dim=-1)  # -inf -> 0 (every row has its newest token)
    pr = _rows_p(p, R, scores.device)
    mask = topp_mask_ref(probs.reshape(-1, C), pr[:, None].expand(R, H * G).reshape(-1)).view(R, H, G, C)
    idx = torch.arange(C, device=scores.device)[None, None, :]
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
    out = torch.zeros(R, H, C + 1, dtype=torch.long, device=scores.device)
    out.scatter_(-1, torch.where(keep, rank, C), torch.where(keep, cand_slots.long(), 0))
    return out[..., :C].to(torch.int32).contiguous(), kept_counts.to(torch.int32)


def twilight_prune_ref(q, kq, kscale, kzero, cand_slots, cand_counts, p, sm_scale, min_budget,
                       max_budget):
    scores = int4_scores_ref(q, kq, kscale, kzero, cand_slots, cand_counts, sm_scale)
    return prune_from_scores_ref(scores, cand_slots, cand_counts, p, min_budget, max_budget)


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------

if triton is not None:
    from .quest import _f32_key, _threshold_search, _topk_mask

    @triton.jit
    def _candidate_slots(base, n, nm, P: tl.constexpr, FROM_PAGES: tl.constexpr):
        """Slots of candidates n: from a slot list, or from a page list (page n // P, offset n % P)."""
        if FROM_PAGES:
            page = tl.load(base + n // P, mask=nm, other=0).to(tl.int64)
            return page * P + n % P
        else:
            return tl.load(base + n, mask=nm, other=0).to(tl.int64)

    @triton.jit
    def _estimate_kernel(
        q_ptr, kq_ptr, ks_ptr, kz_ptr, cand_ptr, count_ptr, out_ptr, sm_scale,
        stride_qr, stride_qh, stride_kqs, stride_kqh, stride_ss, stride_sh, stride_cr, stride_ch,
        stride_or, stride_oh, stride_og,
        H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
        BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, P: tl.constexpr, FROM_PAGES: tl.constexpr,
    ):
        """Grid (R*H, C/BLOCK_N): s = sm_scale * (scale * q.codes + zero * sum(q)).

        q.codes = codes_lo . q_even + codes_hi . q_odd: two tensor-core dots over the group's heads
        (codes 0..15 are exact in bf16/fp16, products accumulate in fp32).
        """
        rh = tl.program_id(0)
        nb = tl.program_id(1)
        r = rh // H
        h = rh % H
        count = tl.load(count_ptr + r * H + h)
        if nb * BLOCK_N >= count:
            return
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = n < count
        slot = _candidate_slots(cand_ptr + r * stride_cr + h * stride_ch, n, nm, P, FROM_PAGES)
        half = tl.arange(0, D // 2)
        packed = tl.load(kq_ptr + slot[:, None] * stride_kqs + h * stride_kqh + half[None, :],
                         mask=nm[:, None], other=0)
        g = tl.arange(0, G_PAD)
        gm = g < G
        qb = q_ptr + r * stride_qr + (h * G + g)[:, None] * stride_qh
        qe = tl.load(qb + 2 * half[None, :], mask=gm[:, None], other=0.0)  # [G_PAD, D/2]
        qo = tl.load(qb + 2 * half[None, :] + 1, mask=gm[:, None], other=0.0)
        qsum = tl.sum(qe.to(tl.float32), 1) + tl.sum(qo.to(tl.float32), 1)  # [G_PAD]
        if DOT_F32:  # the CPU interpreter has no bf16 dot
            qe = qe.to(tl.float32)
            qo = qo.to(tl.float32)
        lo = (packed & 0x0F).to(qe.dtype)
        hi = (packed >> 4).to(qe.dtype)
        dot = tl.dot(lo, tl.trans(qe)) + tl.dot(hi, tl.trans(qo))  # [BLOCK_N, G_PAD] fp32
        sc = tl.load(ks_ptr + slot * stride_ss + h * stride_sh, mask=nm, other=0.0).to(tl.float32)
        zr = tl.load(kz_ptr + slot * stride_ss + h * stride_sh, mask=nm, other=0.0).to(tl.float32)
        s = (sc[:, None] * dot + zr[:, None] * qsum[None, :]) * sm_scale
        optr = out_ptr + r * stride_or + h * stride_oh + g[None, :] * stride_og + n[:, None]
        tl.store(optr, s, mask=nm[:, None] & gm[None, :])

    @triton.jit
    def _topp_head_kernel(
        s_ptr, count_ptr, p_ptr, lo_ptr, tot_ptr, stride_sr, stride_sh, stride_sg,
        H: tl.constexpr, G: tl.constexpr, C_PAD: tl.constexpr,
    ):
        """One program per (request, q head): e = exp(s - max) in place, then the top-p threshold.

        Bisection over the int32 bits of e (non-negative floats order like their bits): ends on
        the largest threshold whose kept mass reaches p * sum(e), exactly; ``lo`` is written per
        head.
        """
        pid = tl.program_id(0)
        r = pid // (H * G)
        h = (pid // G) % H
        g = pid % G
        count = tl.load(count_ptr + r * H + h)
        p = tl.load(p_ptr + r)
        idx = tl.arange(0, C_PAD)
        valid = idx < count
        sp = s_ptr + r * stride_sr + h * stride_sh + g * stride_sg + idx
        s = tl.load(sp, mask=valid, other=float("-inf"))
        m = tl.max(s, 0)
        e = tl.where(valid, tl.exp(s - m), 0.0)
        tot = tl.sum(e, 0)
        lo = tl.zeros([], tl.int32)
        if p < 1.0:
            # entries under (1 - p) * tot / count can never be kept: together they weigh less
            # than the mass top-p may drop, so the search starts above them
            floor = (1.0 - p) * tot / count.to(tl.float32) * 0.999
            key = tl.where(valid & (e >= floor), e.to(tl.int32, bitcast=True), -1)
            lo = _threshold_search(key, e, p * tot, -1, 2147483647)
        tl.store(sp, e, mask=valid)
        tl.store(lo_ptr + pid, lo)
        tl.store(tot_ptr + pid, tot)

    @triton.jit
    def _union_compact_kernel(
        e_ptr, lo_ptr, tot_ptr, cand_ptr, count_ptr, p_ptr, kept_ptr, kept_count_ptr, min_budget,
        max_budget, stride_sr, stride_sh, stride_sg, stride_cr, stride_ch, stride_kr, stride_kh,
        H: tl.constexpr, G: tl.constexpr, C_PAD: tl.constexpr, P: tl.constexpr,
        FROM_PAGES: tl.constexpr,
    ):
        """One program per (request, kv head): union over the group, clamps, compaction."""
        rh = tl.program_id(0)
        r = rh // H
        h = rh % H
        count = tl.load(count_ptr + r * H + h)
        p = tl.load(p_ptr + r)
        idx = tl.arange(0, C_PAD)
        valid = idx < count
        if p < 1.0:
            union = idx == count - 1  # the newest token is always kept
            w = tl.zeros([C_PAD], tl.float32)
            for g in tl.static_range(G):
                e = tl.load(e_ptr + r * stride_sr + h * stride_sh + g * stride_sg + idx,
                            mask=valid, other=0.0)
                lo = tl.load(lo_ptr + rh * G + g)
                tot = tl.load(tot_ptr + rh * G + g)
                union = union | (valid & (e.to(tl.int32, bitcast=True) >= lo))
                w = tl.maximum(w, e / tot)
            n_union = tl.sum(union.to(tl.int32), 0)
            k = tl.maximum(n_union, tl.minimum(min_budget, count))
            if max_budget > 0:
                k = tl.minimum(k, max_budget)
            if k != n_union:
                rank_key = tl.where(valid, w + 2.0 * union.to(tl.float32), -1.0)
                rank_key = tl.where(idx == count - 1, 4.0, rank_key)
                union = _topk_mask(_f32_key(rank_key), valid, k)
            keep = union & valid
        else:
            keep = valid
        dest = tl.cumsum(keep.to(tl.int32), 0) - 1
        slot = _candidate_slots(cand_ptr + r * stride_cr + h * stride_ch, idx, keep, P, FROM_PAGES)
        tl.store(kept_ptr + r * stride_kr + h * stride_kh + dest, slot.to(tl.int32), mask=keep)
        tl.store(kept_count_ptr + r * H + h, tl.sum(keep.to(tl.int32), 0))


def int4_scores_triton(q, kq, kscale, kzero, cand_slots, cand_counts, sm_scale, out=None,
                       page_size=0):
    """``page_size > 0``: ``cand_slots`` holds page lists (see quest_select_pages_triton)."""
    R, Hq, D = q.shape
    H = kq.shape[1]
    G = Hq // H
    C = cand_slots.shape[-1] * max(page_size, 1)
    if out is None:
        out = torch.full((R, H, G, C), float("-inf"), dtype=torch.float32, device=q.device)
    BLOCK_N = 128
    _estimate_kernel[(R * H, triton.cdiv(C, BLOCK_N))](
        q, kq, kscale, kzero, cand_slots, cand_counts, out, float(sm_scale),
        q.stride(0), q.stride(1), kq.stride(0), kq.stride(1), kscale.stride(0), kscale.stride(1),
        cand_slots.stride(0), cand_slots.stride(1), out.stride(0), out.stride(1), out.stride(2),
        H=H, G=G, G_PAD=max(16, next_pow2(G)), D=D, BLOCK_N=BLOCK_N, DOT_F32=interpreting(),
        P=max(page_size, 1), FROM_PAGES=page_size > 0, num_warps=4,
    )
    return out


def _row_warps(c_pad: int) -> int:
    return 4 if c_pad <= 2048 else 8


def prune_from_scores_triton(scores, cand_slots, cand_counts, p, min_budget, max_budget,
                             kept_slots=None, kept_counts=None, lo=None, tot=None, page_size=0):
    """Top-p per q head, then union / clamps / compaction per KV head. Overwrites ``scores``
    with exp(s - max)."""
    R, H, G, C = scores.shape
    pr = _rows_p(p, R, scores.device)
    if kept_slots is None:
        kept_slots = torch.zeros(R, H, C, dtype=torch.int32, device=scores.device)
    if kept_counts is None:
        kept_counts = torch.empty(R, H, dtype=torch.int32, device=scores.device)
    if lo is None:
        lo = torch.empty(R * H * G, dtype=torch.int32, device=scores.device)
    if tot is None:
        tot = torch.empty(R * H * G, dtype=torch.float32, device=scores.device)
    C_PAD = next_pow2(C)
    strides = (scores.stride(0), scores.stride(1), scores.stride(2))
    _topp_head_kernel[(R * H * G,)](
        scores, cand_counts, pr, lo, tot, *strides, H=H, G=G, C_PAD=C_PAD,
        num_warps=_row_warps(C_PAD),
    )
    _union_compact_kernel[(R * H,)](
        scores, lo, tot, cand_slots, cand_counts, pr, kept_slots, kept_counts, int(min_budget),
        int(max_budget or 0), *strides, cand_slots.stride(0), cand_slots.stride(1),
        kept_slots.stride(0), kept_slots.stride(1), H=H, G=G, C_PAD=C_PAD,
        P=max(page_size, 1), FROM_PAGES=page_size > 0, num_warps=_row_warps(C_PAD),
    )
    return kept_slots, kept_counts


def expand_candidates_triton(cand_pages, cand_counts, page_size, kept_slots=None):
    """Every candidate kept (Quest alone): page lists -> slot lists, same layout as the prune."""
    R, H, K = cand_pages.shape
    C = K * page_size
    if kept_slots is None:
        kept_slots = torch.zeros(R, H, C, dtype=torch.int32, device=cand_pages.device)
    ones = torch.ones(R, dtype=torch.float32, device=cand_pages.device)
    C_PAD = next_pow2(C)
    # p = 1 rows never read the score buffers: pass the page list as a stand-in pointer
    _union_compact_kernel[(R * H,)](
        cand_pages, cand_pages, cand_pages, cand_pages, cand_counts, ones, kept_slots, cand_counts,
        0, 0, 0, 0, 0, cand_pages.stride(0), cand_pages.stride(1), kept_slots.stride(0),
        kept_slots.stride(1), H=H, G=1, C_PAD=C_PAD, P=page_size, FROM_PAGES=True,
        num_warps=_row_warps(C_PAD),
    )
    return kept_slots, cand_counts


def twilight_prune_triton(q, kq, kscale, kzero, cand_slots, cand_counts, p, sm_scale, min_budget,
                          max_budget, scores=None, kept_slots=None, kept_counts=None, lo=None,
                          tot=None, page_size=0):
    """``page_size > 0``: ``cand_slots`` holds page lists (see quest_select_pages_triton)."""
    scores = int4_scores_triton(q, kq, kscale, kzero, cand_slots, cand_counts, sm_scale, out=scores,
                                page_size=page_size)
    return prune_from_scores_triton(scores, cand_slots, cand_counts, p, min_budget, max_budget,
                                    kept_slots, kept_counts, lo, tot, page_size)
