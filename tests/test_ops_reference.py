"""The plain-torch reference pipeline held against each stage's definition (CPU)."""

import math

import pytest
import torch

from sglang_twilight import ops
from sglang_twilight.kernels import attend as A
from sglang_twilight.kernels import launch
from sglang_twilight.kernels import select as SEL
from sglang_twilight.kernels import store as ST
from tests.pools import make_layout


def topp_by_sort(probs, p):
    """The definition: sort descending, cumulative sum, smallest prefix reaching p."""
    srt, order = probs.sort(-1, descending=True)
    cs = srt.cumsum(-1)
    n = (cs < p[:, None]).sum(-1) + 1
    n = n.clamp_max(probs.shape[-1])
    mask = torch.zeros_like(probs, dtype=torch.bool)
    ranks = torch.arange(probs.shape[-1])[None, :]
    mask.scatter_(-1, order, ranks < n[:, None])
    return mask, srt, cs, n


# ---------------------------------------------------------------- int4

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
def test_int4_round_trip_within_half_step(dtype, D):
    k = (torch.randn(7, 5, D) * torch.rand(7, 5, 1) * 8 + torch.randn(7, 5, 1)).to(dtype)
    packed, scale, zero = ops.quantize_int4(k)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 5, D // 2)
    assert scale.dtype == torch.float16 and scale.shape == (7, 5) and zero.shape == (7, 5)
    back = ops.dequantize_int4(packed, scale, zero)
    err = (back - k.float()).abs()
    half = scale.float()[..., None] / 2
    assert bool((err <= half * (1 + 1e-5) + 1e-6).all()), (err - half).max()
    # every code is used at the ends of the range: min maps to 0, max to 15
    codes = torch.stack((packed & 15, packed >> 4), -1).flatten(-2)
    assert int(codes.min()) == 0 and int(codes.max()) == 15


def test_int4_constant_row_exact():
    k = torch.full((2, 3, 64), 0.75)
    packed, scale, zero = ops.quantize_int4(k)
    assert bool((scale == 0).all())
    assert torch.equal(ops.dequantize_int4(packed, scale, zero), k)


# ---------------------------------------------------------------- top-p

@pytest.mark.parametrize("n", [1, 7, 100, 2049])
def test_topp_matches_sort_definition(n):
    rows = 64
    temp = torch.rand(rows, 1) * 6
    probs = torch.softmax(torch.randn(rows, n) * temp, -1)
    p = torch.rand(rows) * 0.98 + 0.01
    got = ops.topp_mask(probs, p)
    want, srt, cs, cnt = topp_by_sort(probs, p)
    for r in range(rows):
        if torch.equal(got[r], want[r]):
            continue
        k = int(cnt[r])
        # ties at the threshold are all kept (docs/OPS.md): the sort's set plus every entry
        # equal to its smallest kept value
        if torch.equal(got[r], probs[r] >= srt[r, k - 1]):
            continue
        # else only where float summation order decides: cumsum within 1e-5 of p
        near = (abs(float(cs[r, k - 1]) - float(p[r])) < 1e-5
                or (k >= 2 and abs(float(cs[r, k - 2]) - float(p[r])) < 1e-5))
        assert near, (r, got[r].sum(), want[r].sum())
    # definition holds on every row: reaches p, and dropping the smallest kept value (with every
    # entry tied at it) does not
    kept_mass = (probs * got).sum(-1)
    assert bool((kept_mass >= torch.minimum(p, probs.sum(-1)) - 1e-5).all())
    smallest = torch.where(got, probs, 2.0).amin(-1, keepdim=True)
    tied = (got & (probs == smallest)).sum(-1)
    assert bool((kept_mass - smallest[:, 0] * tied < p + 1e-5).all())


def test_topp_ties_at_threshold_all_kept_and_p1_keeps_all():
    probs = torch.tensor([[0.4, 0.2, 0.2, 0.2], [0.25, 0.25, 0.25, 0.25]])
    m = ops.topp_mask(probs, 0.5)
    assert m[0].tolist() == [True, True, True, True]  # 0.4 + one 0.2 reaches 0.5; ties kept
    assert m[1].tolist() == [True, True, True, True]
    m = ops.topp_mask(torch.softmax(torch.randn(3, 50) * 5, -1), torch.tensor([1.0, 1.0, 0.5]))
    assert bool(m[:2].all()) and 0 < int(m[2].sum()) < 50


