"""The whole sparse decode step (store -> select -> prune -> attend) captured in one CUDA graph and
replayed on new data equals the eager step: no host sync, no data-dependent shape."""

import math

import pytest
import torch

from sglang_twilight import ops
from tests.pools import make_layout

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("H,G,D", [(8, 4, 128), (3, 3, 64)])
def test_decode_step_graph_replay_equals_eager(H, G, D, groups, monkeypatch):
    """``groups`` 2: the step's requests in two row groups, the second on a side stream (a
    branch of the captured graph)."""
    monkeypatch.setattr(ops, "DECODE_GROUPS", dict(min_requests=2, groups=groups))
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
        ops.store_sidecar(lay.k_buffer, loc, *lay.sidecar, 16)
        ops.twilight_decode(q, lay.k_buffer, lay.v_buffer, *lay.sidecar, lay.req_to_token,
                            lay.req_pool_indices, seq_lens, p, budget=budget, page_size=16,
                            sm_scale=sm, min_budget=4, max_budget=0, min_sparse_len=100,
                            workspace=ws, out=out)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm up (compiles) outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
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
