"""Select: Quest page scores (a GQA upper bound of q . k per page) and the top-K pages.

Stage 2 of a decode step. For each (request, KV head) row, every page of the request is scored
from its int8 bounds (``store.bounds_buffers``)::

    score(page) = max_{g in group} sum_d max(q_gd * kmax_d, q_gd * kmin_d)

an upper bound of ``q_g . k`` for every key of the page and every query head of the KV head's
group (SGLang's averaging of q over the group would not be a bound). Selection keeps the sink
page (0), the last (partial) page and the best other pages, ``K = capacity // page_size`` pages
in all, ties to the lower page index; the candidates are the valid tokens of the chosen pages in
ascending logical order. The top-K is exact: the threshold search of ``topp`` over the scores'
int32 keys (``_topk_mask``).

Candidates travel as page lists: ``cand_pages`` int32 ``[R, H, K]`` (physical page ids, in
logical order, only the last one may be partial) and ``cand_counts`` int32 ``[R, H]`` (tokens);
candidate ``n`` of a row is slot ``cand_pages[n // P] * P + n % P`` (``_candidate_slots``, which
the estimate and the union read them with). The references return slot lists instead
(``cand_slots`` int32 ``[R, H, C]``, ``C = K * P``, 0 past the count).

Shapes: ``q`` ``[R, Hq, D]`` bf16/fp16 (q head ``i`` belongs to KV head ``i // G``, ``G = Hq //
H``); ``req_to_token`` int32 ``[max_reqs, max_ctx]`` (SGLang's request -> slot table);
``req_pool_indices`` and ``seq_lens`` int ``[R]`` (its rows, and the context length including
the new token).
"""

from __future__ import annotations

import torch

from sglang_twilight.config import round_to_pages

from . import launch
from .launch import interpreting, next_pow2
from .store import _check_bounds, dequantize_bounds_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def capacity_for(budget: int, page_size: int) -> int:
    """Candidates per (request, KV head): the budget B0 rounded up to whole pages."""
    return round_to_pages(budget, page_size)


