"""Estimate: q . int4 keys over every candidate, and each program's softmax partials.

Stage 3 of a decode step. For each (request, KV head) row and each of its G q heads::

    s[n] = sm_scale * q . dequant(kq[slot_n]) = sm_scale * (scale * (q . codes) + zero * sum(q))

over the row's candidates (``select``'s page lists). ``q . codes`` is two tensor-core dots over
the group's heads (even and odd elements; codes 0..15 are exact in bf16/fp16, products
accumulate in fp32). On the GPU the codes are unpacked by inline PTX into ``8 + v/2``
(``_unpack_nibbles``: one shift and one lop3 per two codes), q is loaded in the unpack's lane
order and the dot is rescaled after; scale and zero are read as one 32-bit word. A program
walks ITERS blocks of BLOCK_N candidates, software-pipelined STAGES deep, so the next block's
gathers are in flight while this one is multiplied (``launch``: ``estimate`` /
``estimate_wide``). With ``parts`` each program also writes, per q head, the max ``m`` of its
scores and ``sum(exp(s - m))``, from which ``topp`` combines each head's max and sum without
a pass over the row.

Shapes: ``q`` ``[R, Hq, D]`` bf16/fp16; ``kq`` uint8 ``[S, H, D // 2]``, ``kscale`` and
``kzero`` fp16 ``[S, H]`` (``store``); candidates as page lists ``[R, H, K]`` with page size
``P`` (or slot lists ``[R, H, C]``, ``page_size=0``) and counts int32 ``[R, H]``; scores fp32
``[R, H, G, C]``; partials fp32 ``[R, H, G, 2, NP]``.
"""

from __future__ import annotations

import torch

