"""The whole sparse decode step (store -> select -> prune -> attend) captured in one CUDA graph and
replayed on new data equals the eager step: no host sync, no data-dependent shape; also with the
batch padded to the captured size the way SGLang's graph runner pads it."""

import math

import pytest
import torch

from sglang_twilight import ops
from sglang_twilight.kernels import launch
from tests.pools import make_layout


@pytest.fixture
def row_groups(groups):
    """The step's requests in ``groups`` row groups from 2 requests on (Quest alone too)."""
    with launch.override(decode_groups=dict(min_requests=2, groups=groups,
                                            keep_all_groups=groups)):
        yield groups

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def _capture(step):
    """A CUDA graph of ``step()``, warmed up (Triton compiles) on a side stream first, as
    SGLang's graph runner does."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("H,G,D", [(8, 4, 128), (3, 3, 64)])
def test_decode_step_graph_replay_equals_eager(H, G, D, groups, row_groups):
    """``groups`` 2: the step's requests in two row groups, the second on a side stream (a
    branch of the captured graph)."""
    max_bs, max_ctx, budget = 8, 6000, 1024
    seq = [5000, 17, 3000, 1025, 64, 4096]
    lay = make_layout(seq, H, G, D, device="cuda", peaked=6.0, backend="triton")
    R = len(seq)
    sm = 1 / math.sqrt(D)
    ws = ops.DecodeWorkspace.allocate(max_bs, H, G, D, budget, 16, max_ctx, "cuda")
    assert len(ws.streams) == (groups if groups > 1 else 0)  # one spare: ops.side_streams
    # static inputs of the graph (what SGLang's graph runner owns)
    q = lay.q.clone()
    seq_lens = lay.seq_lens.clone()
    p = torch.full((R,), 0.9, device="cuda")
    loc = torch.stack([lay.req_to_token[lay.req_pool_indices[r], n - 1] for r, n in enumerate(seq)]).long()
    out = torch.empty_like(q)

    def step():
        ops.store_sidecar(lay.k_buffer, loc, lay.sidecar, 16)
        ops.twilight_decode(q, lay.k_buffer, lay.v_buffer, lay.sidecar, lay.req_to_token,
                            lay.req_pool_indices, seq_lens, p, budget=budget, page_size=16,
                            sm_scale=sm, min_budget=4, max_budget=0, min_sparse_len=100,
                            workspace=ws, out=out)

    graph = _capture(step)
    for trial in range(3):
        # new data in the static buffers: queries, per-request p, lengths (one token shorter)
        q.copy_(torch.randn_like(q))
        p.copy_(torch.rand(R, device="cuda") * 0.5 + 0.5)
        if trial == 2:
            seq_lens.sub_(1)
            loc.copy_(torch.stack([lay.req_to_token[lay.req_pool_indices[r], n - 2]
                                   for r, n in enumerate(seq)]).long())
        graph.replay()
        torch.cuda.synchronize()
        got = out.clone()
        got_counts = ws.kept_counts[:R].clone()
        step()  # eager on the same inputs
        torch.cuda.synchronize()
        assert torch.equal(got_counts, ws.kept_counts[:R])
        torch.testing.assert_close(got, out, atol=0, rtol=0)
        assert bool((got_counts >= 1).all())


def _off_row_zero(lay):
    """SGLang never gives req-pool row 0 to a request (graph padding rows point at it): move a
    request that ``make_layout`` put there to a free row, and leave row 0 all zeros."""
    rpi = lay.req_pool_indices
    if bool((rpi == 0).any()):
        used = set(rpi.tolist())
        free = next(i for i in range(1, lay.req_to_token.shape[0]) if i not in used)
        r = int((rpi == 0).nonzero()[0, 0])
        lay.req_to_token[free] = lay.req_to_token[0]
        rpi[r] = free
    lay.req_to_token[0].zero_()
    return lay


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("H,G,D", [(8, 4, 128), (3, 3, 64)])
def test_padded_graph_batch(H, G, D, groups, row_groups):
    """A decode batch as SGLang's graph runner replays it: captured once at the largest batch
    size, replayed with fewer requests, the rest padding rows (req_pool_index 0, seq_len the
    backend's fill value, out_cache_loc 0: ``PaddingPolicy`` of ``seq_lens`` /
    ``req_pool_indices`` / ``out_cache_loc`` in SGLang's graph buffer registry). Per-request p
    comes from the ``RequestTopP`` table, gathered inside the graph, so padding rows get the
    table's row 0 (the server default). For replays with 6, 3 and 1 real requests on new data:

    * the padded replay equals the same padded batch run eagerly, bit for bit (kept counts too);
    * its real rows equal eager decode of the real rows alone - what SGLang runs without CUDA
      graphs - with the same kept counts exactly and outputs up to the rounding of another
      attention split (the split count follows the batch size);
    * padding rows come out finite and do not change the real rows."""
    from sglang_twilight.backend import TwilightAttnBackend
    from sglang_twilight.request_params import RequestTopP

    fill = TwilightAttnBackend.get_cuda_graph_seq_len_fill_value(None)
    assert fill == 1  # FlashInfer's, which the twilight backend inherits
    max_bs, max_ctx, budget = 8, 6000, 1024
    seq = [5000, 17, 3000, 1025, 64, 4096]
    lay = _off_row_zero(make_layout(seq, H, G, D, device="cuda", peaked=6.0, backend="triton"))
    R = len(seq)
    sm = 1 / math.sqrt(D)
    kw = dict(budget=budget, page_size=16, sm_scale=sm, min_budget=4, max_budget=0,
              min_sparse_len=100)
    ws = ops.DecodeWorkspace.allocate(max_bs, H, G, D, budget, 16, max_ctx, "cuda")
    table = RequestTopP(lay.req_to_token.shape[0], 0.95, "cuda", register=False)
    for r in range(R):  # each request its own p, as admission writes them
        table.set(int(lay.req_pool_indices[r]), 0.5 + 0.08 * r)

    # static buffers, as SGLang's graph runner owns them (int64 like its registry's slots)
    q = torch.randn(max_bs, H * G, D, device="cuda").to(lay.q.dtype)
    rpi = torch.zeros(max_bs, dtype=torch.int64, device="cuda")
    seq_lens = torch.full((max_bs,), fill, dtype=torch.int64, device="cuda")
    loc = torch.zeros(max_bs, dtype=torch.int64, device="cuda")
    p = torch.empty(max_bs, dtype=torch.float32, device="cuda")
    out = torch.empty_like(q)

    def fill_batch(rows, shorter):
        n = len(rows)
        q.copy_(torch.randn_like(q))
        rpi.zero_()
        seq_lens.fill_(fill)
        loc.zero_()
        rpi[:n] = lay.req_pool_indices[rows].long()
        seq_lens[:n] = torch.tensor([seq[r] - shorter for r in rows], device="cuda")
        loc[:n] = torch.stack([lay.req_to_token[lay.req_pool_indices[r], seq[r] - 1 - shorter]
                               for r in rows]).long()

    def step(bs=max_bs):
        ops.store_sidecar(lay.k_buffer, loc[:bs], lay.sidecar, 16)
        table.rows(rpi[:bs], out=p[:bs])
        ops.twilight_decode(q[:bs], lay.k_buffer, lay.v_buffer, lay.sidecar, lay.req_to_token,
                            rpi[:bs], seq_lens[:bs], p[:bs], workspace=ws, out=out[:bs], **kw)

    fill_batch(list(range(R)), 0)
    graph = _capture(step)
    gen = torch.Generator().manual_seed(3)
    for n, shorter in ((6, 0), (3, 1), (1, 0), (3, 0)):
        rows = torch.randperm(R, generator=gen)[:n].tolist()
        fill_batch(rows, shorter)
        graph.replay()
        torch.cuda.synchronize()
        got, got_counts = out.clone(), ws.kept_counts[:max_bs].clone()
        got_cand = ws.cand_counts[:max_bs].clone()
        assert bool(torch.isfinite(got.float()).all()), f"non-finite output with {n} real rows"
        assert torch.equal(p[n:], torch.full_like(p[n:], 0.95))  # padding: the default p
        step()  # the same padded batch, eagerly
        torch.cuda.synchronize()
        assert torch.equal(got_counts, ws.kept_counts[:max_bs]), n
        torch.testing.assert_close(got, out, atol=0, rtol=0)
        step(n)  # the real rows alone, as SGLang decodes without graphs
        torch.cuda.synchronize()
        assert torch.equal(got_counts[:n], ws.kept_counts[:n]), (n, rows)
        torch.testing.assert_close(got[:n].float(), out[:n].float(), atol=2e-2, rtol=2e-2)
        assert bool((got_counts[:n] >= 1).all())
        # top-p really pruned the long rows' candidates (p < 1 above min_sparse_len)
        for i, r in enumerate(rows):
            if seq[r] - shorter >= 2000:
                assert bool((got_counts[i] < got_cand[i]).any()), (r, got_counts[i], got_cand[i])
