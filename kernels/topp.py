"""Stages 5-7: int4 score estimate, softmax, top-p by bisection, GQA union, budget clamps.

Top-p is found the way the paper's Algorithm 1 does it - a bisection on the threshold, no sort -
but over the *bit pattern* of the fp32 weights: for non-negative floats the int32 bits are ordered
like the values, so integer halvings land exactly on the largest threshold ``t`` with
``sum(w[w >= t]) >= target`` (no epsilon, no iteration count to tune). The reference halves the
whole bit range (31 steps); the kernel probes between the smallest and largest keys still
possible, interpolated where the target mass falls, and stops when one is left
(``quest._threshold_search``) - the same ``t``. The kept set ``w >= t`` is the smallest set
reaching the target; values tied at ``t`` are all kept.
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


def topp_floor_ref(m, tot, p, count):
    """``_topp_floor`` in torch: the score under which no entry can be kept, with the same
    margins (max ``m``, sum ``tot`` of exp(s - m), top-p ``p``, ``count`` candidates)."""
    return m + torch.log((1.0 - p) * tot / count * 0.999) - 1e-4


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
        block's candidate slots are read before the loop (``ESTIMATE_CONFIG``). ``PARTS``: each
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

    @triton.jit
    def _topp_threshold(s, present, mx, target, total):
        """Top-p over e = exp(s - mx) of the present scores (both search paths compute e here,
        so their keys are the same bits): -> (key of each entry, -1 where absent; the
        threshold key, ``_threshold_search``, interpolating in value space from ``total``, about
        the present entries' mass)."""
        v = tl.exp(s - mx)
        key = tl.where(present, v.to(tl.int32, bitcast=True), -1)
        t, _ = _threshold_search(key, v, target, total, -1, 2147483647, True, False)
        return key, t

    @triton.jit
    def _topp_floor(m, tot, p, count):
        """The droppable floor in score space: entries under (1 - p) * tot / count can never be
        kept (together they weigh less than the mass top-p may drop), so a search looks only at
        the ones above. Tested on the scores, s >= max + log(floor), less a margin far above the
        rounding of exp and of the sum, so every entry whose e reaches the floor is in: no exp.
        Both search paths start from this same value (the top-p kernel may raise it for a row
        with too many entries above, ``_topp_refloor``)."""
        floor = (1.0 - p) * tot / count.to(tl.float32) * 0.999
        return m + tl.log(floor) - 1e-4

    @triton.jit
    def _block_search_mark(buf, mx, n, target, total, mark_row, SCRATCH: tl.constexpr,
                           W: tl.constexpr):
        """``_threshold_search`` over the ``n <= W`` compacted entries of a head's scratch
        (indices in ``buf[:n]``, their scores in ``buf[SCRATCH:SCRATCH + n]``; e = exp(s - mx)
        computed here, the same instructions as wherever else e is needed), held in registers,
        then the kept ones marked in ``mark_row``."""
        k = tl.arange(0, W)
        km = k < n
        s = tl.load((buf + SCRATCH + k).to(tl.pointer_type(tl.float32)), mask=km,
                    other=float("-inf"))
        i = tl.load(buf + k, mask=km, other=0)  # with the scores: no round trip after the search
        key, lo = _topp_threshold(s, km, mx, target, total)
        kept = km & (key >= lo)
        tl.store(mark_row + i, tl.full([W], 1, tl.int8), mask=kept)
        return lo

    @triton.jit
    def _group_ranks(flag):
        """Flags held as [groups, V], V neighbours in one thread, in row order -> (each flagged
        entry's rank among the flagged, from 0; the flagged count of each group). The groups are
        counted and ranked in their threads and only their counts are scanned across the block:
        scanning the flags themselves moved them through shared memory into another layout
        (377 instead of 218 sm_90 instructions a thread per 1024 top-p entries at 8 warps)."""
        fi = flag.to(tl.int32)
        n_grp = tl.sum(fi, 1)
        return (tl.cumsum(n_grp, 0) - n_grp)[:, None] + tl.cumsum(fi, 1) - 1, n_grp

    @triton.jit
    def _compact_above(row, count, s_floor, m, buf, SCRATCH: tl.constexpr, CHUNK: tl.constexpr,
                       STAGES: tl.constexpr, UNDER: tl.constexpr):
        """The entries of a score row at or above ``s_floor`` compacted into a head's scratch
        (indices in ``buf[:n]``, the bits of their scores in ``buf[SCRATCH:SCRATCH + n]``, in
        row order, at most SCRATCH kept) -> (n, however many there are; ``UNDER``: the mass
        exp(s - m) of the entries left under the floor, accumulated per lane and reduced once,
        else 0).

        A chunk is read as [CHUNK / V, V] (V = 4 neighbours, one thread's) and its survivors
        ranked by ``_group_ranks``."""
        V: tl.constexpr = 4 if CHUNK >= 4 else CHUNK
        grp = tl.arange(0, CHUNK // V)
        off = grp[:, None] * V + tl.arange(0, V)[None, :]
        n_surv = tl.zeros([], tl.int32)
        under = tl.zeros([CHUNK // V, V], tl.float32)
        for st in tl.range(0, count, CHUNK, num_stages=STAGES):
            i = st + off
            s = tl.load(row + i, mask=i < count, other=float("-inf"))
            surv = s >= s_floor  # -inf past the count: never (the floor is finite)
            if UNDER:
                under += tl.where(surv, 0.0, tl.exp(s - m))  # exp(-inf) = 0 past the count
            rank, n_grp = _group_ranks(surv)
            pos = n_surv + rank
            sm = surv & (pos < SCRATCH)
            tl.store(buf + pos, i, mask=sm)
            tl.store(buf + SCRATCH + pos, s.to(tl.int32, bitcast=True), mask=sm)
            n_surv += tl.sum(n_grp, 0)
        return n_surv, tl.sum(tl.sum(under, 1), 0)

    @triton.jit
    def _topp_refloor(row, count, m, tot, p, s_floor, CHUNK: tl.constexpr, STAGES: tl.constexpr):
        """A higher droppable floor for a row with more entries above ``s_floor`` than the
        register block holds: the highest of s_floor + k ln 2 (k = 1..4, e.g. twice to 16 times
        the floor in e) under which the row's whole mass still weighs no more than top-p may
        drop ((1 - p) * tot, less the same 0.1% margin). Every kept entry is above it, so the
        search over the fewer entries above it ends on the same threshold. On the benchmark's
        keys no head is left over the 4096 block above it (``profile_step.py`` counts them);
        -> ``s_floor`` itself when no candidate qualifies."""
        c = tl.arange(0, CHUNK)
        k = tl.arange(0, 4) + 1
        s_k = s_floor + k.to(tl.float32) * 0.6931471805599453  # [4] candidate floors
        acc = tl.zeros([4, CHUNK], tl.float32)
        for st in tl.range(0, count, CHUNK, num_stages=STAGES):
            s = tl.load(row + st + c, mask=st + c < count, other=float("-inf"))
            e = tl.exp(s - m)
            acc += tl.where(s[None, :] < s_k[:, None], e[None, :], 0.0)
        under = tl.sum(acc, 1)  # [4] mass under each candidate
        ok = under <= (1.0 - p) * tot * 0.999
        return tl.max(tl.where(ok, s_k, s_floor), 0)  # the candidates rise with k

    @triton.jit
    def _topp_head_kernel(
        s_ptr, count_ptr, p_ptr, lo_ptr, tot_ptr, max_ptr, scratch_ptr, mark_ptr, parts_ptr,
        stride_sr, stride_sh, stride_sg, stride_mr, stride_mh, stride_pr, stride_ph, stride_pg,
        H: tl.constexpr, G: tl.constexpr, CHUNK: tl.constexpr, SMALL: tl.constexpr,
        MID: tl.constexpr, SCRATCH: tl.constexpr, STAGES: tl.constexpr, REFLOOR: tl.constexpr,
        PARTS: tl.constexpr, NP: tl.constexpr, SPAN: tl.constexpr, RAISE: tl.constexpr,
    ):
        """One program per (request, q head): the top-p threshold of e = exp(s - max), and the
        kept entries marked (a byte per candidate, shared by the KV head's G q heads: that mark
        row is their union).

        Bisection over the int32 bits of e (non-negative floats order like their bits): ends on
        the largest threshold whose kept mass reaches p * sum(e), exactly; ``lo``, the sum and
        the max are written per head. Only entries above the droppable floor can be kept: they
        are compacted into the head's scratch (SCRATCH indices, then SCRATCH scores, so the
        search reads them in order, not gathered from the row), and they are searched
        in registers, in a block of SMALL or (when more) MID entries. A head with more than MID
        first tries a higher floor (``_topp_refloor``) and compacts again; one still over MID
        is flagged (``lo`` = -1) and searched by ``_topp_overflow_kernel``, its whole row in
        registers (nearly flat rows, a few heads in a thousand on the benchmark's keys:
        ``profile_step.py`` counts them; searched here chunk by chunk, re-reading the row at
        every step, one such head held up the whole kernel). The scores are only read (e is
        recomputed where needed, same instructions, same bits), in CHUNK pieces. ``PARTS``: the
        max and sum come from the estimate's per-program partials (``_estimate_kernel``, one per
        SPAN candidates), not from a first pass over the row.
        """
        pid = tl.program_id(0)
        r = pid // (H * G)
        h = (pid // G) % H
        g = pid % G
        count = tl.load(count_ptr + r * H + h)
        p = tl.load(p_ptr + r)
        row = s_ptr + r * stride_sr + h * stride_sh + g * stride_sg
        c = tl.arange(0, CHUNK)
        m = tl.zeros([], tl.float32)
        tot = tl.zeros([], tl.float32)
        lo = tl.zeros([], tl.int32)
        if p < 1.0:  # p >= 1 keeps every candidate: nothing to find
            if PARTS:  # the estimate's partials: no pass over the row
                j = tl.arange(0, NP)
                jm = j < (count + SPAN - 1) // SPAN
                pb = parts_ptr + r * stride_pr + h * stride_ph + g * stride_pg + j
                pm = tl.load(pb, mask=jm, other=float("-inf"))
                pt = tl.load(pb + NP, mask=jm, other=0.0)
                m = tl.max(pm, 0)
                tot = tl.sum(pt * tl.exp(pm - m), 0)
            else:
                # pass 1: max and sum of exp, online per lane (one block reduction at the end,
                # not two per chunk: top-p + union 54.8 vs 56.7 us at batch 8, 401.8 vs 415.3
                # at 64, H100)
                mv = tl.full([CHUNK], float("-inf"), tl.float32)
                tv = tl.zeros([CHUNK], tl.float32)
                for st in tl.range(0, count, CHUNK, num_stages=STAGES):
                    s = tl.load(row + st + c, mask=st + c < count, other=float("-inf"))
                    m_new = tl.maximum(mv, s)
                    m_ok = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes with nothing yet
                    tv = tv * tl.exp(mv - m_ok) + tl.exp(s - m_ok)
                    mv = m_new
                m = tl.max(mv, 0)
                tot = tl.sum(tv * tl.exp(mv - m), 0)
            s_floor = _topp_floor(m, tot, p, count)
            buf = scratch_ptr + pid.to(tl.int64) * (2 * SCRATCH)
            # pass 2: the survivors (index, score) compacted into the scratch
            if RAISE > 0:
                # optimistic: above 2**RAISE times the floor, checked in the same pass (the
                # mass left under it must still be droppable), else again above the floor
                n_surv, under = _compact_above(row, count, s_floor + RAISE * 0.6931471805599453,
                                               m, buf, SCRATCH, CHUNK, STAGES, True)
                if under > (1.0 - p) * tot * 0.999:
                    tl.debug_barrier()  # every thread is done with the first compaction
                    n_surv, under = _compact_above(row, count, s_floor, m, buf, SCRATCH, CHUNK,
                                                   STAGES, False)
            else:
                n_surv, under = _compact_above(row, count, s_floor, m, buf, SCRATCH, CHUNK,
                                               STAGES, False)
            if REFLOOR and n_surv > MID:  # a nearly flat row: a higher floor before flagging it
                s_floor = _topp_refloor(row, count, m, tot, p, s_floor, CHUNK, STAGES)
                tl.debug_barrier()  # every thread is done with the first compaction
                n_surv, under = _compact_above(row, count, s_floor, m, buf, SCRATCH, CHUNK,
                                               STAGES, False)
            tl.debug_barrier()  # this program's stores are visible to all its threads
            target = p * tot
            mark_row = mark_ptr + r * stride_mr + h * stride_mh
            if n_surv <= SMALL:
                lo = _block_search_mark(buf, m, n_surv, target, tot - under, mark_row, SCRATCH,
                                        SMALL)
            elif n_surv <= MID:
                lo = _block_search_mark(buf, m, n_surv, target, tot - under, mark_row, SCRATCH,
                                        MID)
            else:  # flagged: _topp_overflow_kernel searches this head's whole row
                lo = tl.full([], -1, tl.int32)
        tl.store(lo_ptr + pid, lo)
        tl.store(tot_ptr + pid, tot)
        tl.store(max_ptr + pid, m)

    @triton.jit
    def _topp_overflow_kernel(
        s_ptr, count_ptr, p_ptr, lo_ptr, tot_ptr, max_ptr, mark_ptr, stride_sr, stride_sh,
        stride_sg, stride_mr, stride_mh, H: tl.constexpr, G: tl.constexpr, C_PAD: tl.constexpr,
        PER_KV: tl.constexpr, G_PAD: tl.constexpr,
    ):
        """Only the q heads ``_topp_head_kernel`` flagged (``lo`` = -1: more entries above the
        floor, even a raised one, than its register block) do anything: the same search over the
        whole row, held in registers, among the entries above the first floor (every floor used
        keeps every entry top-p keeps, so the search ends on the same threshold), then their kept
        entries marked. One program per (request, KV head), which looks at its G q heads' ``lo``
        at once and searches the flagged ones in turn (``PER_KV``), or one per (request, q
        head): nearly every program only exits, and G times fewer of them cost less. A kernel of
        its own so that the union kernel, which runs for every row, stays lean (with this search
        inside it took 13.6 instead of 7.7 us at batch 8 x 32k on the H100)."""
        pid = tl.program_id(0)
        if PER_KV:
            gg = tl.arange(0, G_PAD)
            if tl.min(tl.load(lo_ptr + pid * G + gg, mask=gg < G, other=0), 0) >= 0:
                return
            first = pid * G
            n_heads = G
        else:
            if tl.load(lo_ptr + pid) >= 0:
                return
            first = pid
            n_heads = 1
        idx = tl.arange(0, C_PAD)
        for head in range(first, first + n_heads):
            if tl.load(lo_ptr + head) < 0:
                r = head // (H * G)
                h = (head // G) % H
                g = head % G
                count = tl.load(count_ptr + r * H + h)
                p = tl.load(p_ptr + r)
                m = tl.load(max_ptr + head)
                tot = tl.load(tot_ptr + head)
                valid = idx < count
                s = tl.load(s_ptr + r * stride_sr + h * stride_sh + g * stride_sg + idx,
                            mask=valid, other=float("-inf"))
                above = valid & (s >= _topp_floor(m, tot, p, count))
                key, t = _topp_threshold(s, above, m, p * tot, tot)
                tl.store(mark_ptr + r * stride_mr + h * stride_mh + idx,
                         tl.full([C_PAD], 1, tl.int8), mask=above & (key >= t))
                tl.store(lo_ptr + head, t)

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


def _estimate_config(rows: int) -> dict:
    return ESTIMATE_CONFIG_WIDE if rows >= ESTIMATE_WIDE_ROWS else ESTIMATE_CONFIG


def estimate_span(rows: int) -> int:
    """Candidates per estimate program for ``rows`` (request, KV head) rows: one partial each."""
    cfg = _estimate_config(rows)
    return cfg["BLOCK_N"] * cfg["ITERS"]


def score_parts_width(capacity: int) -> int:
    """Partials per q head the estimate may write for rows of ``capacity`` candidates, whichever
    launch shape it takes: ``parts`` buffers are fp32 [R, H, G, 2, this]."""
    span = min(c["BLOCK_N"] * c["ITERS"] for c in (ESTIMATE_CONFIG, ESTIMATE_CONFIG_WIDE))
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


def int4_scores_triton(q, kq, kscale, kzero, cand_slots, cand_counts, sm_scale, out=None,
                       page_size=0, parts=None):
    """``page_size > 0``: ``cand_slots`` holds page lists (see quest_select_pages_triton).
    ``parts`` (fp32 [R, H, G, 2, NP], NP >= C / estimate_span(R*H)): also write each program's
    max and sum of exp per q head, for ``prune_from_scores_triton(..., parts=,
    parts_span=estimate_span(R*H))``."""
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
        UNPACK_ASM=ESTIMATE_UNPACK == "asm" and not interpreting()
        and q.dtype in (torch.bfloat16, torch.float16),
        STAGES=cfg["STAGES"], SLOTS_FIRST=cfg.get("SLOTS_FIRST", False), num_warps=cfg["num_warps"],
    )
    return out


# launch shape of the estimate (tuned on the H100 by benchmarks/tune_kernels.py); from
# ESTIMATE_WIDE_ROWS (request, KV head) rows on, ESTIMATE_CONFIG_WIDE: with enough programs to
# fill the GPU many times over, smaller programs at one warp win. Its gathers want many blocks in
# flight: 6 (5) pipeline stages instead of 3 took it from 21.3 to 18.7 us at batch 8 x 32k, 43.3
# to 39.4 at 16, 151.6 to 140.1 at 64 (tune_stages_h100.json, tune_estimate_wide_h100.json)
# ``SLOTS_FIRST``: a program reads all its blocks' candidate slots before its loop, so that the
# loop's only loads (codes, scale and zero) pipeline STAGES - 1 blocks deep instead of one; the
# wide shape only: with the slots first the code gathers got faster from batch 32 (estimate
# 76.5 -> 75.0 us at 32 x 32k, step 413.7 -> 408.4 at 64) and slower at batch 8 (20.3 ->
# 23.0 us: a program's 512 slots read first put one more load on its chain). These are from a
# probe run on the H100 with both forms behind a flag (no results file: the flag is gone); the
# bench_2358fab_h100.json run has the wide shape with them
ESTIMATE_CONFIG = dict(BLOCK_N=64, ITERS=8, STAGES=6, num_warps=2, SLOTS_FIRST=False)
ESTIMATE_CONFIG_WIDE = dict(BLOCK_N=64, ITERS=4, STAGES=5, num_warps=1, SLOTS_FIRST=True)
ESTIMATE_WIDE_ROWS = 256
# how the estimate turns int4 codes into bf16/fp16: "asm" (_unpack_nibbles) or "convert"
# (Triton's integer ops and conversions; always in the interpreter)
ESTIMATE_UNPACK = "asm"


def _scale_zero_paired(kscale: torch.Tensor, kzero: torch.Tensor) -> bool:
    """zero sits right after scale in memory for every (slot, head), 4-byte aligned (the
    sidecar's interleaved buffer from ``int4.scale_zero_buffers``)."""
    return (kscale.dtype == kzero.dtype == torch.float16 and kscale.stride() == kzero.stride()
            and kzero.data_ptr() - kscale.data_ptr() == 2 and kscale.data_ptr() % 4 == 0
            and kscale.stride(-1) % 2 == 0 and kscale.stride(0) % 2 == 0)


# warps of the per-(request, KV head) union/compaction kernel by padded row (tuned on the H100
# by benchmarks/tune_kernels.py); rows not listed: 4 up to 2048, else 8
UNION_WARPS: dict[int, int] = {8192: 16}


# from UNION_CAP_HEADS q heads in the whole decode step (every row group) on, the union/compaction
# kernel is capped at UNION_CAP_NREG registers a thread (unless MAXNREG["union"] sets a cap): prune
# alone at 32k 234.4 vs 238.2 us at batch 64, 126.7 vs 128.1 at 32, but 44.6 vs 44.0 at 8 and no
# change at 16; the grouped step 0.3973 vs 0.4034 ms at 64 (tune_maxnreg_0dce9c9_h100.json, which
# agrees with tune_maxnreg_wide_9fc16ec_h100.json and tune_maxnreg_h100.json)
UNION_CAP_HEADS = 1024
UNION_CAP_NREG = 64


def _union_regs(step_heads: int) -> dict:
    if MAXNREG.get("union") is None and step_heads >= UNION_CAP_HEADS:
        return dict(maxnreg=UNION_CAP_NREG)
    return _maxnreg("union")


def _row_warps(c_pad: int) -> int:
    return UNION_WARPS.get(c_pad, 4 if c_pad <= 2048 else 8)


# warps of the overflow top-p kernel by padded row; rows not listed: as the union kernel
OVERFLOW_WARPS: dict[int, int] = {}
# the overflow kernel's grid: one program per (request, KV head) (True) or per q head (False)
OVERFLOW_PER_KV = True


def topp_scratch_width(capacity: int) -> int:
    """Entries per q head the top-p kernel can compact (half the padded row); its scratch holds
    twice that many int32 per q head (an index and the bits of the score for each)."""
    return max(16, next_pow2(capacity) // 2)


# top-p kernel launch shape (tuned on the H100 by benchmarks/tune_kernels.py): the row is read
# in CHUNK pieces; a head with at most SMALL (else MID) entries above the floor is searched in a
# register block of that size; MID is capped at the scratch width; REFLOOR: a head with more than
# MID entries above the floor tries a higher floor before it is left to the overflow kernel;
# RAISE: the compaction first keeps only the entries above 2**RAISE times the floor and checks in
# the same pass that the mass under it is still droppable (else it compacts above the floor).
# Prune at 32k with RAISE 0 / 1 / 2 / 3: 54.3 / 53.8 / 51.6 / 59.3 us at batch 8, 98.0 / 94.4 /
# 92.4 / 104.3 at 16, 334.3 / 326.2 / 323.3 / 342.4 at 64, same kept sets (tune_raise_h100.json)
TOPP_CONFIG = dict(CHUNK=1024, SMALL=2048, MID=4096, STAGES=3, num_warps=8, REFLOOR=True,
                   RAISE=2)
# from TOPP_WIDE_HEADS q heads in the whole decode step (every row group) on, smaller programs:
# with the GPU full many times over, more of them share an SM. Step at 32k, wide vs not:
# 304.4 vs 308.3 us at batch 32, 581.9 vs 594.9 at 64; 184.4 vs 178.9 at 16, 111.8 vs 108.6 at 8
# (tune_estimate_wide_h100.json)
# At 4 warps the interpolated threshold search (5cf593c) took the kernel from 149 to 189
# registers a thread (ptxas), three programs an SM to two; capped at 168 (no spills) it kept
# three. Capped at 128 four fit, for 56 bytes of spills a thread: prune 135.5 -> 128.6 us at
# batch 32 x 32k and 249.6 -> 238.8 at 64, step 221.0 -> 215.2 and 413.0 -> 405.0 (same call,
# bench_a5bcd6d-topp128_h100.json against bench_a5bcd6d_h100.json)
TOPP_CONFIG_WIDE = dict(TOPP_CONFIG, CHUNK=1024, num_warps=4, maxnreg=128)
# From 512 q heads (batch 16 at 32 q heads) since the 128-register cap: at batch 16 the wide
# shape's 512 programs then fit the GPU at once (four an SM), and prune took 71.9 instead of
# 79.7 us, the step 129.4 instead of 133.8 (bench_wide16_401af62_h100.json against
# bench_cur_401af62_h100.json, same call); at batch 8 it stays slower (prune 45.7 vs 44.0 us,
# bench_wide8_401af62_h100.json)
TOPP_WIDE_HEADS = 512
# the top-p kernel takes each head's max and sum from the estimate's partials
# (``twilight_prune_triton``) instead of a first pass over its row
TOPP_FROM_PARTS = True

# register cap a thread (ptxas .maxnreg) of the prune kernels; None: the compiler's choice. An SM
# holds 64K registers, so a cap sets how many programs share it (tuned on the H100 by
# benchmarks/tune_kernels.py)
MAXNREG: dict[str, int | None] = dict(topp=None, union=None, overflow=None)


def _maxnreg(kernel: str) -> dict:
    n = MAXNREG.get(kernel)
    return {} if n is None else dict(maxnreg=int(n))


def _topp_launch(c_pad: int, step_heads: int = 0) -> dict:
    """Launch shape of the top-p kernel for padded rows of ``c_pad`` in a decode step of
    ``step_heads`` q heads in all (``TOPP_CONFIG_WIDE`` from ``TOPP_WIDE_HEADS`` on)."""
    base = TOPP_CONFIG_WIDE if step_heads >= TOPP_WIDE_HEADS else TOPP_CONFIG
    cfg = dict(base, **_maxnreg("topp"))
    width = topp_scratch_width(c_pad)
    cfg["CHUNK"] = min(cfg["CHUNK"], c_pad)
    cfg["MID"] = min(cfg["MID"], width)
    cfg["SMALL"] = min(cfg["SMALL"], cfg["MID"])
    if c_pad <= 256:
        cfg["num_warps"] = min(cfg["num_warps"], 4)
    # No multiply-add contraction in this kernel: its branches and its search loop (barriers
    # inside) hang on scalars every thread must hold bit for bit, and a sum of products reduced
    # across lanes is not that when contracted. The head's total tot = sum(pt * exp(pm - m)) was
    # compiled with its first butterfly step as fma(own product, partner's rounded product):
    # partner lanes then disagree in the last bit, so do p * tot, the search's probes and its
    # stop test, and the warps split at the next barrier. That hung the 8k x 64 benchmark case
    # (request 37 of its inputs alone hangs; benchmarks/probe_prune_alone.py finds it). Without
    # contraction every butterfly step is a + b on both lanes: commutative, the same bits.
    cfg["enable_fp_fusion"] = False
    return cfg


def prune_from_scores_triton(scores, cand_slots, cand_counts, p, min_budget, max_budget,
                             kept_slots=None, kept_counts=None, lo=None, tot=None, page_size=0,
                             scratch=None, mx=None, marks=None, step_heads=None, parts=None,
                             parts_span=0):
    """Top-p per q head, then union / clamps / compaction per KV head; ``scores`` is only read.
    ``lo``, ``tot``, ``mx`` (R*H*G each) receive each head's threshold key, sum of e and row
    max, where e = exp(s - max). ``scratch``: int32, ``2*R*H*G*topp_scratch_width(C)`` entries
    or more. ``marks``: int8 [R, H, C], all zero (it is left all zero). ``step_heads``: q heads
    of the whole decode step when these rows are one of its row groups (the launch shape).
    ``parts``: the estimate's partials of these scores (``int4_scores_triton``), one per
    ``parts_span`` candidates: the max and sum of each head come from them."""
    R, H, G, C = scores.shape
    dev = scores.device
    pr = _rows_p(p, R, dev)
    if kept_slots is None:
        kept_slots = torch.zeros(R, H, C, dtype=torch.int32, device=dev)
    if kept_counts is None:
        kept_counts = torch.empty(R, H, dtype=torch.int32, device=dev)
    if lo is None:
        lo = torch.empty(R * H * G, dtype=torch.int32, device=dev)
    if tot is None:
        tot = torch.empty(R * H * G, dtype=torch.float32, device=dev)
    if mx is None:
        mx = torch.empty(R * H * G, dtype=torch.float32, device=dev)
    if marks is None:
        marks = torch.zeros(R, H, C, dtype=torch.int8, device=dev)
    C_PAD = next_pow2(C)
    width = topp_scratch_width(C)
    if scratch is None:
        scratch = torch.empty(2 * R * H * G * width, dtype=torch.int32, device=dev)
    elif scratch.numel() < 2 * R * H * G * width:
        raise ValueError(
            f"top-p scratch holds {scratch.numel()} entries, needs {2 * R * H * G * width}")
    if parts is not None:
        if parts_span <= 0:
            raise ValueError(f"parts_span must be > 0 with parts, got {parts_span}")
        _check_parts(parts, R, H, G, C, parts_span)
    pa = parts if parts is not None else scores
    strides = (scores.stride(0), scores.stride(1), scores.stride(2))
    mstrides = (marks.stride(0), marks.stride(1))
    _topp_head_kernel[(R * H * G,)](
        scores, cand_counts, pr, lo, tot, mx, scratch, marks, pa, *strides, *mstrides,
        pa.stride(0), pa.stride(1), pa.stride(2), H=H, G=G, SCRATCH=width,
        PARTS=parts is not None, NP=parts.shape[-1] if parts is not None else 1,
        SPAN=max(int(parts_span), 1), **_topp_launch(C_PAD, step_heads or R * H * G),
    )
    per_kv = OVERFLOW_PER_KV
    _topp_overflow_kernel[(R * H if per_kv else R * H * G,)](
        scores, cand_counts, pr, lo, tot, mx, marks, *strides, *mstrides, H=H, G=G, C_PAD=C_PAD,
        PER_KV=per_kv, G_PAD=next_pow2(G), num_warps=OVERFLOW_WARPS.get(C_PAD, _row_warps(C_PAD)),
        **_maxnreg("overflow"),
    )
    _union_compact_kernel[(R * H,)](
        scores, marks, mx, tot, cand_slots, cand_counts, pr, kept_slots, kept_counts,
        int(min_budget), int(max_budget or 0), *strides, *mstrides, cand_slots.stride(0),
        cand_slots.stride(1), kept_slots.stride(0), kept_slots.stride(1), H=H, G=G, C_PAD=C_PAD,
        P=max(page_size, 1), FROM_PAGES=page_size > 0, KEEP_ALL=False,
        V=_union_shape(C_PAD, page_size, page_size > 0), num_warps=_row_warps(C_PAD),
        **_union_regs(step_heads or R * H * G),
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
    _union_compact_kernel[(R * H,)](
        cand_pages, cand_pages, cand_pages, cand_pages, cand_pages, cand_counts, ones, kept_slots,
        cand_counts, 0, 0, 0, 0, 0, 0, 0, cand_pages.stride(0), cand_pages.stride(1),
        kept_slots.stride(0), kept_slots.stride(1), H=H, G=1, C_PAD=C_PAD, P=page_size,
        FROM_PAGES=True, KEEP_ALL=True, V=1, num_warps=_row_warps(C_PAD),
    )
    return kept_slots, cand_counts


def twilight_prune_triton(q, kq, kscale, kzero, cand_slots, cand_counts, p, sm_scale, min_budget,
                          max_budget, scores=None, kept_slots=None, kept_counts=None, lo=None,
                          tot=None, page_size=0, scratch=None, mx=None, marks=None,
                          step_heads=None, parts=None):
    """``page_size > 0``: ``cand_slots`` holds page lists (see quest_select_pages_triton).
    ``parts``: the buffer of the estimate's partials (allocated when None), used when
    ``TOPP_FROM_PARTS``."""
    R, H, C = cand_slots.shape[0], cand_slots.shape[1], cand_slots.shape[-1] * max(page_size, 1)
    G = q.shape[1] // H
    if not TOPP_FROM_PARTS:
        parts = None
    elif parts is None:
        parts = torch.empty(R, H, G, 2, score_parts_width(C), dtype=torch.float32,
                            device=q.device)
    scores = int4_scores_triton(q, kq, kscale, kzero, cand_slots, cand_counts, sm_scale, out=scores,
                                page_size=page_size, parts=parts)
    return prune_from_scores_triton(scores, cand_slots, cand_counts, p, min_budget, max_budget,
                                    kept_slots, kept_counts, lo, tot, page_size, scratch, mx,
                                    marks, step_heads, parts, estimate_span(R * H))