def _group_q(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    R, Hq, D = q.shape
    if Hq % num_kv_heads:
        raise ValueError(f"num q heads {Hq} is not a multiple of num kv heads {num_kv_heads}")
    return q.float().view(R, num_kv_heads, Hq // num_kv_heads, D)


def page_table_ref(req_to_token, req_pool_indices, seq_lens, page_size, num_pages_max=None):
    """Physical page of every logical page: -> (``[R, NP]`` int64, 0 past the request's pages;
    pages per request ``[R]``)."""
    n_pages = (seq_lens.long() + page_size - 1) // page_size
    NP = int(n_pages.max().item()) if num_pages_max is None else int(num_pages_max)
    j = torch.arange(NP, device=seq_lens.device)
    pos = (j * page_size)[None, :].expand(seq_lens.shape[0], NP)
    valid = j[None, :] < n_pages[:, None]
    rows = req_to_token[req_pool_indices.long()]
    slots = torch.gather(rows.long(), 1, torch.where(valid, pos, 0).clamp_max(rows.shape[1] - 1))
    return torch.where(valid, slots // page_size, 0), n_pages


def quest_page_scores_ref(q, kmax, kmin, kbscale, page_table, num_pages):
    """Quest page scores.

    Parameters
    ----------
    q : torch.Tensor
        Decode queries ``[R, Hq, D]``.
    kmax, kmin, kbscale : torch.Tensor
        Page bounds, int8 ``[pages, H, D]`` twice and fp32 ``[pages, H]``; with ``kbscale``
        None, ``kmax`` and ``kmin`` are the bounds themselves (any float dtype).
    page_table : torch.Tensor
        Physical page of each logical page, int ``[R, NP]`` (``page_table_ref``).
    num_pages : torch.Tensor
        Pages of each request, int ``[R]``.

    Returns
    -------
    torch.Tensor
        fp32 ``[R, H, NP]``, ``-inf`` past ``num_pages``.
    """
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
    """chosen bool ``[R, H, NP]`` -> (slots int32 ``[R, H, C]``, counts int32 ``[R, H]``)."""
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


def quest_select_ref(q, kmax, kmin, kbscale, req_to_token, req_pool_indices, seq_lens, budget,
                     page_size):
    """Candidates of every (request, KV head): -> (``cand_slots`` int32 ``[R, H, C]``,
    ``cand_counts`` int32 ``[R, H]``), ``C = capacity_for(budget, page_size)``; the arguments as
    in the module docstring, the bounds as in ``quest_page_scores_ref``."""
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


def pages_to_slots(cand_pages, cand_counts, page_size):
    """Page lists ``[R, H, K]`` -> candidate slot lists int32 ``[R, H, K * P]`` (0 past the
    count)."""
    R, H, K = cand_pages.shape
    offs = torch.arange(page_size, device=cand_pages.device, dtype=torch.int32)
    slots = (cand_pages[..., None] * page_size + offs).reshape(R, H, K * page_size)
    n = torch.arange(K * page_size, device=cand_pages.device)[None, None, :]
    return torch.where(n < cand_counts[..., None], slots, 0)


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------

if triton is not None:
    from .topp import _f32_key, _topk_mask

    @triton.jit
    def _candidate_slots(base, n, nm, P: tl.constexpr, FROM_PAGES: tl.constexpr):
        """Slots of candidates n: from a slot list, or from a page list (page n // P, offset n % P)."""
        if FROM_PAGES:
            page = tl.load(base + n // P, mask=nm, other=0).to(tl.int64)
            return page * P + n % P
        else:
            return tl.load(base + n, mask=nm, other=0).to(tl.int64)

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
    def _select_row(score_row, r2t_row, cand_row, n_pages, K: tl.constexpr, P: tl.constexpr,
                    W: tl.constexpr):
        """Choose the pages of one (request, KV head) row of ``n_pages <= W`` pages in a block of
        W: the first and the last always, the best of the rest by score up to K; write their
        physical ids in ascending logical order."""
        j = tl.arange(0, W)
        valid = j < n_pages
        if n_pages <= K:
            chosen = valid
        else:
            s = tl.load(score_row + j, mask=valid, other=0.0)
            key = _f32_key(s)
            key = tl.where((j == 0) | (j == n_pages - 1), 2147483647, key)
            chosen = _topk_mask(key, valid, K, n_pages)
        dest = tl.cumsum(chosen.to(tl.int32), 0) - 1
        slot = tl.load(r2t_row + j * P, mask=chosen, other=0)
        tl.store(cand_row + dest, slot // P, mask=chosen)

    @triton.jit
    def _select_kernel(
        scores_ptr, r2t_ptr, rpi_ptr, seqlen_ptr, cand_ptr, count_ptr,
        stride_sr, stride_sh, stride_r2t, stride_cr, stride_ch,
        H: tl.constexpr, P: tl.constexpr, K: tl.constexpr, NP_PAD: tl.constexpr,
        TIER1: tl.constexpr, TIER2: tl.constexpr,
    ):
        """One program per (request, kv head): choose pages; write their physical ids in
        ascending logical order (only the last can be partial) and the candidate token count.

        The block is as wide as the row needs, not as the longest context the server admits:
        a row of at most TIER1 (then TIER2) pages runs in a block of that many, only longer
        ones in the full NP_PAD (the select's time grows with its block: a 131072-token model
        context made every row of a 28k-token step pay for 8192 pages)."""
        rh = tl.program_id(0)
        r = rh // H
        h = rh % H
        seq = tl.load(seqlen_ptr + r)
        n_pages = (seq + P - 1) // P
        rpi = tl.load(rpi_ptr + r).to(tl.int64)
        score_row = scores_ptr + r * stride_sr + h * stride_sh
        r2t_row = r2t_ptr + rpi * stride_r2t
        cand_row = cand_ptr + r * stride_cr + h * stride_ch
        if n_pages <= TIER1:
            _select_row(score_row, r2t_row, cand_row, n_pages, K, P, TIER1)
        elif n_pages <= TIER2:
            _select_row(score_row, r2t_row, cand_row, n_pages, K, P, TIER2)
        else:
            _select_row(score_row, r2t_row, cand_row, n_pages, K, P, NP_PAD)
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
    """Quest page scores of every request's pages, up to ``max_pages`` a row: -> fp32 ``[R, H,
    max_pages]`` (``out`` if given; pages past a request's end are not written). The arguments
    as in the module docstring; launch shape ``launch.get("page_scores")``."""
    _check_bounds(kmax, kmin, kbscale)
    R, Hq, D = q.shape
    H = kmax.shape[1]
    G = Hq // H
    cfg = launch.get("page_scores")
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


def quest_select_pages_triton(q, kmax, kmin, kbscale, req_to_token, req_pool_indices, seq_lens,
                              budget, page_size, max_pages=None, scores=None, cand_pages=None,
                              cand_counts=None):
    """Candidate pages of every (request, KV head).

    Parameters
    ----------
    q, kmax, kmin, kbscale, req_to_token, req_pool_indices, seq_lens
        As in the module docstring (bounds as in ``quest_page_scores_ref``).
    budget : int
        B0; ``K = capacity_for(budget, page_size) // page_size`` pages are kept.
    page_size : int
        ``P``.
    max_pages : int, optional
        Pages of the longest context the call may see (the server's max context); every shape
        depends on it, never on data. None: from ``seq_lens`` (a host sync).
    scores, cand_pages, cand_counts : torch.Tensor, optional
        Workspace: fp32 ``[R, H, >= max_pages]`` page scores, int32 ``[R, H, K]``, int32 ``[R,
        H]``; allocated when None.

    Returns
    -------
    (cand_pages, cand_counts)
        int32 ``[R, H, K]`` page ids in logical order and int32 ``[R, H]`` candidate tokens.
    """
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
    tiers = launch.get("select_tiers")
    _select_kernel[(R * H,)](
        scores, req_to_token, req_pool_indices, seq_lens, cand_pages, cand_counts,
        scores.stride(0), scores.stride(1), req_to_token.stride(0), cand_pages.stride(0),
        cand_pages.stride(1), H=H, P=page_size, K=K, NP_PAD=NP_PAD,
        TIER1=min(NP_PAD, tiers[0]), TIER2=min(NP_PAD, tiers[1]),
        num_warps=_select_warps(NP_PAD),
    )
    return cand_pages, cand_counts


def _select_warps(np_pad: int) -> int:
    cfg = launch.get("select")
    if np_pad in cfg["by_pages"]:
        return cfg["by_pages"][np_pad]
    return cfg["wide_num_warps"] if np_pad >= cfg["wide_from_pages"] else cfg["num_warps"]


def quest_select_triton(q, kmax, kmin, kbscale, req_to_token, req_pool_indices, seq_lens, budget,
                        page_size, max_pages=None):
    """``quest_select_ref`` on the GPU: the page kernels, then ``pages_to_slots``."""
    pages, counts = quest_select_pages_triton(q, kmax, kmin, kbscale, req_to_token,
                                              req_pool_indices, seq_lens, budget, page_size,
                                              max_pages=max_pages)
    return pages_to_slots(pages, counts, page_size), counts
