"""Top-p: the softmax of the estimated scores, the threshold search, each q head's kept set.

Stage 4 of a decode step. For each q head, with ``e = exp(s - max)`` over its candidates'
scores ``s``, the kept set is the smallest set whose mass reaches ``p * sum(e)``: every entry
with ``e >= t`` for the largest threshold ``t`` with ``sum(e[e >= t]) >= p * sum(e)``; entries
tied at ``t`` are all kept, and ``p >= 1`` keeps every candidate.

**The threshold search** (``_threshold_search``). As in the paper's Algorithm 1 there is no
sort; the search runs over the int32 bits of the fp32 values (for non-negative floats the bits
order like the values), so it lands exactly on ``t``: no epsilon, no step count to tune. Each
step probes one key between the smallest and largest keys still possible (one fused (sum, min,
max) block reduction) and moves one end onto a present key; it stops when one key value is left.
The probe is interpolated where the target mass falls between the two ends' known masses (in
value space for top-p, in key space for top-K), with the Illinois rule (an end kept twice in a
row has its weight halved) and a bisection step whenever the last two steps did not halve the
range, so no search takes more than about three times bisection's worst case (32 steps on int32
keys). The same search picks the top-K pages of ``select`` and the heaviest entries of the
union's budget clamps (``_topk_mask``). ``threshold_search_ref`` replays its steps in torch;
``topp_mask_ref`` is the definition (a plain bisection over the bits, 31 steps).

**The kernel** (``_topp_head_kernel``, a program per (request, q head)). Its max and sum come
from the estimate's per-program partials (``estimate.int4_scores_triton(parts=)``), not from a
pass over the row. Entries under the *droppable floor* ``(1 - p) * sum / count`` can never be
kept (together they weigh less than top-p may drop), so only the entries above it are compacted,
as (index, score bits), into the head's scratch (``topp_scratch_width``), and searched there in
a register block of SMALL or MID entries. The compaction first tries a floor 2**RAISE times
higher and checks, in the same pass, that the mass it leaves under it is still droppable (else
it compacts again above the floor itself). A head with more than MID entries above the floor
tries the highest of 2-16 times the floor under which its mass is still droppable
(``_topp_refloor``); one still over MID is flagged (``lo = -1``) and searched by
``_topp_overflow_kernel``, its whole row in registers. Every floor keeps every entry top-p
keeps, so each path ends on the same ``t``. The kept entries are marked in a byte row per
(request, KV head) (``marks``, shared by the group's G q heads: that row is their union, read
by ``union``); the scores are only read.

The kernel is compiled without multiply-add contraction (``_topp_launch``): its branches and
its search loop hold barriers and decide on scalars that every thread must hold bit for bit; a
contracted sum of products reduced across lanes is not that, and hung a warp at a barrier.

Shapes: ``scores`` fp32 ``[R, H, G, C]`` (candidates of each (request, KV head, q head),
``-inf`` or unwritten past the count), ``cand_counts`` int32 ``[R, H]``, ``p`` fp32 ``[R]`` (one
per request).
"""

from __future__ import annotations

import torch

from . import launch
from .launch import next_pow2

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

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


def topp_heads_ref(scores, p):
    """The definition per q head: softmax over the candidates, then ``topp_mask_ref``.

    Parameters
    ----------
    scores : torch.Tensor
        fp32 ``[R, H, G, C]``, ``-inf`` past each row's count (every row has a candidate).
    p : float or torch.Tensor
        Top-p, one value or fp32 ``[R]``; ``p >= 1`` keeps every candidate.

    Returns
    -------
    (probs, kept) : (torch.Tensor, torch.Tensor)
        fp32 ``[R, H, G, C]`` probabilities (0 past the count) and bool ``[R, H, G, C]``, each q
        head's kept set.
    """
    R, H, G, C = scores.shape
    probs = torch.softmax(scores, dim=-1)  # -inf -> 0 (every row has its newest token)
    pr = _rows_p(p, R, scores.device)
    mask = topp_mask_ref(probs.reshape(-1, C), pr[:, None].expand(R, H * G).reshape(-1))
    return probs, mask.view(R, H, G, C)


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
    The same probes in the same fp32 arithmetic, so the kernel's steps can be counted on real
    keys on the CPU; the threshold itself is defined without it (``threshold_sorted_ref``): the
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


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------