def test_topp_is_bisection_not_sort(monkeypatch):
    def no_sort(*a, **k):
        raise AssertionError("topp_mask must not sort")

    monkeypatch.setattr(torch, "sort", no_sort)
    monkeypatch.setattr(torch.Tensor, "sort", no_sort)
    monkeypatch.setattr(torch, "argsort", no_sort)
    monkeypatch.setattr(torch, "topk", no_sort)
    ops.topp_mask(torch.softmax(torch.randn(4, 33), -1), 0.9)


def test_topp_rejects_bad_p():
    with pytest.raises(ValueError, match="p must be in"):
        ops.topp_mask(torch.rand(2, 4), 0.0)


# ---------------------------------------------------------------- store + Quest

@pytest.mark.parametrize("H,G,D", [(2, 1, 64), (2, 4, 128), (1, 8, 64)])
def test_quest_score_is_upper_bound(H, G, D):
    lay = make_layout([37, 100, 16], H, G, D, dtype=torch.float32)
    pt, n_pages = SEL.page_table_ref(lay.req_to_token, lay.req_pool_indices, lay.seq_lens, 16)
    scores = ops.quest_page_scores(lay.q, lay.kmax, lay.kmin, lay.kbscale, pt, n_pages)
    for r in range(3):
        n = int(lay.seq_lens[r])
        slots = lay.req_to_token[lay.req_pool_indices[r], :n].long()
        for t in range(n):
            for hq in range(H * G):
                h = hq // G
                qk = float(lay.q[r, hq].float() @ lay.k_buffer[slots[t], h].float())
                assert scores[r, h, t // 16] >= qk - 1e-4
    assert torch.isinf(scores[2, :, 1:]).all()  # one page only


def test_store_sidecar_decode_and_unaligned_extend_and_reuse():
    H, D, P = 2, 64, 16
    S = 8 * P
    k_buffer = torch.randn(S, H, D, dtype=torch.bfloat16)
    kq = torch.zeros(S, H, D // 2, dtype=torch.uint8)
    ks, kz = torch.zeros(S, H, dtype=torch.float16), torch.zeros(S, H, dtype=torch.float16)
    kmax, kmin, kbs = ST.bounds_buffers(S // P, H, D, "cpu")
    args = (ops.SidecarLayer(kq, ks, kz, kmax, kmin, kbs), P)
    # extend: request A fills page 3 offsets 0..9, request B page 5 offsets 0..15 + page 2 0..3
    loc = torch.cat([torch.arange(48, 58), torch.arange(80, 96), torch.arange(32, 36)])
    ops.store_sidecar(k_buffer, loc, *args)
    # chunked prefill continues A mid-page (offsets 10..12), then a decode step for A and B
    ops.store_sidecar(k_buffer, torch.arange(58, 61), *args)
    ops.store_sidecar(k_buffer, torch.tensor([61, 36]), *args)

    def check(page, last):
        """The page's bounds over its offsets 0..last: int8 codes and scale, rounded outward."""
        seg = k_buffer[page * P: page * P + last + 1].float()
        hi, lo, sc = ST.quantize_bounds_ref(seg.amax(0), seg.amin(0))
        assert torch.equal(kmax[page], hi) and torch.equal(kmin[page], lo), page
        assert torch.equal(kbs[page], sc), page
        deq = ST.dequantize_bounds_ref
        # fp32 rounding of the scale (amax * fp32(1/127)) and of codes * scale, relative to the
        # largest bound (127 codes); a code rounded the wrong way is off by a whole scale step
        tol = 1e-6 * 127 * sc[:, None]
        assert bool((deq(kmax[page], kbs[page]) >= seg.amax(0) - tol).all()), page
        assert bool((deq(kmin[page], kbs[page]) <= seg.amin(0) + tol).all()), page
        assert int(torch.maximum(kmax[page].abs(), kmin[page].abs()).amax()) == 127, page

    check(3, 13)
    check(5, 15)
    check(2, 4)
    all_loc = torch.cat([torch.arange(48, 62), torch.arange(80, 96), torch.arange(32, 37)])
    p2, s2, z2 = ops.quantize_int4(k_buffer[all_loc])
    assert torch.equal(kq[all_loc], p2) and torch.equal(ks[all_loc], s2) and torch.equal(kz[all_loc], z2)
    # page 3 is freed and reused by another request with much smaller keys: no stale bounds
    k_buffer[48:64] = (torch.randn(16, H, D) * 0.01).to(torch.bfloat16)
    ops.store_sidecar(k_buffer, torch.arange(48, 51), *args)
    check(3, 2)


def test_bounds_in_another_dtype_are_refused():
    """The Quest bounds are int8 codes with an fp32 scale: bounds in the KV dtype (an older
    layout) get a clear error, not a silent cast."""
    lay = make_layout([40, 70], 2, 4, 64)
    pt, n_pages = SEL.page_table_ref(lay.req_to_token, lay.req_pool_indices, lay.seq_lens, 16)
    kmax, kmin = lay.kmax.to(torch.bfloat16), lay.kmin.to(torch.bfloat16)
    with pytest.raises(TypeError, match="int8 codes with an fp32 scale"):
        ops.quest_page_scores(lay.q, kmax, kmin, lay.kbscale, pt, n_pages)
    with pytest.raises(TypeError, match="int8 codes with an fp32 scale"):
        ops.store_sidecar(lay.k_buffer, torch.arange(3), ops.SidecarLayer(
            lay.kq, lay.kscale, lay.kzero, kmax, kmin, lay.kbscale), 16)


# ---------------------------------------------------------------- select / prune / attend

def test_quest_select_budget_covers_context_takes_all_in_order():
    lay = make_layout([5, 33, 64], 2, 4, 64)
    cand, cnt = ops.quest_select(lay.q, lay.kmax, lay.kmin, lay.kbscale, lay.req_to_token,
                                 lay.req_pool_indices, lay.seq_lens, 64, 16)
    assert cand.shape == (3, 2, 64) and cnt.tolist() == [[5, 5], [33, 33], [64, 64]]
    for r in range(3):
        n = int(lay.seq_lens[r])
        want = lay.req_to_token[lay.req_pool_indices[r], :n]
        for h in range(2):
            assert torch.equal(cand[r, h, :n], want)


def test_quest_select_keeps_sink_last_and_best_pages():
    lay = make_layout([200, 161], 2, 4, 64)
    budget = 64  # 4 pages: sink + last + 2 best
    cand, cnt = ops.quest_select(lay.q, lay.kmax, lay.kmin, lay.kbscale, lay.req_to_token,
                                 lay.req_pool_indices, lay.seq_lens, budget, 16)
    pt, n_pages = SEL.page_table_ref(lay.req_to_token, lay.req_pool_indices, lay.seq_lens, 16)
    scores = ops.quest_page_scores(lay.q, lay.kmax, lay.kmin, lay.kbscale, pt, n_pages)
    for r in range(2):
        n = int(lay.seq_lens[r])
        npg = int(n_pages[r])
        row = lay.req_to_token[lay.req_pool_indices[r]]
        for h in range(2):
            mid = scores[r, h, 1: npg - 1]
            best = (torch.topk(mid, 2).indices + 1).tolist()
            pages = sorted({0, npg - 1, *best})
            want = torch.cat([row[j * 16: min(n, (j + 1) * 16)] for j in pages])
            assert int(cnt[r, h]) == want.numel()
            assert torch.equal(cand[r, h, : want.numel()], want)


def _prune_inputs(seq, H, G, D, budget=4096):
    lay = make_layout(seq, H, G, D, peaked=6.0)
    cand, cnt = ops.quest_select(lay.q, lay.kmax, lay.kmin, lay.kbscale, lay.req_to_token,
                                 lay.req_pool_indices, lay.seq_lens, budget, 16)
    return lay, cand, cnt


def test_prune_union_of_per_head_topp_and_clamps():
    H, G, D = 2, 4, 64
    lay, cand, cnt = _prune_inputs([300, 517, 40], H, G, D)
    sm = 1 / math.sqrt(D)
    scores = ops.int4_scores(lay.q, lay.kq, lay.kscale, lay.kzero, cand, cnt, sm)
    probs = torch.softmax(scores, -1)
    p = torch.tensor([0.9, 0.5, 0.95])
    kept, kcnt = ops.twilight_prune(lay.q, lay.kq, lay.kscale, lay.kzero, cand, cnt, p, sm)
    unions = torch.zeros(probs.shape[0], H, probs.shape[-1], dtype=torch.bool)
    for r in range(3):
        for h in range(H):
            c = int(cnt[r, h])
            per_head = ops.topp_mask(probs[r, h, :, :c], p[r].expand(G))
            union = per_head.any(0)
            union[c - 1] = True  # newest token
            unions[r, h, :c] = union
            want = cand[r, h, :c][union]
            assert int(kcnt[r, h]) == want.numel() >= 1
            assert torch.equal(kept[r, h, : want.numel()], want)
    # max clamp keeps the newest and the heaviest of the union (a token outside it ranks below
    # every token in it, however heavy); min clamp tops up with the heaviest
    kept2, k2 = ops.twilight_prune(lay.q, lay.kq, lay.kscale, lay.kzero, cand, cnt, p, sm, 1, 3)
    assert bool((k2 <= 3).all())
    w = probs.amax(2)
    for r in range(3):
        for h in range(H):
            c = int(cnt[r, h])
            got = set(kept2[r, h, : int(k2[r, h])].tolist())
            assert int(cand[r, h, c - 1]) in got
            rank = w[r, h, : c - 1] + 2.0 * unions[r, h, : c - 1]
            heavy = torch.argsort(rank, descending=True)[: int(k2[r, h]) - 1]
            assert got == {int(cand[r, h, c - 1])} | set(cand[r, h, heavy].tolist())
    kept3, k3 = ops.twilight_prune(lay.q, lay.kq, lay.kscale, lay.kzero, cand, cnt, 0.01, sm, 100, 0)
    assert k3.tolist() == torch.minimum(cnt, torch.tensor(100)).tolist()


def test_prune_p1_keeps_every_candidate():
    lay, cand, cnt = _prune_inputs([300, 77], 2, 8, 128)
    kept, kcnt = ops.twilight_prune(lay.q, lay.kq, lay.kscale, lay.kzero, cand, cnt, 1.0, 0.1, 1, 5)
    assert torch.equal(kcnt, cnt) and torch.equal(kept, cand)


@pytest.mark.parametrize("H,G,D", [(2, 1, 64), (2, 4, 128), (1, 8, 64), (3, 3, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chained_step_equals_dense_at_p1(H, G, D, dtype):
    seq = [17, 250, 96, 1]
    lay = make_layout(seq, H, G, D, dtype=dtype)
    sm = 1 / math.sqrt(D)
    o, kc = ops.twilight_decode(lay.q, lay.k_buffer, lay.v_buffer, lay.sidecar, lay.req_to_token,
                                lay.req_pool_indices, lay.seq_lens, 1.0, budget=256, page_size=16,
                                sm_scale=sm)
    assert kc.tolist() == [[n] * H for n in seq]
    torch.testing.assert_close(o.float(), lay.dense(sm), atol=2e-2, rtol=2e-2)


def test_chained_step_sparse_keeps_the_mass_and_short_rows_dense():
    H, G, D = 2, 4, 64
    seq = [1500, 700, 90]
    lay = make_layout(seq, H, G, D, peaked=8.0)
    sm = 1 / math.sqrt(D)
    o, kc = ops.twilight_decode(lay.q, lay.k_buffer, lay.v_buffer, lay.sidecar, lay.req_to_token,
                                lay.req_pool_indices, lay.seq_lens, 0.95, budget=512, page_size=16,
                                sm_scale=sm, min_sparse_len=128)
    dense = lay.dense(sm)
    assert kc[2].tolist() == [90, 90]  # below min_sparse_len: every token
    torch.testing.assert_close(o[2].float(), dense[2], atol=2e-2, rtol=2e-2)
    assert bool((kc[:2] < 512).all())  # pruned below the candidate budget
    # the kept tokens carry ~p of the *exact* attention mass of every q head
    cand, cnt = ops.quest_select(lay.q, lay.kmax, lay.kmin, lay.kbscale, lay.req_to_token,
                                 lay.req_pool_indices, lay.seq_lens, 512, 16)
    kept, kcnt = ops.twilight_prune(lay.q, lay.kq, lay.kscale, lay.kzero, cand, cnt, 0.95, sm)
    assert torch.equal(kcnt[:2], kc[:2])
    masses = []
    for r in range(2):
        n = seq[r]
        slots = lay.req_to_token[lay.req_pool_indices[r], :n].long()
        for hq in range(H * G):
            h = hq // G
            w = torch.softmax(lay.k_buffer[slots, h].float() @ lay.q[r, hq].float() * sm, 0)
            keep = torch.isin(slots, kept[r, h, : int(kcnt[r, h])].long())
            masses.append(float(w[keep].sum()))
    # p of the candidates' estimated mass, less what Quest left out and int4 error
    assert min(masses) > 0.8 and sum(masses) / len(masses) > 0.9, masses


@pytest.mark.parametrize("sms", [8, 78, 132])
@pytest.mark.parametrize("groups", [dict(min_requests=1 << 30, groups=1, keep_all_groups=1),
                                    dict(min_requests=2, groups=2, keep_all_groups=2),
                                    dict(min_requests=8, groups=3, keep_all_groups=1),
                                    launch.get("decode_groups")])
def test_attend_splits_fit_the_workspace(sms, groups):
    """The attend split count is a power of two in [1, 16], Quest alone (every candidate kept)
    never gets more splits than a pruned step, and the workspace's partials hold the split rows
    of every batch up to its capacity, under both rules and with the step's requests in row
    groups (each group splits its own rows; a short buffer would be overrun on the GPU, where
    nothing checks it)."""
    with launch.override(decode_groups=groups):
        _check_splits_fit(sms, groups)


def _check_splits_fit(sms, groups):
    H, G, D = 8, 4, 128
    for rows in range(1, 600):
        for keep_all in (False, True):
            sp = A.attend_splits(rows, sms, keep_all)
            assert 1 <= sp <= 16 and sp & (sp - 1) == 0
        assert A.attend_splits(rows, sms, True) <= A.attend_splits(rows, sms, False)
    ws = ops.DecodeWorkspace.allocate(70, H, G, D, 1024, 16, 4096, "cpu")
    for R in range(1, 71):
        for keep_all in (False, True):
            n = groups["keep_all_groups"] if keep_all else groups["groups"]
            n = 1 if R < groups["min_requests"] else min(n, R)
            sizes = [R // n + (i < R % n) for i in range(n)]
            assert sum(sizes) == R and min(sizes) >= 1
            bounds = ops._row_groups(R, ops.decode_groups(R, keep_all))
            assert [r1 - r0 for r0, r1 in bounds] == sizes
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:])) and bounds[0][0] == 0
            need = sum(r * H * A.attend_splits(r * H, ws.num_sms, keep_all) for r in sizes) * G
            assert ws.mid_lse.numel() >= need and ws.mid_o.shape[0] >= need


def test_step_layout_is_made_once_per_step_shape():
    """The row groups and their workspace slices are made once per (requests, way) and launch
    table, not once per layer; each group's slices are its own rows and its own partials."""
    H, G = 2, 4
    ws = ops.DecodeWorkspace.allocate(12, H, G, 64, 256, 16, 1024, "cpu")
    a = ws.step_layout(10, False)
    assert ws.step_layout(10, False) is a  # every later layer and step reuses it
    assert ws.step_layout(10, True) is not a
    groups = dict(min_requests=2, groups=3, keep_all_groups=1)
    with launch.override(decode_groups=groups):
        b = ws.step_layout(10, False)
        assert [(r0, r1) for r0, r1, _, _ in b] == [(0, 4), (4, 7), (7, 10)]
        mid = 0
        for r0, r1, splits, bufs in b:
            assert bufs["kept_counts"].data_ptr() == ws.kept_counts[r0].data_ptr()
            assert bufs["kept_counts"].shape[0] == r1 - r0
            assert bufs["lo"].data_ptr() == ws.head_lo[r0 * H * G].data_ptr()
            n_mid = (r1 - r0) * H * splits * G
            assert bufs["mid_lse"].data_ptr() == ws.mid_lse[mid].data_ptr()
            assert bufs["mid_lse"].numel() == n_mid
            mid += n_mid
    c = ws.step_layout(10, False)  # the table is back: the default plan again
    assert c is not b and [(r0, r1) for r0, r1, _, _ in c] == [(r0, r1) for r0, r1, _, _ in a]


def test_side_streams_never_the_callers():
    """The row groups' side streams are the workspace's streams other than the caller's (PyTorch
    hands pool streams out round-robin, so the caller's capture stream can be among them); too
    few, or no group to place, and the groups run on the caller's stream one after the other."""
    a, b, c, d, x = (object() for _ in range(5))
    assert ops.side_streams([a, b, c, d], b, 3) == [a, c, d]
    assert ops.side_streams([a, b, c, d], x, 3) == [a, b, c]
    assert ops.side_streams([a, b, c, d], d, 3) == [a, b, c]
    assert ops.side_streams([a, b], a, 2) == []
    assert ops.side_streams([a, b, c, d], x, 0) == []
    assert ops.side_streams([], None, 0) == []
