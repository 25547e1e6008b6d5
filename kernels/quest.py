"""Stages 3-4: Quest page scores (GQA upper bound) and candidate selection.

The bounds are int8 codes with one fp32 scale per (page, KV head) (``int4.quantize_bounds_ref``,
rounded outward). The page score ``max_{g in group} sum_d max(q_gd * kmax_d, q_gd * kmin_d)``
over the dequantized bounds is an upper bound of ``q_g . k`` for every key of the page and every
query head of the KV head's group (SGLang's averaging of q over the group would not be a bound).
Selection keeps the sink page, the last (partial) page and the best other pages up to
``capacity // page_size`` pages; the candidate slots are the valid tokens of the chosen pages in
ascending logical order.
"""

from __future__ import annotations

import torch

from ._launch import interpreting, next_pow2
from .int4 import _check_bounds, dequantize_bounds_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def capacity_for(budget: int, page_size: int) -> int:
    return -(-int(budget) // page_size) * page_size


def _group_q(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    R, Hq, D = q.shape
    if Hq % num_kv_heads:
        raise ValueError(f"num q heads {Hq} is not a multiple of num kv heads {num_kv_heads}")
    return q.float().view(R, num_kv_heads, Hq // num_kv_heads, D)


def page_table_ref(req_to_token, req_pool_indices, seq_lens, page_size, num_pages_max=None):
    """Physical page of every logical page: [R, NP] int64 (0 past the request's pages)."""
    n_pages = (seq_lens.long() + page_size - 1) // page_size
    NP = int(n_pages.max().item()) if num_pages_max is None else int(num_pages_max)
    j = torch.arange(NP, device=seq_lens.device)
    pos = (j * page_size)[None, :].expand(seq_lens.shape[0], NP)
    valid = j[None, :] < n_pages[:, None]
    rows = req_to_token[req_pool_indices.long()]
    slots = torch.gather(rows.long(), 1, torch.where(valid, pos, 0).clamp_max(rows.shape[1] - 1))
    return torch.where(valid, slots // page_size, 0), n_pages


def quest_page_scores_ref(q, kmax, kmin, kbscale, page_table, num_pages):
    """-> [R, Hkv, NP] fp32, -inf past num_pages. ``kbscale`` None: ``kmax``/``kmin`` are the
    bounds themselves (any float dtype), not int8 codes."""
    Hkv = kmax.shape[1]
    qg = _group_q(q, Hkv)  # [R, Hkv, G, D]
    pt = page_table.long()
    if kbscale is None:
        bmax, bmin = kmax[pt].float(), kmin[pt].float()  # [R, NP, Hkv, D]
    else:
        _check_bounds(kmax, kmin, kbscale)
        bmax = dequantize_bounds_ref(kmax[pt], kbscale[pt])
        bmin = dequantize_bounds_ref(kmin[pt], kbscale[pt])
    qx = qg[:, None]  # [R, 1, Hkv, G, D]
    s = torch.maximum(qx * bmax[:, :, :, None], qx * bmin[:, :, :, None]).sum(-1)  # [R,NP,Hkv,G]
    s = s.amax(-1).permute(0, 2, 1)
    valid = torch.arange(pt.shape[1], device=pt.device)[None, None, :] < num_pages.long()[:, None, None]
    return torch.where(valid, s, float("-inf")).contiguous()


def expand_pages_ref(chosen, req_to_token, req_pool_indices, seq_lens, page_size, capacity):
    """chosen bool [R, Hkv, NP] -> (slots int32 [R, Hkv, C], counts int32 [R, Hkv])."""
    R, Hkv, NP = chosen.shape
    pos = torch.arange(NP * page_size, device=chosen.device)
    tok_ok = chosen.repeat_interleave(page_size, dim=-1) & (pos[None, None, :] < seq_lens.long()[:, None, None])
    counts = tok_ok.sum(-1)
    rank = torch.cumsum(tok_ok.long(), -1) - 1
    rows = req_to_token[req_pool_indices.long()].long()[:, : NP * page_size]
    if rows.shape[1] < NP * page_size:
        rows = torch.nn.functional.pad(rows, (0, NP * page_size - rows.shape[1]))
    slot_all = rows[:, None, :].expand(R, Hkv, NP * page_size)
    out = torch.zeros(R, Hkv, capacity + 1, dtype=torch.long, device=chosen.device)
    dest = torch.where(tok_ok, rank, capacity)  # dump unchosen into the spare column
    out.scatter_(-1, dest, torch.where(tok_ok, slot_all, 0))
    return out[..., :capacity].to(torch.int32).contiguous(), counts.to(torch.int32)


def f32_key_ref(x: torch.Tensor) -> torch.Tensor:
    """``_f32_key`` in torch: fp32 -> int32 keys in the same order (signed compare)."""
    b = x.float().contiguous().view(torch.int32)
    return torch.where(b < 0, b ^ 0x7FFFFFFF, b)


def threshold_sorted_ref(key, present, val, target):
    """The threshold search's definition, by a sort: per row the largest present key whose
    mass at or above it (summed in float64) reaches target. key int [N, W], present bool, val
    [N, W], target [N] -> [N]."""
    order = torch.sort(torch.where(present, key, -(2**40)), 1, descending=True)
    mass = torch.gather(torch.where(present, val, 0).double(), 1, order.indices).cumsum(1)
    first = (mass >= target.double()[:, None]).float().argmax(1)
    return order.values.gather(1, first[:, None])[:, 0]


def threshold_search_ref(key, val, present, target, total, value_space=False, big=2**31 - 1):
    """``_threshold_search``'s steps replayed in torch, one row per search (key int64 [N, W],
    val [N, W], present bool [N, W], target and total [N]) -> (threshold key [N], steps [N]).
    The same probes in the same fp32 arithmetic, so a study can count the kernel's steps on real
    keys (``benchmarks/search_study.py``); the threshold itself is defined without it: the
    largest present key t with sum(val[key >= t]) >= target."""
    N = key.shape[0]
    i64, f32 = torch.int64, torch.float32
    key = key.to(i64)
    lo = torch.where(present, key, big).amin(1)
    hi = torch.where(present, key, -(2**31)).amax(1)
    top_nb = torch.where(present & (key < big), key, -(2**31)).amax(1)
    tgt = target.to(f32)
    m_lo, m_hi = total.to(f32).clone(), torch.zeros(N, dtype=f32, device=key.device)
    w_lo, w_hi = torch.ones_like(m_lo), torch.ones_like(m_lo)
    side = torch.zeros(N, dtype=i64, device=key.device)
    span1, span2 = hi - lo, torch.full_like(lo, 1 << 40)
    steps = torch.zeros_like(lo)
    while bool((lo < hi).any()):
        live = lo < hi
        span = hi - lo
        f_lo = (m_lo - tgt).clamp_min(0) * w_lo
        f_hi = (tgt - m_hi) * w_hi
        frac = f_lo / (f_lo + f_hi)
        top = torch.where(hi == big, top_nb, hi) + 1
        if value_space:
            v_lo = lo.to(torch.int32).view(f32)
            v_top = top.to(torch.int32).view(f32)
            guess = (v_lo + frac * (v_top - v_lo)).view(torch.int32).to(i64)
        else:
            guess = lo + (frac * (top - lo).to(f32)).to(i64)
        guess = torch.minimum(torch.maximum(guess, lo + 1), hi)
        mid = torch.where(2 * span > span2, lo + (span + 2) // 2, guess)
        ge = present & (key >= mid[:, None])
        mass = torch.where(ge, val, 0).sum(1)
        a = torch.where(ge, key, big).amin(1)
        b = torch.where(present & ~ge, key, -(2**31)).amax(1)
        ok = mass >= target
        new_w_hi = torch.where(ok, torch.where(side > 0, w_hi * 0.5, w_hi), 1.0)
        new_w_lo = torch.where(ok, 1.0, torch.where(side < 0, w_lo * 0.5, w_lo))
        new_side = torch.where(ok, side.clamp_min(0) + 1, side.clamp_max(0) - 1)
        new_m_lo = torch.where(ok, mass.to(f32), m_lo)
        new_m_hi = torch.where(ok, m_hi, mass.to(f32))
        upd = [(new_w_hi, w_hi), (new_w_lo, w_lo), (new_side, side), (new_m_lo, m_lo),
               (new_m_hi, m_hi), (span1, span2), (span, span1)]
        w_hi, w_lo, side, m_lo, m_hi, span2, span1 = (torch.where(live, n, o) for n, o in upd)
        lo = torch.where(live & ok, a, lo)
        hi = torch.where(live & ~ok, b, hi)
        steps += live.to(i64)
    return lo, steps


def quest_select_ref(q, kmax, kmin, kbscale, req_to_token, req_pool_indices, seq_lens, budget,
                     page_size):
    C = capacity_for(budget, page_size)
    K = C // page_size
    Hkv = kmax.shape[1]
    pt, n_pages = page_table_ref(req_to_token, req_pool_indices, seq_lens, page_size)
    scores = quest_page_scores_ref(q, kmax, kmin, kbscale, pt, n_pages)
    NP = pt.shape[1]
    j = torch.arange(NP, device=q.device)[None, None, :]
    last = (n_pages.long() - 1)[:, None, None]
    forced = (j == 0) | (j == last)
    key = torch.where(forced, float("inf"), scores)
    # top-K pages by key; ties to the lower page index (stable sort = the definition)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(NP, device=q.device).expand_as(order).contiguous())
    chosen = (rank < K) & (j < n_pages.long()[:, None, None])
    chosen = chosen.expand(q.shape[0], Hkv, NP)
    return expand_pages_ref(chosen, req_to_token, req_pool_indices, seq_lens, page_size, C)


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _page_scores_kernel(
        q_ptr, kmax_ptr, kmin_ptr, kb_ptr, r2t_ptr, rpi_ptr, seqlen_ptr, out_ptr,
        stride_qr, stride_qh, stride_bp, stride_bh, stride_bsp, stride_bsh, stride_r2t, stride_or,
        stride_oh,
        H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
        BLOCK_P: tl.constexpr, ITERS: tl.constexpr, STAGES: tl.constexpr, G_PAD: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        """One program: one (request, kv head) x ITERS blocks of BLOCK_P logical pages -> scores
        (-inf past end), the blocks software-pipelined (STAGES).

        sum_d max(q_d M_d, q_d m_d) = relu(q) . M + min(q, 0) . m: two tensor-core dots.
        """
        rh = tl.program_id(0)
        start = tl.program_id(1) * (BLOCK_P * ITERS)
        r = rh // H
        h = rh % H
        seq = tl.load(seqlen_ptr + r)
        n_pages = (seq + P - 1) // P
        if start >= n_pages:
            return
        rpi = tl.load(rpi_ptr + r).to(tl.int64)
        d = tl.arange(0, D)
        g = tl.arange(0, G_PAD)
        gm = g < G
        qv = tl.load(q_ptr + r * stride_qr + (h * G + g)[:, None] * stride_qh + d[None, :],
                     mask=gm[:, None], other=0.0)  # [G_PAD, D]
        if DOT_F32:  # the CPU interpreter has no bf16 dot
            qv = qv.to(tl.float32)
        qposT = tl.trans(tl.maximum(qv, 0.0).to(qv.dtype))  # exact: relu of a bf16/fp16 value
        qnegT = tl.trans(tl.minimum(qv, 0.0).to(qv.dtype))
        # every block's page slots in one load before the loop, so that the loop's only loads
        # (the bounds) do not wait on a load of the same block and pipeline STAGES deep
        ja = start + tl.arange(0, ITERS * BLOCK_P)
        slots = tl.reshape(tl.load(r2t_ptr + rpi * stride_r2t + ja * P, mask=ja < n_pages, other=0),
                           [ITERS, BLOCK_P])
        blk = tl.arange(0, ITERS)
        # the dots' accumulator starts from zeros made by a dot with q outside the loop: q's dot
        # operands are then converted once, into registers (q used only by the loop's dots was
        # reloaded from shared memory at every block, and held 8 KB of it a program)
        zb = tl.zeros([BLOCK_P, D], qposT.dtype)
        acc0 = tl.dot(zb, qposT) + tl.dot(zb, qnegT)
        for it in tl.range(0, ITERS, num_stages=STAGES):
            j = start + it * BLOCK_P + tl.arange(0, BLOCK_P)
            jm = j < n_pages
            slot = tl.sum(tl.where(blk[:, None] == it, slots, 0), 0).to(tl.int64)
            bp = (slot // P)[:, None] * stride_bp + h * stride_bh + d[None, :]
            # int8 codes, exact in bf16/fp16; the page's scale after the dots
            bmax = tl.load(kmax_ptr + bp, mask=jm[:, None], other=0).to(qposT.dtype)  # [BP, D]
            bmin = tl.load(kmin_ptr + bp, mask=jm[:, None], other=0).to(qposT.dtype)
            bs = tl.load(kb_ptr + (slot // P) * stride_bsp + h * stride_bsh, mask=jm, other=0.0)
            s = (tl.dot(bmax, qposT, acc0) + tl.dot(bmin, qnegT)) * bs[:, None]  # [BP, G_PAD] fp32
            s = tl.where(gm[None, :], s, float("-inf"))
            tl.store(out_ptr + r * stride_or + h * stride_oh + j, tl.max(s, 1), mask=jm)

    @triton.jit
    def _f32_key(x):
        """Monotone map fp32 -> int32 (signed compare matches float order; no NaN)."""
        b = x.to(tl.int32, bitcast=True)
        return tl.where(b < 0, b ^ 0x7FFFFFFF, b)

    @triton.jit
    def _sum_min_max(v1, a1, b1, v2, a2, b2):
        return v1 + v2, tl.minimum(a1, a2), tl.maximum(b1, b2)

    @triton.jit
    def _min_max(a1, b1, a2, b2):
        return tl.minimum(a1, a2), tl.maximum(b1, b2)

    @triton.jit
    def _min_max_max(a1, b1, c1, a2, b2, c2):
        return tl.minimum(a1, a2), tl.maximum(b1, b2), tl.maximum(c1, c2)

    @triton.jit
    def _threshold_search(key, val, target, total, ABSENT: tl.constexpr, BIG: tl.constexpr,
                          VALUE: tl.constexpr, FORCED: tl.constexpr):
        """Largest present key t with sum(val[key >= t]) >= target; keys equal to ABSENT are
        not present, BIG exceeds every key. Needs sum(val[present]) >= target > 0. -> (t, the
        mass at or above t in fp32: exact when it was measured, or ``total`` when no probe
        landed at or below t).

        Each step probes one key between the smallest and largest keys still possible (one fused
        (sum, min, max) reduction) and moves one end onto a present key; it stops as soon as a
        single key value is left. The probe is interpolated (``threshold_search_ref`` replays
        these steps in torch): where the target mass falls on the line between the two ends'
        known masses (``total``, an estimate of the whole present mass, at the start), in key
        space, or in value space when ``VALUE`` (the keys are the bits of non-negative floats);
        an end kept twice in a row has its mass weight halved (the Illinois rule), and a step
        bisects instead whenever the last two did not halve the range: the range halves at least
        once every three steps, so no search takes more than about three times the bisection's
        worst case (32 steps on int32 keys). ``FORCED``: keys equal to BIG may be present
        (forced entries); the interpolation starts from the largest other key. On the
        benchmark's keys it takes 7.1 steps (at most 10) for the top-K pages instead of 13.5
        (16), and 6.5 (12) instead of 9.5 (15) for top-p (``benchmarks/search_study.py``). (A
        multi-way search - 7 cuts a step, a third of the steps - was measured slower on the
        H100: top-p 29 -> 39 us, top-K 11 -> 22 us at batch 8 x 32k; the cost is per
        reduction, not per step.)
        """
        present = key > ABSENT
        if FORCED:
            lo_key, hi_key, top_nb = tl.reduce(
                (tl.where(present, key, BIG), tl.where(present, key, ABSENT),
                 tl.where(present & (key < BIG), key, ABSENT)), 0, _min_max_max)
        else:
            lo_key, hi_key = tl.reduce(
                (tl.where(present, key, BIG), tl.where(present, key, ABSENT)), 0, _min_max)
            top_nb = hi_key
        tgt = tl.zeros([], tl.float32) + target  # (either may be a constexpr int)
        m_lo = tl.zeros([], tl.float32) + total  # mass at or above lo (estimated till a probe)
        m_hi = tl.zeros([], tl.float32)  # the mass above hi
        w_lo = tl.full([], 1.0, tl.float32)
        w_hi = tl.full([], 1.0, tl.float32)
        side = tl.zeros([], tl.int32)  # +n: lo moved the last n steps; -n: hi did
        span1 = hi_key.to(tl.int64) - lo_key.to(tl.int64)  # the range a step ago
        span2 = tl.full([], 1 << 40, tl.int64)  # and two steps ago
        while lo_key < hi_key:
            lo64 = lo_key.to(tl.int64)
            hi64 = hi_key.to(tl.int64)
            span = hi64 - lo64
            f_lo = tl.maximum(m_lo - tgt, 0.0) * w_lo
            f_hi = (tgt - m_hi) * w_hi  # > 0: every probe that failed held less than target
            frac = f_lo / (f_lo + f_hi)
            top = tl.where(hi_key == BIG, top_nb.to(tl.int64), hi64) + 1
            if VALUE:
                v_lo = lo_key.to(tl.float32, bitcast=True)
                v_top = top.to(tl.int32).to(tl.float32, bitcast=True)
                guess = (v_lo + frac * (v_top - v_lo)).to(tl.int32, bitcast=True).to(tl.int64)
            else:
                guess = lo64 + (frac * (top - lo64).to(tl.float32)).to(tl.int64)
            guess = tl.minimum(tl.maximum(guess, lo64 + 1), hi64)
            # ceil of half the range past lo, in (lo, hi]
            mid = tl.where(2 * span > span2, lo64 + (span + 2) // 2, guess).to(tl.int32)
            ge = key >= mid
            mass, a, b = tl.reduce(
                (tl.where(ge, val, 0), tl.where(ge, key, BIG),
                 tl.where(present & (key < mid), key, ABSENT)), 0, _sum_min_max)
            ok = mass >= target
            w_hi = tl.where(ok, tl.where(side > 0, w_hi * 0.5, w_hi), 1.0)
            w_lo = tl.where(ok, 1.0, tl.where(side < 0, w_lo * 0.5, w_lo))
            side = tl.where(ok, tl.maximum(side, 0) + 1, tl.minimum(side, 0) - 1)
            m_lo = tl.where(ok, mass.to(tl.float32), m_lo)
            m_hi = tl.where(ok, m_hi, mass.to(tl.float32))
            span2 = span1
            span1 = span
            lo_key = tl.where(ok, a, lo_key)
            hi_key = tl.where(ok, hi_key, b)
        return lo_key, m_lo

    @triton.jit
    def _topk_mask(key, valid, k, n_valid):
        """Exactly k (or all valid if fewer) entries with the largest int32 keys (any value but
        INT32_MIN); ties -> lower index. ``n_valid``: how many are valid (the caller knows)."""
        nkey = tl.where(valid, key, -2147483648)
        kk = tl.minimum(k, n_valid)
        t, n_ge = _threshold_search(nkey, valid.to(tl.int32), kk, n_valid, -2147483648,
                                    2147483647, False, True)
        if n_ge == kk:  # (a count: exact in fp32) no tie to break, no scan
            chosen = valid & (nkey >= t)
        else:
            above = valid & (nkey > t)
            tie = valid & (nkey == t)
            need = kk - tl.sum(above.to(tl.int32), 0)
            tie_rank = tl.cumsum(tie.to(tl.int32), 0)
            chosen = above | (tie & (tie_rank <= need))
        return chosen

    @triton.jit
    def _select_kernel(
        scores_ptr, r2t_ptr, rpi_ptr, seqlen_ptr, cand_ptr, count_ptr,
        stride_sr, stride_sh, stride_r2t, stride_cr, stride_ch,
        H: tl.constexpr, P: tl.constexpr, K: tl.constexpr, NP_PAD: tl.constexpr,
    ):
        """One program per (request, kv head): choose pages; write their physical ids in
        ascending logical order (only the last can be partial) and the candidate token count."""
        rh = tl.program_id(0)
        r = rh // H
        h = rh % H
        seq = tl.load(seqlen_ptr + r)
        n_pages = (seq + P - 1) // P
        rpi = tl.load(rpi_ptr + r).to(tl.int64)
        j = tl.arange(0, NP_PAD)
        valid = j < n_pages
        if n_pages <= K:
            chosen = valid
        else:
            s = tl.load(scores_ptr + r * stride_sr + h * stride_sh + j, mask=valid, other=0.0)
            key = _f32_key(s)
            key = tl.where((j == 0) | (j == n_pages - 1), 2147483647, key)
            chosen = _topk_mask(key, valid, K, n_pages)
        dest = tl.cumsum(chosen.to(tl.int32), 0) - 1
        slot = tl.load(r2t_ptr + rpi * stride_r2t + j * P, mask=chosen, other=0)
        tl.store(cand_ptr + r * stride_cr + h * stride_ch + dest, slot // P, mask=chosen)
        # tokens of the chosen pages (a closed form, not one more reduction): all of them, or K
        # pages of which only the last may be partial; it is chosen (forced) when K >= 2 (at
        # K = 1 the forced first page wins the tie)
        if K >= 2:
            ntok = tl.where(n_pages <= K, seq, (K - 1) * P + seq - (n_pages - 1) * P)
        else:
            ntok = tl.minimum(seq, P)
        tl.store(count_ptr + r * H + h, ntok)


def quest_page_scores_triton(q, kmax, kmin, kbscale, req_to_token, req_pool_indices, seq_lens,
                             page_size, max_pages, out=None):
    _check_bounds(kmax, kmin, kbscale)
    R, Hq, D = q.shape
    H = kmax.shape[1]
    G = Hq // H
    cfg = PAGE_SCORES_CONFIG
    BLOCK_P, ITERS = cfg["BLOCK_P"], cfg["ITERS"]
    if out is None:
        out = torch.empty(R, H, max_pages, dtype=torch.float32, device=q.device)
    _page_scores_kernel[(R * H, triton.cdiv(max_pages, BLOCK_P * ITERS))](
        q, kmax, kmin, kbscale, req_to_token, req_pool_indices, seq_lens, out,
        q.stride(0), q.stride(1), kmax.stride(0), kmax.stride(1), kbscale.stride(0),
        kbscale.stride(1), req_to_token.stride(0), out.stride(0), out.stride(1),
        H=H, G=G, D=D, P=page_size, BLOCK_P=BLOCK_P, ITERS=ITERS, STAGES=cfg["STAGES"],
        G_PAD=max(16, next_pow2(G)), DOT_F32=interpreting(), num_warps=cfg["num_warps"],
    )
    return out


# launch shape of the page scores (tuned on the H100 by benchmarks/tune_kernels.py). With int8
# bounds: 12.1 / 30.8 / 108.8 us at batch 8 / 16 / 64 x 32k against 17.7 / 34.7 / 128.5 for the
# shape that was best with bf16 bounds, 32 pages x 2 at 4 warps (tune_page_scores_int8_h100.json)
PAGE_SCORES_CONFIG = dict(BLOCK_P=32, ITERS=4, STAGES=3, num_warps=2)


def quest_select_pages_triton(q, kmax, kmin, kbscale, req_to_token, req_pool_indices, seq_lens,
                              budget, page_size, max_pages=None, scores=None, cand_pages=None,
                              cand_counts=None):
    """-> (cand_pages int32 [R, Hkv, C // P], cand_counts int32 [R, Hkv]); candidate token n of a
    row is slot ``cand_pages[n // P] * P + n % P``. Graph-safe: every shape depends only on
    (R, budget, max_pages), never on data."""
    R, Hq, D = q.shape
    H = kmax.shape[1]
    C = capacity_for(budget, page_size)
    K = C // page_size
    if max_pages is None:  # eager convenience; the backend passes the server's max context
        max_pages = -(-int(seq_lens.max().item()) // page_size)
    max_pages = max(int(max_pages), 1)
    if max_pages > K:
        scores = quest_page_scores_triton(q, kmax, kmin, kbscale, req_to_token, req_pool_indices,
                                          seq_lens, page_size, max_pages, out=scores)
    elif scores is None:  # every request fits the budget: no scoring needed
        scores = torch.empty(R, H, 1, dtype=torch.float32, device=q.device)
    if cand_pages is None:
        cand_pages = torch.zeros(R, H, K, dtype=torch.int32, device=q.device)
    if cand_counts is None:
        cand_counts = torch.empty(R, H, dtype=torch.int32, device=q.device)
    NP_PAD = next_pow2(max_pages)
    _select_kernel[(R * H,)](
        scores, req_to_token, req_pool_indices, seq_lens, cand_pages, cand_counts,
        scores.stride(0), scores.stride(1), req_to_token.stride(0), cand_pages.stride(0),
        cand_pages.stride(1), H=H, P=page_size, K=K, NP_PAD=NP_PAD,
        num_warps=SELECT_WARPS.get(NP_PAD, 4 if NP_PAD <= 1024 else 8),
    )
    return cand_pages, cand_counts


# warps of the top-K page kernel by padded page count (tuned on the H100 by
# benchmarks/tune_kernels.py); others: 4 up to 1024 pages, else 8
SELECT_WARPS: dict[int, int] = {}


def pages_to_slots(cand_pages, cand_counts, page_size):
    """Expand page lists to candidate slot lists [R, Hkv, K * P] (0 past the count)."""
    R, H, K = cand_pages.shape
    offs = torch.arange(page_size, device=cand_pages.device, dtype=torch.int32)
    slots = (cand_pages[..., None] * page_size + offs).reshape(R, H, K * page_size)
    n = torch.arange(K * page_size, device=cand_pages.device)[None, None, :]
    return torch.where(n < cand_counts[..., None], slots, 0)


def quest_select_triton(q, kmax, kmin, kbscale, req_to_token, req_pool_indices, seq_lens, budget,
                        page_size, max_pages=None):
    pages, counts = quest_select_pages_triton(q, kmax, kmin, kbscale, req_to_token,
                                              req_pool_indices, seq_lens, budget, page_size,
                                              max_pages=max_pages)
    return pages_to_slots(pages, counts, page_size), counts
