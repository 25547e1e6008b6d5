"""Triton kernels against the torch references on fresh random inputs.

Runs on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest when there is
no GPU) at small shapes, and on CUDA (marked ``gpu``) at serving shapes.
"""

import contextlib
import math
import os
import random
import re

import pytest
import torch

from sglang_twilight import ops
from sglang_twilight.kernels import estimate as E
from sglang_twilight.kernels import launch
from sglang_twilight.kernels import prune as PR
from sglang_twilight.kernels import select as S
from sglang_twilight.kernels import store as ST
from sglang_twilight.kernels import topp as T
from sglang_twilight.kernels import union as U
from tests.pools import make_layout

INTERP = os.environ.get("TRITON_INTERPRET") == "1"


def _seed() -> int:
    """A fresh seed for a test's random inputs, named in its failure messages so that a rare
    failure can be replayed: TWILIGHT_TEST_SEED=<seed> pytest ... draws the same inputs."""
    return int(os.environ.get("TWILIGHT_TEST_SEED") or random.randrange(1 << 30))


@pytest.fixture(params=["interp", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs CUDA")
        if INTERP:
            pytest.skip("TRITON_INTERPRET=1 is set: the CUDA run needs the compiled kernels")
        return "cuda"
    if not INTERP:
        pytest.skip("set TRITON_INTERPRET=1 to run the Triton kernels on the CPU")
    return "cpu"


@pytest.fixture
def shapes():
    """``shapes(**entries)``: launch-table entries changed until the test ends
    (``launch.override``)."""
    with contextlib.ExitStack() as stack:
        yield lambda **entries: stack.enter_context(launch.override(**entries))


def _shapes(device):
    """(seq_lens, H, G, D, dtype, budget) cases; ragged, page-unaligned lengths."""
    if device == "cpu":
        return [
            ([37, 300, 16], 2, 4, 64, torch.bfloat16, 64),
            ([17, 129], 1, 8, 128, torch.float16, 96),
            ([250, 3], 3, 3, 64, torch.bfloat16, 512),
            ([90], 2, 1, 128, torch.bfloat16, 48),
        ]
    rng = random.Random()
    cases = []
    for H, G, D in [(8, 4, 128), (2, 8, 64), (4, 1, 128), (3, 3, 64)]:
        for bs in (1, 64) if G == 4 else (7,):
            hi = 32768 if bs == 1 else (8192 if bs <= 8 else 2048)
            seq = [rng.randint(17, hi) for _ in range(bs)]
            dtype = (torch.bfloat16, torch.float16)[len(cases) % 2]
            cases.append((seq, H, G, D, dtype, rng.choice([1024, 4096, 8192])))
    cases.append(([32768, 17, 20000, 4095], 8, 4, 128, torch.bfloat16, 8192))
    return cases


def test_store_matches_reference(device):
    for seq, H, G, D, dtype, _ in _shapes(device):
        seed = _seed()
        a = make_layout(seq, H, G, D, dtype=dtype, device=device, seed=seed, backend="torch")
        b = make_layout(seq, H, G, D, dtype=dtype, device=device, seed=seed, backend="triton")
        assert torch.equal(a.kscale, b.kscale) and torch.equal(a.kzero, b.kzero)
        assert torch.equal(a.kmax, b.kmax) and torch.equal(a.kmin, b.kmin)
        assert torch.equal(a.kbscale, b.kbscale)
        ca = ST.int4_codes(a.kq).int()
        cb = ST.int4_codes(b.kq).int()
        diff = (ca - cb).abs()
        # a code may differ by one only where (k - zero) / scale lands on .5 (FMA contraction)
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-4
        # decode step: one token per request, written after the extend
        loc = torch.stack([a.req_to_token[a.req_pool_indices[r], n - 1] for r, n in enumerate(seq)])
        a.k_buffer[loc.long()] = torch.randn_like(a.k_buffer[loc.long()])
        b.k_buffer.copy_(a.k_buffer)
        ops.store_sidecar(a.k_buffer, loc, a.sidecar, 16, backend="torch")
        ops.store_sidecar(b.k_buffer, loc, b.sidecar, 16, backend="triton")
        assert torch.equal(a.kmax, b.kmax) and torch.equal(a.kmin, b.kmin)
        assert torch.equal(a.kbscale, b.kbscale)


def _layers_with_sidecars(L, S, H, D, dtype, device, gen):
    """L layers' random K buffers ``[S, H, D]`` and empty sidecars, as the pool holds them."""
    out = []
    for _ in range(L):
        k = torch.randn(S, H, D, generator=gen).to(device=device, dtype=dtype)
        kscale, kzero = ST.scale_zero_buffers(S, H, device)
        out.append((k, (ST.code_buffer(S, H, D, device), kscale, kzero,
                        *ST.bounds_buffers(S // 16, H, D, device))))
    return out


def test_store_all_layers_in_one_launch_equals_one_launch_per_layer(device):
    """The dense-way step's store (every sparse layer in one launch, buffers read by address)
    writes exactly what one launch per layer writes, in every layer: a decode step's scattered
    tokens, an extend's run across pages, and a single token."""
    S = 512 if device == "cpu" else 1 << 14
    for L, H, D, dtype in [(3, 2, 64, torch.bfloat16), (2, 3, 128, torch.float16)] + (
            [] if device == "cpu" else [(30, 8, 128, torch.bfloat16)]):
        seed = _seed()
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randperm(S // 16 - 1, generator=gen)[:12] + 1  # pages, not the padding one
        decode = (starts * 16 + torch.randint(0, 16, (12,), generator=gen)).to(device)
        extend = torch.arange(80, 80 + 37, device=device)

        def copy(layers):
            return [(k.clone(), tuple(t.clone() for t in side)) for k, side in layers]

        for loc in (decode, extend, extend[:1]):
            one = _layers_with_sidecars(L, S, H, D, dtype, device, gen)
            fused, ref = copy(one), copy(one)
            for k, side in one:
                ST.store_sidecar_triton(k, loc, *side, 16)
            ST.store_sidecar_layers_triton(ST.LayerAddresses(fused), loc, 16)
            for lid, ((_, a), (_, b)) in enumerate(zip(one, fused)):
                for x, y in zip(a, b):
                    assert torch.equal(x, y), f"layer {lid} of {L}, n={loc.numel()}, seed {seed}"
            ST.store_sidecar_layers_ref(ref, loc, 16)  # the reference writes the same bounds
            for (_, a), (_, b) in zip(fused, ref):
                for i in (3, 4, 5):
                    assert torch.equal(a[i], b[i]), f"bounds, seed {seed}"


def test_layer_addresses_refuse_layers_that_differ():
    gen = torch.Generator().manual_seed(0)
    a = _layers_with_sidecars(1, 64, 2, 64, torch.bfloat16, "cpu", gen)
    b = _layers_with_sidecars(1, 64, 2, 64, torch.float16, "cpu", gen)
    c = _layers_with_sidecars(1, 128, 2, 64, torch.bfloat16, "cpu", gen)
    for other in (b, c):
        with pytest.raises(ValueError, match="differ"):
            ST.LayerAddresses(a + other)
    with pytest.raises(ValueError, match="no layers"):
        ST.LayerAddresses([])
    table = ST.LayerAddresses(a + a).table
    assert table.shape == (2, 7) and int(table[0, 0]) == a[0][0].data_ptr()


def test_select_matches_reference(device):
    cases = _shapes(device)
    # one and two pages of budget: the forced first and last pages compete
    cases += [(cases[0][0], *cases[0][1:5], b) for b in (16, 32)]
    for seq, H, G, D, dtype, budget in cases:
        lay = make_layout(seq, H, G, D, dtype=dtype, device=device, backend="triton")
        args = (lay.q, lay.kmax, lay.kmin, lay.kbscale, lay.req_to_token, lay.req_pool_indices,
                lay.seq_lens, budget, 16)
        c1, n1 = ops.quest_select(*args, backend="torch")
        pt, n_pages = S.page_table_ref(lay.req_to_token, lay.req_pool_indices, lay.seq_lens, 16)
        scores = S.quest_page_scores_ref(lay.q, lay.kmax, lay.kmin, lay.kbscale, pt, n_pages)
        # the longest context the call may see: just above this batch's, and a server's
        # 128k-token one (every row then chosen in a block of its own size, select_tiers)
        for max_pages in (max(seq) // 16 + 3, 8192):
            c2, n2 = ops.quest_select(*args, backend="triton", max_pages=max_pages)
            _assert_same_pages(c1, n1, c2, n2, scores, pt, len(seq), H)


def _assert_same_pages(c1, n1, c2, n2, scores, pt, R, H):
    """Candidate pages of the kernel (c2, n2) against the reference (c1, n1)."""
    assert torch.equal(n1, n2)
    for r in range(R):
        for h in range(H):
            n = int(n1[r, h])
            if torch.equal(c1[r, h, :n], c2[r, h, :n]):
                continue
            # only a near-tie at the K-th page may differ: the kernel's tensor-core dots sum
            # in another order than the reference
            swapped = set((c1[r, h, :n] // 16).tolist()) ^ set((c2[r, h, :n] // 16).tolist())
            s = torch.stack([scores[r, h][pt[r] == pg][0] for pg in swapped])
            tol = 1e-4 * (1 + float(s.abs().max()))
            assert len(swapped) == 2 and float(s.max() - s.min()) <= tol, (r, h, s)


def _near_ties_only(rows, differing, worst):
    """The kept sets' tolerance against the reference: at most one row in 50 (at least one)
    differs, by at most two entries (near-ties in the estimate, fp32 summation order)."""
    return differing <= max(1, rows // 50) and worst <= 2


def _assert_same_kept(k1, n1, k2, n2):
    """Identical kept sets, except near-ties in the estimate (fp32 summation order)."""
    rows, differing, worst = U.kept_set_differences(k1, n1, k2, n2)
    assert _near_ties_only(rows, differing, worst), (rows, differing, worst)


# Top-p's decision at the boundary rests on fp32 rounding: two entries one ulp apart in the score
# may swap places under another exp (the interpreter's is numpy's, the GPU's ex2.approx), and a
# cumulative mass within rounding of p may keep one entry more or less. Only such entries may
# differ from the reference.
# an entry's probability, relative: the GPU's exp is ex2.approx of (s - max) * log2(e) rounded
# to fp32, up to about 5e-7 off an entry, so two entries 1e-6 apart may swap
TIE_REL = 1e-5
TIE_MASS = 1e-5  # the cumulative mass against p (fp32 sums of up to 32k terms)


def _topp_certain(scores, p):
    """Per q head of ``scores`` ([heads, C]): (kept whatever the rounding, dropped whatever the
    rounding), by top-p at ``p`` with ties kept. An entry is kept for sure when the mass of the
    others that could rank above it (probability above its own less TIE_REL) is under p by more
    than TIE_MASS, dropped for sure when the mass ranked above it by more than TIE_REL already
    reaches p by more than TIE_MASS; every other entry sits at a tie."""
    q = torch.softmax(scores.double().cpu(), -1)
    asc, _ = q.sort(-1)
    prefix = torch.nn.functional.pad(asc.cumsum(-1), (1, 0))

    def mass_above(x):  # per head: the mass of the entries with probability > x
        return prefix[:, -1:] - prefix.gather(-1, torch.searchsorted(asc, x, right=True))

    kept = mass_above(q * (1 - TIE_REL)) - q < p - TIE_MASS
    dropped = mass_above(q * (1 + TIE_REL)) >= p + TIE_MASS
    return kept, dropped


def _assert_kept_up_to_ties(got, scores, p, what):
    """``got`` (a set of indices) is the union over the q heads of ``scores`` ([G, C]) of their
    top-p sets at ``p``, plus the newest entry (C - 1), except at ties (``_topp_certain``): an
    entry some head keeps for sure must be in, one every head drops for sure must be out."""
    kept, dropped = _topp_certain(scores, p)
    C = scores.shape[-1]
    must = set(kept.any(0).nonzero().view(-1).tolist()) | {C - 1}
    never = set(dropped.all(0).nonzero().view(-1).tolist()) - {C - 1}
    assert must <= got and not (never & got), (
        what, sorted(must - got)[:8], sorted(never & got)[:8], len(got), len(must), C - len(never))


def test_prune_matches_reference(device):
    for seq, H, G, D, dtype, budget in _shapes(device):
        lay = make_layout(seq, H, G, D, dtype=dtype, device=device, peaked=6.0, backend="triton")
        sm = 1 / math.sqrt(D)
        cand, cnt = ops.quest_select(lay.q, lay.kmax, lay.kmin, lay.kbscale, lay.req_to_token,
                                     lay.req_pool_indices, lay.seq_lens, budget, 16, backend="torch")
        s1 = ops.int4_scores(lay.q, lay.kq, lay.kscale, lay.kzero, cand, cnt, sm, backend="torch")
        s2 = ops.int4_scores(lay.q, lay.kq, lay.kscale, lay.kzero, cand, cnt, sm, backend="triton")
        valid = torch.isfinite(s1)
        torch.testing.assert_close(s2[valid], s1[valid], atol=1e-4, rtol=1e-5)
        for p in (0.5, 0.9, 0.95, 1.0):
            pr = torch.full((len(seq),), p, device=device)
            pr[0] = 0.9  # per-row p
            for lo_b, hi_b in ((1, 0), (8, 40)):
                k1, n1 = ops.twilight_prune(lay.q, lay.kq, lay.kscale, lay.kzero, cand, cnt, pr,
                                            sm, lo_b, hi_b, backend="torch")
                k2, n2 = ops.twilight_prune(lay.q, lay.kq, lay.kscale, lay.kzero, cand, cnt, pr,
                                            sm, lo_b, hi_b, backend="triton")
                _assert_same_kept(k1, n1, k2, n2)
                if p == 1.0:
                    assert torch.equal(n2[1:], cnt[1:])


def test_estimate_partials_match_reference(device, shapes):
    """The estimate's per-program partials (max, sum of exp per q head; the top-p kernel starts
    from them) equal the torch reference over the scores it wrote, for every program that has
    candidates, whichever launch shape it takes; several programs a row in some case (the
    last GPU case always; a random one may be too short), on the CPU too."""
    if device == "cpu":
        shapes(estimate=dict(BLOCK_N=16, ITERS=2, STAGES=2),
               estimate_wide=dict(BLOCK_N=16, ITERS=1, STAGES=2))
    several = False
    for seq, H, G, D, dtype, budget in _shapes(device):
        lay = make_layout(seq, H, G, D, dtype=dtype, device=device, peaked=6.0, backend="triton")
        sm = 1 / math.sqrt(D)
        pages, cnt = S.quest_select_pages_triton(
            lay.q, lay.kmax, lay.kmin, lay.kbscale, lay.req_to_token, lay.req_pool_indices,
            lay.seq_lens, budget, 16)
        R, C = len(seq), pages.shape[-1] * 16
        width = E.score_parts_width(C)
        parts = torch.full((R, H, G, 2, width), float("nan"), device=device)
        s = E.int4_scores_triton(lay.q, lay.kq, lay.kscale, lay.kzero, pages, cnt, sm, page_size=16,
                                 parts=parts)
        span = E.estimate_span(R * H)
        ref = E.score_parts_ref(s, cnt, span, width)
        used = torch.arange(width, device=device) < (-(-cnt.long() // span))[:, :, None, None]
        several |= int(used.sum()) > R * H
        used = used.expand(R, H, G, width)
        assert torch.equal(parts[:, :, :, 0][used], ref[:, :, :, 0][used])  # the max is exact
        torch.testing.assert_close(parts[:, :, :, 1][used], ref[:, :, :, 1][used], rtol=2e-5,
                                   atol=0)
        if -(-C // span) > 1:  # too few partials a head: refused, nothing written
            with pytest.raises(ValueError, match="score partials"):
                E.int4_scores_triton(lay.q, lay.kq, lay.kscale, lay.kzero, pages, cnt, sm,
                                     page_size=16, parts=torch.empty(R, H, G, 2, 1, device=device))
    assert several  # several programs a row somewhere


def test_attend_matches_reference(device):
    for seq, H, G, D, dtype, budget in _shapes(device):
        lay = make_layout(seq, H, G, D, dtype=dtype, device=device, backend="triton")
        sm = 1 / math.sqrt(D)
        cand, cnt = ops.quest_select(lay.q, lay.kmax, lay.kmin, lay.kbscale, lay.req_to_token,
                                     lay.req_pool_indices, lay.seq_lens, budget, 16, backend="torch")
        o1 = ops.sparse_decode_attention(lay.q, lay.k_buffer, lay.v_buffer, cand, cnt, sm,
                                         backend="torch")
        o2 = ops.sparse_decode_attention(lay.q, lay.k_buffer, lay.v_buffer, cand, cnt, sm,
                                         backend="triton")
        torch.testing.assert_close(o2.float(), o1.float(), atol=1e-2, rtol=1e-2)


def test_decode_p1_full_budget_equals_dense(device):
    for seq, H, G, D, dtype, _ in _shapes(device):
        if device == "cuda" and len(seq) > 8:
            seq = seq[:8]
        lay = make_layout(seq, H, G, D, dtype=dtype, device=device, backend="triton")
        sm = 1 / math.sqrt(D)
        for quest_only in (False, True):  # p = 1 through the prune; Quest alone (no prune)
            o, kc = ops.twilight_decode(lay.q, lay.k_buffer, lay.v_buffer, lay.sidecar,
                                        lay.req_to_token, lay.req_pool_indices, lay.seq_lens, 1.0,
                                        budget=max(seq), page_size=16, sm_scale=sm,
                                        quest_only=quest_only, backend="triton")
            assert kc.tolist() == [[n] * H for n in seq]
            torch.testing.assert_close(o.float(), lay.dense(sm), atol=2e-2, rtol=2e-2)


def test_decode_row_groups_equal_one_group(device):
    """A step split into row groups (on CUDA, one stream each; 3 groups of 2, 2, 1 requests on
    the CPU) keeps exactly the sets of the one-group step, for Twilight and for Quest alone; the
    output differs only by the attend's split count (its rounding)."""
    H, G, D = 2, 4, 64
    groups = 3
    seq = [40, 700, 300, 64, 333] if device == "cpu" else [40, 30000, 9000, 64, 100, 20000, 777]
    budget = 128 if device == "cpu" else 512
    lay = make_layout(seq, H, G, D, device=device, peaked=8.0, backend="triton")
    sm = 1 / math.sqrt(D)
    R = len(seq)
    p = torch.rand(R, device=device) * 0.5 + 0.5
    results = {}
    for n in (1, groups):
        with launch.override(decode_groups=dict(min_requests=2, groups=n, keep_all_groups=n)):
            ws = ops.DecodeWorkspace.allocate(R, H, G, D, budget, 16, max(seq), device)
            assert len(ws.streams) == (n if device == "cuda" and n > 1 else 0)  # one spare
            for quest_only in (False, True):
                o, kc = ops.twilight_decode(lay.q, lay.k_buffer, lay.v_buffer, lay.sidecar,
                                            lay.req_to_token, lay.req_pool_indices, lay.seq_lens,
                                            p, budget=budget, page_size=16, sm_scale=sm,
                                            min_sparse_len=128, quest_only=quest_only,
                                            backend="triton", workspace=ws)
                if device == "cuda":
                    torch.cuda.synchronize()
                kept = ws.cand_pages if quest_only else ws.kept_slots
                results[n, quest_only] = (o.float().clone(), kc.clone(), kept[:R].clone())
    for quest_alone in (False, True):
        o1, k1, s1 = results[1, quest_alone]
        o2, k2, s2 = results[groups, quest_alone]
        assert torch.equal(k1, k2)
        assert torch.equal(s1, s2)
        torch.testing.assert_close(o2, o1, atol=1e-2, rtol=1e-2)


def test_decode_mixed_batch_short_rows_dense(device):
    H, G, D = 2, 4, 64
    seq = [40, 700, 1200, 64] if device == "cpu" else [40, 30000, 9000, 64, 100]
    lay = make_layout(seq, H, G, D, device=device, peaked=8.0, backend="triton")
    sm = 1 / math.sqrt(D)
    o, kc = ops.twilight_decode(lay.q, lay.k_buffer, lay.v_buffer, lay.sidecar, lay.req_to_token,
                                lay.req_pool_indices, lay.seq_lens, 0.9, budget=512, page_size=16,
                                sm_scale=sm, min_sparse_len=128, backend="triton")
    dense = lay.dense(sm)
    for r, n in enumerate(seq):
        if n < 128:
            assert kc[r].tolist() == [n] * H
            torch.testing.assert_close(o[r].float(), dense[r], atol=2e-2, rtol=2e-2)
        else:
            assert bool((kc[r] < 512).all())


def _bulk_and_ledge(gen, C, n_bulk, n_ledge, times_floor):
    """A score row of C: ``n_bulk`` logits (N(0, 0.3^2)) carry the mass, ``n_ledge`` more sit at
    ``times_floor`` times the droppable floor of p = 0.95 (each with probability
    times_floor * 0.05 / C, jittered by 1e-3 so that none tie), the rest far under it; random
    places."""
    bulk = torch.randn(n_bulk, generator=gen, dtype=torch.float64) * 0.3
    a = times_floor * 0.05 / C  # the probability of each ledge entry
    logit = math.log(a * bulk.exp().sum() / (1 - a * n_ledge))
    row = torch.full((C,), -40.0, dtype=torch.float64)
    order = torch.randperm(C, generator=gen)
    row[order[:n_bulk]] = bulk
    row[order[n_bulk: n_bulk + n_ledge]] = logit + torch.rand(n_ledge, generator=gen,
                                                              dtype=torch.float64) * 1e-3
    return row.float()


@pytest.mark.parametrize("raise_floor", [0, 2], ids=["floor", "raised-4x"])
@pytest.mark.parametrize("from_parts", [False, True], ids=["row-pass", "partials"])
@pytest.mark.parametrize("overflow_per_kv", [True, False], ids=["overflow-per-kv", "overflow-per-q"])
def test_topp_compaction_tiers_match_reference(device, monkeypatch, shapes, overflow_per_kv,
                                               from_parts, raise_floor):
    """The top-p kernel searches the entries above the droppable floor compacted in a register
    block of SMALL or MID values; a head with more first raises its floor and compacts again,
    and one still over MID is flagged and searched by the overflow kernel, its whole row in
    registers: q heads with peaked, medium, flat and heavy rows take these paths; each must keep
    the reference's set, alone (one q head per KV head) and in a group whose heads take
    different paths. The overflow kernel runs a program per KV head or per q head. The max and
    sum of each head come from a pass over its row or from the estimate's partials (here from
    their reference, blocks of C / 4)."""
    shapes(overflow_per_kv=overflow_per_kv)
    C = 8192
    if device == "cpu":  # small rows, several chunks each
        C = 256
        shapes(topp=dict(CHUNK=64, SMALL=32, MID=128, STAGES=2, num_warps=4))
        # room for 4 partials a row (score_parts_width follows the estimate's launch shape)
        shapes(estimate=dict(BLOCK_N=16, ITERS=2))
    # RAISE 2: compacted first above 4x the floor, checked in the same pass (safe here for every
    # row, so the heavy one no longer needs _topp_refloor: RAISE 0 keeps that path tested)
    shapes(topp=dict(RAISE=raise_floor))
    width = T.topp_scratch_width(C)
    assert width == C // 2
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    launch = T._topp_launch(C)
    small, mid = launch["SMALL"], launch["MID"]
    # medium: (SMALL + MID) / 2 random logits carry the mass, the rest sit e^-20 below (under
    # the floor), so that head takes the middle path whatever the draw
    n_mid = (small + mid) // 2
    medium = torch.randn(C, generator=gen) * 0.5
    medium[torch.randperm(C, generator=gen)[n_mid:]] -= 20.0
    # heavy: 3/4 MID logits carry the mass, 3/4 MID more sit at 1.5x the floor of p = 0.95 (a
    # sliver of the mass), the rest under it: over MID entries above the floor, under MID above
    # twice it, so that head takes the raised floor (_topp_refloor)
    heavy = _bulk_and_ledge(gen, C, 3 * mid // 4, 3 * mid // 4, 1.5)
    rows = [torch.randn(C, generator=gen) * 12.0, medium,  # peaked, medium,
            torch.randn(C, generator=gen) * 0.01, heavy]  # flat, heavy
    flagged = []  # the heads left to the overflow kernel, seen as it is launched
    overflow = T._topp_overflow_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                flagged.append((args[3] < 0).nonzero().view(-1).tolist())  # lo, before it
                return overflow[grid](*args, **kw)
            return launch

    monkeypatch.setattr(T, "_topp_overflow_kernel", Spy())
    scores = torch.stack(rows).to(device)
    probs = torch.softmax(scores.float(), -1)
    for p in (0.5, 0.9, 0.95):
        floor = (1 - p) / C
        surv = (probs >= floor * 0.999).sum(-1).view(-1).tolist()
        assert mid == width
        assert surv[0] <= small and surv[2] > mid, (seed, surv)  # the tiers are exercised
        assert p < 0.9 or small < surv[1] <= mid, (seed, surv)
        if p == 0.95:  # over MID above the floor, at most MID above twice it
            assert surv[3] > mid >= int((probs[3] >= 2 * floor).sum()), (seed, surv)
        for H, G in ((1, 4), (4, 1)):
            s = scores.view(1, H, G, C)
            cand = torch.arange(C, dtype=torch.int32, device=device).expand(1, H, C).contiguous()
            cnt = torch.full((1, H), C, dtype=torch.int32, device=device)
            k1, n1 = PR.prune_from_scores_ref(s.clone(), cand, cnt, p, 1, 0)
            kw = {}
            if from_parts:
                kw = dict(parts=E.score_parts_ref(s, cnt, C // 4, E.score_parts_width(C)),
                          parts_span=C // 4)
            k2, n2 = PR.prune_from_scores_triton(s.clone(), cand, cnt, p, 1, 0, **kw)
            if p == 0.95:  # row i is head i: the flat one flagged, the heavy one not
                assert 2 in flagged[-1] and 3 not in flagged[-1], (seed, flagged[-1])
            for h in range(H):
                for k, n in ((k1, n1), (k2, n2)):  # the reference and the kernel
                    got = set(k[0, h, : int(n[0, h])].tolist())
                    _assert_kept_up_to_ties(got, s[0, h], p, (seed, p, surv, H, h))


def test_topp_raised_floor_falls_back(device, shapes):
    """The optimistic 4x floor (launch entry ``topp``, RAISE 2) when it is not safe: a 'ledge' of
    entries between the floor and 4x it holds more mass than top-p may drop, so the kernel compacts
    again above the floor itself; where it is safe (a medium and a peaked row) it keeps the
    4x floor. Every head keeps the reference's set, alone and in a group."""
    C = 8192
    if device == "cpu":
        C = 256
        shapes(topp=dict(CHUNK=64, SMALL=32, MID=128, STAGES=2, num_warps=4))
    shapes(topp=dict(RAISE=2))
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)

    # ledge: 0.36 C entries at 3x the floor of p = 0.95 (together ~0.054 of the mass) beside
    # C / 10 that carry the rest: 0.46 C above the floor, <= MID (C / 2)
    ledge = lambda: _bulk_and_ledge(gen, C, C // 10, int(C * 0.36), 3.0)
    medium = torch.randn(C, generator=gen) * 0.5
    medium[torch.randperm(C, generator=gen)[C // 4:]] -= 20.0
    scores = torch.stack([ledge(), ledge(), medium,
                          torch.randn(C, generator=gen) * 12.0]).to(device)
    probs = torch.softmax(scores.double(), -1)
    for p in (0.9, 0.95):
        f0 = (1 - p) / C * 0.999
        under = torch.where(probs < 4 * f0, probs, 0.0).sum(-1)
        if p == 0.95:  # the ledge rows need the fallback, the others do not
            assert bool((under[:2] > (1 - p) * 0.999).all()), (seed, under)
        assert bool((under[2:] <= (1 - p) * 0.999).all()), (seed, under)
        for H, G in ((1, 4), (4, 1)):
            s = scores.view(1, H, G, C)
            cand = torch.arange(C, dtype=torch.int32, device=device).expand(1, H, C).contiguous()
            cnt = torch.full((1, H), C, dtype=torch.int32, device=device)
            k1, n1 = PR.prune_from_scores_ref(s.clone(), cand, cnt, p, 1, 0)
            k2, n2 = PR.prune_from_scores_triton(s.clone(), cand, cnt, p, 1, 0)
            for h in range(H):
                for k, n in ((k1, n1), (k2, n2)):  # the reference and the kernel
                    got = set(k[0, h, : int(n[0, h])].tolist())
                    _assert_kept_up_to_ties(got, s[0, h], p, (seed, p, H, h))


import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from sglang_twilight.kernels.estimate import _unpack_nibbles  # noqa: E402
from sglang_twilight.kernels.topp import _topk_mask  # noqa: E402


@triton.jit
def _topk_probe(key_ptr, out_ptr, n, k, N: tl.constexpr):
    i = tl.arange(0, N)
    valid = i < n
    key = tl.load(key_ptr + i, mask=valid, other=0)
    tl.store(out_ptr + i, _topk_mask(key, valid, k, n).to(tl.int32), mask=valid)


def test_topk_mask_extreme_keys(device):
    """The threshold search behind every top-K / top-p: exact on int32 keys at both ends of the
    range (the forced pages' key is the largest int32), with duplicates and narrow ranges."""
    rng = random.Random()
    big, small = 2**31 - 1, -(2**31) + 1
    pools = [[big, big - 1, small, 0, -1, 1], [5, 6, 7], list(range(-3, 4)), None]
    for trial in range(24 if device == "cpu" else 200):
        n = rng.choice([1, 2, 5, 64, 300])
        pool = pools[trial % 4]
        keys = [rng.choice(pool) if pool else rng.randint(small, big) for _ in range(n)]
        k = rng.randint(1, n + 2)
        kt = torch.tensor(keys, dtype=torch.int32, device=device)
        out = torch.zeros(n, dtype=torch.int32, device=device)
        _topk_probe[(1,)](kt, out, n, k, N=512, num_warps=4)
        order = sorted(range(n), key=lambda j: (-keys[j], j))  # ties -> lower index
        want = [0] * n
        for j in order[:k]:
            want[j] = 1
        assert out.tolist() == want, (keys, k)



def _hard_logits(gen, C):
    """Score rows on which an interpolated threshold search is at its weakest (their weights:
    uniform, geometric, one spike over noise, four tied values, a power law, two levels)."""
    u = lambda: torch.rand(C, generator=gen, dtype=torch.float64).clamp_min(1e-30)
    spike = (u() * 1e-4).log()
    spike[int(torch.randint(C, (1,), generator=gen))] = 0.0
    two = torch.where(u() < 0.02, 0.0, math.log(1e-3)) + 1e-3 * u()
    rows = [u().log(), torch.arange(C, dtype=torch.float64) * math.log(0.9), spike,
            torch.randint(1, 5, (C,), generator=gen).double().log(), 8 * u().log(), two]
    return torch.stack(rows).float()


def test_search_hard_rows_match_reference(device, shapes):
    """The threshold search interpolates its probes (``topp._threshold_search``); on rows
    hard for that, the top-p kernel (alone and in a GQA group) and ``_topk_mask`` keep the
    reference's sets (``topp.threshold_search_ref`` counts the steps on such rows)."""
    C = 2048
    if device == "cpu":
        C = 256
        shapes(topp=dict(CHUNK=64, SMALL=32, MID=128, STAGES=2, num_warps=4))
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    scores = _hard_logits(gen, C).to(device)
    for p in (0.5, 0.9, 0.95):
        for H, G in ((6, 1), (2, 3)):
            s = scores.view(1, H, G, C)
            cand = torch.arange(C, dtype=torch.int32, device=device).expand(1, H, C).contiguous()
            cnt = torch.full((1, H), C, dtype=torch.int32, device=device)
            k2, n2 = PR.prune_from_scores_triton(s.clone(), cand, cnt, p, 1, 0)
            for h in range(H):
                got = set(k2[0, h, : int(n2[0, h])].tolist())
                _assert_kept_up_to_ties(got, s[0, h], p, (seed, p, H, h))
    keys = T.f32_key_ref(scores)
    for row, key in enumerate(keys):
        for k in (1, C // 4, C - 1):
            out = torch.zeros(C, dtype=torch.int32, device=device)
            _topk_probe[(1,)](key.contiguous(), out, C, k, N=C, num_warps=4)
            order = sorted(range(C), key=lambda j: (-int(key[j]), j))  # ties -> lower index
            want = torch.zeros(C, dtype=torch.int32)
            want[order[:k]] = 1
            assert torch.equal(out.cpu(), want), (seed, row, k)


def test_threshold_search_ref_ends_on_sorted_threshold():
    """``threshold_search_ref`` (the kernel's steps replayed in torch, which the search study
    counts) ends on the largest key whose mass reaches the target, in key and value space, with
    forced keys at the top, within three times the bisection's worst case (the range halves at
    least once every three steps)."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    w = torch.softmax(_hard_logits(gen, 512).double(), -1).float()
    w = torch.cat([w, torch.rand(10, 512, generator=gen)])
    present = torch.rand(w.shape, generator=gen) < 0.8
    present[:, 0] = True
    for value_space in (True, False):
        key = w.view(torch.int32).long()
        # mass in float64 (the kernel's is fp32): no target lands on a rounding edge
        val = w.double() if value_space else torch.ones_like(w, dtype=torch.int32)
        if not value_space:
            key[:, :2] = 2**31 - 1  # forced: the largest key
        tot = torch.where(present, val, 0).sum(1)
        for frac in (0.5, 0.95) if value_space else (0.5, 0.95, 1.0):
            target = frac * tot if value_space else (frac * tot).ceil().long()
            t, steps = T.threshold_search_ref(key, val, present, target, tot, value_space)
            want = T.threshold_sorted_ref(key, present, val, target)
            assert torch.equal(t, want), (seed, value_space, frac)
            assert int(steps.max()) <= 3 * 32 + 3, (seed, value_space, frac)

@pytest.mark.gpu
@pytest.mark.parametrize("H,G,D", [(3, 3, 64), (8, 4, 128)])
def test_decode_p1_as_accurate_as_flashinfer(H, G, D):
    """At p = 1 with every token kept, the sparse decode is as close to fp32 attention as
    FlashInfer's dense decode is (SmolLM2 and Llama-8B head shapes, logits of real spread)."""
    if not torch.cuda.is_available() or INTERP:
        pytest.skip("needs CUDA and the compiled kernels")
    import flashinfer

    seq = [41, 700, 2000, 5000, 7600]
    lay = make_layout(seq, H, G, D, device="cuda", peaked=4.0, backend="triton")
    lay.q.mul_(3.0)  # sharper attention, as in trained models
    sm = 1 / math.sqrt(D)
    ref = lay.dense(sm)
    ours, _ = ops.twilight_decode(lay.q, lay.k_buffer, lay.v_buffer, lay.sidecar,
                                  lay.req_to_token, lay.req_pool_indices, lay.seq_lens,
                                  torch.ones(len(seq), device="cuda"), budget=max(seq),
                                  page_size=16, sm_scale=sm, min_budget=1, backend="triton")
    rows = lay.req_to_token[lay.req_pool_indices.long()]
    pages = [rows[r, : -(-n // 16) * 16: 16] // 16 for r, n in enumerate(seq)]
    indptr = torch.tensor([0] + [len(p) for p in pages], device="cuda").cumsum(0).to(torch.int32)
    last = torch.tensor([(n - 1) % 16 + 1 for n in seq], dtype=torch.int32, device="cuda")
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        torch.zeros(128 << 20, dtype=torch.uint8, device="cuda"), "NHD", use_tensor_cores=True)
    w.plan(indptr, torch.cat(pages).to(torch.int32), last, H * G, H, D, 16,
           q_data_type=lay.q.dtype, kv_data_type=lay.k_buffer.dtype, sm_scale=sm)
    fi = w.run(lay.q, (lay.k_buffer.view(-1, 16, H, D), lay.v_buffer.view(-1, 16, H, D)))
    e_ours = (ours.float() - ref).abs()
    e_fi = (fi.float() - ref).abs()
    print(f"H={H} G={G} D={D}: max |err| ours {e_ours.max():.2e} flashinfer {e_fi.max():.2e}; "
          f"mean ours {e_ours.mean():.2e} flashinfer {e_fi.mean():.2e}")
    assert float(e_ours.mean()) <= 1.25 * float(e_fi.mean()) + 1e-5
    assert float(e_ours.max()) <= 2.0 * float(e_fi.max()) + 1e-3


@triton.jit
def _unpack_probe(src_ptr, lo_ptr, hi_ptr, N: tl.constexpr, IS_BF16: tl.constexpr):
    # [N/4, 4]: the four bytes of a 32-bit register in one thread, as in the estimate's tile
    i = tl.arange(0, N // 4)[:, None] * 4 + tl.arange(0, 4)[None, :]
    b = tl.load(src_ptr + i)
    lo, hi = _unpack_nibbles(b, tl.bfloat16 if IS_BF16 else tl.float16)
    tl.store(lo_ptr + i, lo)
    tl.store(hi_ptr + i, hi)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unpack_nibbles_exact(dtype):
    """The estimate's inline-asm unpack: every byte value, in shuffled order (so each lane of the
    packed registers sees every value), gives exactly 8 + v/2 of its low and high nibble, in the
    lane order k0, k2, k1, k3 of each register's four bytes (``_unpack_order``, which the
    estimate loads q in)."""
    if not torch.cuda.is_available() or INTERP:
        pytest.skip("inline PTX needs the compiled CUDA kernels")
    src = torch.arange(256, dtype=torch.uint8).repeat(8)[torch.randperm(2048)].cuda()
    lo = torch.empty(2048, dtype=dtype, device="cuda")
    hi = torch.empty_like(lo)
    _unpack_probe[(1,)](src, lo, hi, N=2048, IS_BF16=dtype == torch.bfloat16, num_warps=4)
    order = torch.arange(2048, device="cuda")
    order = (order & ~3) | ((order & 1) << 1) | ((order >> 1) & 1)  # _unpack_order
    assert torch.equal(lo.float(), 8 + (src[order] & 15).float() / 2)
    assert torch.equal(hi.float(), 8 + (src[order] >> 4).float() / 2)


@pytest.mark.gpu
def test_prune_benchmark_8k64_returns():
    """The benchmark's 8k x 64 inputs, every request pruned in one call (the wide estimate and
    top-p shapes) - the case that hung until the top-p kernel was compiled without multiply-add
    contraction (``topp._topp_launch``): it returns, in a child process with a time limit, and
    keeps the reference's sets on the same scores (except near-ties)."""
    if not torch.cuda.is_available() or INTERP:
        pytest.skip("a GPU-only hang: needs CUDA and the compiled kernels")
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-c",
           "from tests.test_kernels import _prune_8k64_child; _prune_8k64_child(timeout=60)"]
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")  # a stack dump then names the kernel
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=root, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("the 8k x 64 prune did not return (and its process did not exit)")
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "union done" in out, out[-3000:]
    check = [ln for ln in out.splitlines() if "check:" in ln][-1]
    rows, differing, worst = (int(x) for x in
                              re.search(r"(\d+) of (\d+) .* at most (\d+)", check).group(2, 1, 3))
    assert _near_ties_only(rows, differing, worst), check


def _prune_8k64_child(timeout, batch=64, context=8192, budget=8192, top_p=0.95):
    """``test_prune_benchmark_8k64_returns``' child process: the benchmark's inputs
    (``benchmarks/workload.py``), the candidates chosen, the estimate, then top-p, overflow and
    union of every request in one call, limited to ``timeout`` seconds after their kernels were
    compiled (a stack dump and exit otherwise); then the kept sets against the torch reference
    on the same scores, printed as ``check: <differing> of <rows> ... at most <entries>``."""
    import faulthandler
    import time

    from benchmarks.workload import PAGE, make_inputs

    faulthandler.dump_traceback_later(300, exit=True)  # inputs and compiles
    t0 = time.time()
    log = lambda msg: print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)  # noqa: E731
    H, G, D = 8, 4, 128
    inp = make_inputs(batch, context, H, G, D, torch.bfloat16, "cuda")
    sm = 1 / math.sqrt(D)
    pr = torch.full((batch,), top_p, dtype=torch.float32, device="cuda")
    cand, cnt = S.quest_select_pages_triton(
        inp["q"], inp["kmax"], inp["kmin"], inp["kbs"], inp["r2t"], inp["rpi"], inp["seq"],
        budget, PAGE, max_pages=context // PAGE)
    C = cand.shape[-1] * PAGE
    parts = torch.empty(batch, H, G, 2, E.score_parts_width(C), dtype=torch.float32,
                        device="cuda")
    scores = E.int4_scores_triton(inp["q"], inp["kq"], inp["ks"], inp["kz"], cand, cnt, sm,
                                  page_size=PAGE, parts=parts)
    torch.cuda.synchronize()
    log("estimate done")
    span = E.estimate_span(batch * H)

    def prune(a, b, p):  # top-p, overflow and union on requests [a, b)
        return PR.prune_from_scores_triton(scores[a:b], cand[a:b], cnt[a:b], p, 1, 0,
                                           page_size=PAGE, step_heads=batch * H * G,
                                           parts=parts[a:b], parts_span=span)

    # the prune's kernels compiled first, on one request with p = 1 (the top-p kernel only
    # stores, the union keeps every candidate): the time limit below is the prune's own
    prune(0, 1, torch.ones_like(pr[:1]))
    torch.cuda.synchronize()
    faulthandler.dump_traceback_later(timeout, exit=True)
    log("prune launched")
    kept, kcnt = prune(0, batch, pr)
    torch.cuda.synchronize()
    log(f"top-p, overflow and union done: mean kept {kcnt.float().mean().item():.1f}")
    faulthandler.cancel_dump_traceback_later()
    slots = (cand.long()[..., None] * PAGE + torch.arange(PAGE, device="cuda")).flatten(2)
    live = torch.arange(scores.shape[-1], device="cuda") < cnt.long()[..., None, None]
    rk, rn = PR.prune_from_scores_ref(torch.where(live, scores, float("-inf")), slots, cnt, pr,
                                      1, 0)
    rows, differing, worst = U.kept_set_differences(kept, kcnt, rk, rn)
    log(f"check: {differing} of {rows} (request, KV head) rows differ from the reference, "
        f"at most {worst} entries")