if triton is not None:

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
        (16), and 6.5 (12) instead of 9.5 (15) for top-p (``threshold_search_ref``). (A
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


def topp_scratch_width(capacity: int) -> int:
    """Entries per q head the top-p kernel can compact (half the padded row); its scratch holds
    twice that many int32 per q head (an index and the bits of the score for each)."""
    return max(16, next_pow2(capacity) // 2)


def _topp_launch(c_pad: int, step_heads: int = 0) -> dict:
    """Launch shape of the top-p kernel for padded rows of ``c_pad`` in a decode step of
    ``step_heads`` q heads in all (``launch`` entries ``topp``, and ``topp_wide`` over it from
    ``topp_wide_heads`` on)."""
    cfg = launch.get("topp")
    if step_heads >= launch.get("topp_wide_heads"):
        cfg.update(launch.get("topp_wide"))
    cfg.update(launch.maxnreg("topp"))
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
    # (request 37 of its inputs alone hangs). Without contraction every butterfly step is
    # a + b on both lanes: commutative, the same bits.
    cfg["enable_fp_fusion"] = False
    return cfg


def topp_marks_triton(scores, cand_counts, pr, lo, tot, mx, scratch, marks, parts=None,
                      parts_span=0, step_heads=None):
    """Top-p of every q head, its kept entries marked: the top-p kernel, then the overflow kernel
    for the heads it flagged.

    Parameters
    ----------
    scores : torch.Tensor
        fp32 ``[R, H, G, C]``, only read (``estimate.int4_scores_triton``).
    cand_counts : torch.Tensor
        int32 ``[R, H]``, candidates of each row.
    pr : torch.Tensor
        fp32 ``[R]``, top-p of each request (``p >= 1``: nothing searched, nothing marked).
    lo, tot, mx : torch.Tensor
        Out, ``R * H * G`` each: the threshold key (int32; the bits of ``e = exp(s - max)`` at the
        threshold), the sum of ``e`` (fp32) and the row max (fp32) of every q head.
    scratch : torch.Tensor
        int32, at least ``2 * R * H * G * topp_scratch_width(C)`` entries.
    marks : torch.Tensor
        int8 ``[R, H, >= C]``, all zero on entry; the kept entries of any q head of a row are set
        to 1 (the union kernel reads and clears them).
    parts : torch.Tensor, optional
        The estimate's partials of these scores, fp32 ``[R, H, G, 2, NP]``, one per
        ``parts_span`` candidates: each head's max and sum come from them; else from a pass over
        its row.
    step_heads : int, optional
        q heads of the whole decode step when these rows are one of its row groups (it picks the
        launch shape); default ``R * H * G``.
    """
    R, H, G, C = scores.shape
    C_PAD = next_pow2(C)
    width = topp_scratch_width(C)
    pa = parts if parts is not None else scores
    strides = (scores.stride(0), scores.stride(1), scores.stride(2))
    mstrides = (marks.stride(0), marks.stride(1))
    _topp_head_kernel[(R * H * G,)](
        scores, cand_counts, pr, lo, tot, mx, scratch, marks, pa, *strides, *mstrides,
        pa.stride(0), pa.stride(1), pa.stride(2), H=H, G=G, SCRATCH=width,
        PARTS=parts is not None, NP=parts.shape[-1] if parts is not None else 1,
        SPAN=max(int(parts_span), 1), **_topp_launch(C_PAD, step_heads or R * H * G),
    )
    per_kv = launch.get("overflow_per_kv")
    _topp_overflow_kernel[(R * H if per_kv else R * H * G,)](
        scores, cand_counts, pr, lo, tot, mx, marks, *strides, *mstrides, H=H, G=G, C_PAD=C_PAD,
        PER_KV=per_kv, G_PAD=next_pow2(G), num_warps=launch.row_warps(C_PAD, "overflow_warps"),
        **launch.maxnreg("overflow"),
    )