from . import launch
from .launch import interpreting, next_pow2
from .store import dequantize_int4_ref, gather_heads

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def int4_scores_ref(q, kq, kscale, kzero, cand_slots, cand_counts, sm_scale):
    """The definition: dequantize every candidate's key, then q . k.

    Parameters
    ----------
    q : torch.Tensor
        ``[R, Hq, D]``.
    kq, kscale, kzero : torch.Tensor
        uint8 ``[S, H, D // 2]``, fp16 ``[S, H]`` twice.
    cand_slots : torch.Tensor
        int ``[R, H, C]`` candidate slots (``select.quest_select_ref``).
    cand_counts : torch.Tensor
        int ``[R, H]``.
    sm_scale : float

    Returns
    -------
    torch.Tensor
        fp32 ``[R, H, G, C]``, ``-inf`` past the count.
    """
    R, Hq, D = q.shape
    H = kq.shape[1]
    k = dequantize_int4_ref(gather_heads(kq, cand_slots), gather_heads(kscale, cand_slots),
                            gather_heads(kzero, cand_slots))  # [R, H, C, D]
    qg = q.float().view(R, H, Hq // H, D)
    s = torch.einsum("rhgd,rhcd->rhgc", qg, k) * sm_scale
    C = cand_slots.shape[-1]
    valid = torch.arange(C, device=q.device)[None, None, :] < cand_counts.long()[:, :, None]
    return torch.where(valid[:, :, None, :], s, float("-inf"))


def score_parts_ref(scores, cand_counts, span: int, width: int):
    """The estimate's partials (``int4_scores_triton(parts=)``) from scores [R, H, G, C]:
    fp32 [R, H, G, 2, width], per q head and block j of ``span`` candidates the max m of its
    scores and sum(exp(s - m)); blocks past the count hold (-inf, 0)."""
    R, H, G, C = scores.shape
    n_blocks = -(-C // span)
    if n_blocks > width:
        raise ValueError(f"{C} candidates in blocks of {span} need {n_blocks} partials > {width}")
    idx = torch.arange(n_blocks * span, device=scores.device)
    s = torch.full((R, H, G, n_blocks * span), float("-inf"), device=scores.device)
    s[..., :C] = scores.float()
    s = torch.where(idx < cand_counts.long()[:, :, None, None], s, float("-inf"))
    s = s.view(R, H, G, n_blocks, span)
    m = s.amax(-1)
    t = torch.exp(s - torch.where(torch.isinf(m), 0.0, m)[..., None]).sum(-1)
    out = torch.empty(R, H, G, 2, width, device=scores.device)
    out[..., 0, :] = float("-inf")
    out[..., 1, :] = 0.0
    out[..., 0, :n_blocks] = m
    out[..., 1, :n_blocks] = t
    return out


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------

if triton is not None:
    from .select import _candidate_slots

    # int4 codes -> 8 + v/2 in bf16/fp16 (see _unpack_nibbles): one PTX template, the shifts
    # and constants per type: each register of two 16-bit lanes gets one nibble of two of the
    # four code bytes, moved by one shift into the top four mantissa bits of 8.0 (bf16: bits
    # 6-3, fp16: bits 9-6) and OR-ed into 8.0 by one lop3 ((a & mask) | magic)
    _UNPACK_PTX = """{{
            .reg .b32 t0, t1, t2, t3;
            {s0} t0, $4, {n0};
            {s1} t1, $4, {n1};
            {s2} t2, $4, {n2};
            {s3} t3, $4, {n3};
            lop3.b32 $0, t0, {mask}, {magic}, 0xEA;
            lop3.b32 $1, t1, {mask}, {magic}, 0xEA;
            lop3.b32 $2, t2, {mask}, {magic}, 0xEA;
            lop3.b32 $3, t3, {mask}, {magic}, 0xEA;
            }}"""
    _UNPACK_BF16 = tl.constexpr(_UNPACK_PTX.format(
        s0="shl.b32", n0=3, s1="shr.u32", n1=5, s2="shr.u32", n2=1, s3="shr.u32", n3=9,
        mask="0x00780078", magic="0x41004100"))
    _UNPACK_FP16 = tl.constexpr(_UNPACK_PTX.format(
        s0="shl.b32", n0=6, s1="shr.u32", n1=2, s2="shl.b32", n2=2, s3="shr.u32", n3=6,
        mask="0x03C003C0", magic="0x48004800"))

    @triton.jit
    def _unpack_nibbles(packed, dtype: tl.constexpr):
        """uint8 codes -> (low nibbles, high nibbles) as 8 + v/2 in bf16/fp16, exactly: v is
        shifted into the top four mantissa bits of 8.0 and OR-ed in, one shift and one lop3 per
        register of two values, nothing subtracted (the dot takes 8 * sum(q) out afterwards,
        through the same sum of q that the zero point needs). The four code bytes b0..b3 of a
        32-bit register come out in the lane order b0, b2, b1, b3, so the estimate loads q in
        that order (``_unpack_order``); ``test_unpack_nibbles_exact`` checks every byte value in
        every lane. Two instructions per two codes, where the unpack before (bytes spread by
        prmt, each nibble OR-ed into 128.0 / 1024.0, an fma subtracting it) took three."""
        return tl.inline_asm_elementwise(
            asm=_UNPACK_BF16 if dtype == tl.bfloat16 else _UNPACK_FP16,
            constraints="=r,=r,=r,=r,r", args=[packed], dtype=(dtype.value, dtype.value),
            is_pure=True, pack=4)

    @triton.jit
    def _unpack_order(k):
        """Index k's position in the lane order of ``_unpack_nibbles``: 1 and 2 swapped in every
        group of four (an involution: the same map takes positions back to indices)."""
        return (k & ~3) | ((k & 1) << 1) | ((k >> 1) & 1)

    @triton.jit
    def _estimate_kernel(
        q_ptr, kq_ptr, ks_ptr, kz_ptr, cand_ptr, count_ptr, out_ptr, parts_ptr, sm_scale,
        stride_qr, stride_qh, stride_kqs, stride_kqh, stride_ss, stride_sh, stride_cr, stride_ch,
        stride_or, stride_oh, stride_og, stride_pr, stride_ph, stride_pg,
        H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
        BLOCK_N: tl.constexpr, ITERS: tl.constexpr, STAGES: tl.constexpr, SZ_PAIRED: tl.constexpr,
        DOT_F32: tl.constexpr, P: tl.constexpr, FROM_PAGES: tl.constexpr,
        UNPACK_ASM: tl.constexpr, PARTS: tl.constexpr, NP: tl.constexpr, G_P2: tl.constexpr,
        SLOTS_FIRST: tl.constexpr,
    ):
        """Grid (R*H, C/(BLOCK_N*ITERS)): s = sm_scale * (scale * q.codes + zero * sum(q)).

        q.codes = codes_lo . q_even + codes_hi . q_odd: two tensor-core dots over the group's heads
        (codes 0..15 are exact in bf16/fp16, products accumulate in fp32). A program walks ITERS
        blocks of BLOCK_N candidates, software-pipelined (STAGES), so the next block's gathers are
        in flight while this one is converted and multiplied. ``SZ_PAIRED``: zero is stored right
        after scale (the sidecar's interleaved buffer), read as one 32-bit word. ``UNPACK_ASM``:
        the codes become 8 + v/2 in bf16/fp16 through ``_unpack_nibbles`` (CUDA only), q is read
        in its lane order and the dot rescaled after (8 + v/2 is exact; the fp32 sums of
        q.(8 + v/2) round about three times as coarsely as q.v's would). ``SLOTS_FIRST``: every
        block's candidate slots are read before the loop (``estimate_wide``). ``PARTS``: each
        program also writes, per q head, the max m of its scores and sum(exp(s - m))
        (``parts[r, h, g, 0, j]`` and ``parts[r, h, g, 1, j]`` for program j; NP per head), read
        back from what it stored (G rows, where the dot's tile has G_PAD columns), so the top-p
        kernel combines them instead of a pass over the whole row.
        """
        rh = tl.program_id(0)
        start = tl.program_id(1) * (BLOCK_N * ITERS)
        r = rh // H
        h = rh % H
        count = tl.load(count_ptr + r * H + h)
        if start >= count:
            return
        half = tl.arange(0, D // 2)
        g = tl.arange(0, G_PAD)
        gm = g < G
        qb = q_ptr + r * stride_qr + (h * G + g)[:, None] * stride_qh
        hq = _unpack_order(half) if UNPACK_ASM else half  # q in the unpack's lane order
        qe = tl.load(qb + 2 * hq[None, :], mask=gm[:, None], other=0.0)  # [G_PAD, D/2]
        qo = tl.load(qb + 2 * hq[None, :] + 1, mask=gm[:, None], other=0.0)
        if DOT_F32:  # the CPU interpreter has no bf16 dot
            qe = qe.to(tl.float32)
            qo = qo.to(tl.float32)
        qeT = tl.trans(qe)
        qoT = tl.trans(qo)
        # sum(q) of each head in every row of the block's tile (exact products, fp32 sums),
        # times sm_scale. As a dot it also keeps q's dot operands in registers across the loop:
        # with q used only by the loop's dots, Triton reloaded them from shared memory at every
        # block (eight 16x16 ldmatrix a warp, twice the code bytes' shared-memory reads)
        ones = tl.full([BLOCK_N, D // 2], 1.0, qe.dtype)
        qsum = (tl.dot(ones, qeT) + tl.dot(ones, qoT)) * sm_scale  # [BLOCK_N, G_PAD]
        cbase = cand_ptr + r * stride_cr + h * stride_ch
        obase = out_ptr + r * stride_or + h * stride_oh + g[None, :] * stride_og
        if SLOTS_FIRST:  # every block's slots before the loop: the code gathers pipeline deeper
            na = start + tl.arange(0, ITERS * BLOCK_N)
            slots = tl.reshape(_candidate_slots(cbase, na, na < count, P, FROM_PAGES),
                               [ITERS, BLOCK_N])
            blk = tl.arange(0, ITERS)
        for it in tl.range(0, ITERS, num_stages=STAGES):
            n = start + it * BLOCK_N + tl.arange(0, BLOCK_N)
            nm = n < count
            if SLOTS_FIRST:
                slot = tl.sum(tl.where(blk[:, None] == it, slots, 0), 0)
            else:
                slot = _candidate_slots(cbase, n, nm, P, FROM_PAGES)
            packed = tl.load(kq_ptr + slot[:, None] * stride_kqs + h * stride_kqh + half[None, :],
                             mask=nm[:, None], other=0)
            szp = slot * stride_ss + h * stride_sh
            if SZ_PAIRED:
                w = tl.load((ks_ptr + szp).to(tl.pointer_type(tl.int32)), mask=nm, other=0)
                sc = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                zr = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            else:
                sc = tl.load(ks_ptr + szp, mask=nm, other=0.0).to(tl.float32)
                zr = tl.load(kz_ptr + szp, mask=nm, other=0.0).to(tl.float32)
            if UNPACK_ASM:  # codes as 8 + v/2: q.codes = 2 q.(8 + v/2) - 16 sum(q)
                lo, hi = _unpack_nibbles(packed, qe.dtype)
                sc2 = 2.0 * sc * sm_scale
                zr = zr - 16.0 * sc
            else:
                lo = (packed & 0x0F).to(qe.dtype)
                hi = (packed >> 4).to(qe.dtype)
                sc2 = sc * sm_scale
            dot = tl.dot(lo, qeT) + tl.dot(hi, qoT)  # [BLOCK_N, G_PAD] fp32
            s = sc2[:, None] * dot + zr[:, None] * qsum
            tl.store(obase + n[:, None], s, mask=nm[:, None] & gm[None, :])
        if PARTS:  # the scores just stored, read back: G rows, no padded columns to exp
            tl.debug_barrier()  # every thread's stores are visible to the whole program
            k = tl.arange(0, BLOCK_N * ITERS)
            gr = tl.arange(0, G_P2)
            rm = gr < G
            sv = tl.load(out_ptr + r * stride_or + h * stride_oh + gr[:, None] * stride_og
                         + start + k[None, :], mask=rm[:, None] & (start + k < count)[None, :],
                         other=float("-inf"))
            pm = tl.max(sv, 1)  # finite for every real head: this program has a candidate
            pt = tl.sum(tl.exp(sv - pm[:, None]), 1)
            pb = parts_ptr + r * stride_pr + h * stride_ph + gr * stride_pg + tl.program_id(1)
            tl.store(pb, pm, mask=rm)
            tl.store(pb + NP, pt, mask=rm)


def _estimate_config(rows: int) -> dict:
    """The launch shape for ``rows`` (request, KV head) rows: ``estimate_wide`` from
    ``estimate_wide_rows`` on, else ``estimate``."""
    return launch.get("estimate_wide" if rows >= launch.get("estimate_wide_rows") else "estimate")


def estimate_span(rows: int) -> int:
    """Candidates per estimate program for ``rows`` (request, KV head) rows: one partial each."""
    cfg = _estimate_config(rows)
    return cfg["BLOCK_N"] * cfg["ITERS"]


def score_parts_width(capacity: int) -> int:
    """Partials per q head the estimate may write for rows of ``capacity`` candidates, whichever
    launch shape it takes: ``parts`` buffers are fp32 [R, H, G, 2, this]."""
    span = min(c["BLOCK_N"] * c["ITERS"] for c in (launch.get("estimate"),
                                                   launch.get("estimate_wide")))
    return next_pow2(-(-capacity // span))


def _check_parts(parts, R, H, G, C, span):
    """``parts`` holds a partial per ``span`` candidates of each q head: fp32 [R, H, G, 2, NP]
    with NP >= C / span a power of two, the last two dimensions contiguous."""
    need = -(-C // span)
    if (parts.dtype != torch.float32 or parts.dim() != 5 or tuple(parts.shape[:4]) != (R, H, G, 2)
            or parts.shape[-1] < need or parts.shape[-1] != next_pow2(parts.shape[-1])
            or parts.stride(-1) != 1 or parts.stride(-2) != parts.shape[-1]):
        raise ValueError(f"score partials must be fp32 [{R}, {H}, {G}, 2, NP], NP >= {need} a "
                         f"power of two, the last two dimensions contiguous; got {parts.dtype} "
                         f"{list(parts.shape)} strides {parts.stride()}")


def _scale_zero_paired(kscale: torch.Tensor, kzero: torch.Tensor) -> bool:
    """zero sits right after scale in memory for every (slot, head), 4-byte aligned (the
    sidecar's interleaved buffer from ``store.scale_zero_buffers``)."""
    return (kscale.dtype == kzero.dtype == torch.float16 and kscale.stride() == kzero.stride()
            and kzero.data_ptr() - kscale.data_ptr() == 2 and kscale.data_ptr() % 4 == 0
            and kscale.stride(-1) % 2 == 0 and kscale.stride(0) % 2 == 0)


def int4_scores_triton(q, kq, kscale, kzero, cand_slots, cand_counts, sm_scale, out=None,
                       page_size=0, parts=None):
    """``int4_scores_ref`` on the GPU, one kernel launch.

    Parameters
    ----------
    q, kq, kscale, kzero, cand_counts, sm_scale
        As in ``int4_scores_ref``.
    cand_slots : torch.Tensor
        int32 ``[R, H, K]`` page lists when ``page_size > 0``
        (``select.quest_select_pages_triton``), else ``[R, H, C]`` slot lists.
    out : torch.Tensor, optional
        fp32 ``[R, H, G, >= C]``; past the count it is left as it was (a new one is ``-inf``).
    page_size : int
        ``P`` of the page lists, or 0 for slot lists.
    parts : torch.Tensor, optional
        fp32 ``[R, H, G, 2, NP]``, ``NP >= C / estimate_span(R * H)`` a power of two
        (``score_parts_width``): each program also writes its max and sum of exp per q head,
        ``parts[r, h, g, 0, j]`` and ``parts[r, h, g, 1, j]`` for program ``j``, for
        ``topp.topp_marks_triton(parts=, parts_span=estimate_span(R * H))``.

    Returns
    -------
    torch.Tensor
        ``out``.
    """
    R, Hq, D = q.shape
    H = kq.shape[1]
    G = Hq // H
    C = cand_slots.shape[-1] * max(page_size, 1)
    if out is None:
        out = torch.full((R, H, G, C), float("-inf"), dtype=torch.float32, device=q.device)
    cfg = _estimate_config(R * H)
    BLOCK_N, ITERS = cfg["BLOCK_N"], cfg["ITERS"]
    if parts is not None:
        _check_parts(parts, R, H, G, C, BLOCK_N * ITERS)
    pa = parts if parts is not None else out
    _estimate_kernel[(R * H, triton.cdiv(C, BLOCK_N * ITERS))](
        q, kq, kscale, kzero, cand_slots, cand_counts, out, pa, float(sm_scale),
        q.stride(0), q.stride(1), kq.stride(0), kq.stride(1), kscale.stride(0), kscale.stride(1),
        cand_slots.stride(0), cand_slots.stride(1), out.stride(0), out.stride(1), out.stride(2),
        pa.stride(0), pa.stride(1), pa.stride(2), PARTS=parts is not None,
        NP=parts.shape[-1] if parts is not None else 1, G_P2=next_pow2(G),
        H=H, G=G, G_PAD=max(16, next_pow2(G)), D=D, BLOCK_N=BLOCK_N, ITERS=ITERS,
        SZ_PAIRED=_scale_zero_paired(kscale, kzero),
        DOT_F32=interpreting(), P=max(page_size, 1), FROM_PAGES=page_size > 0,
        UNPACK_ASM=launch.get("estimate_unpack") == "asm" and not interpreting()
        and q.dtype in (torch.bfloat16, torch.float16),
        STAGES=cfg["STAGES"], SLOTS_FIRST=cfg.get("SLOTS_FIRST", False), num_warps=cfg["num_warps"],
    )
    return out
