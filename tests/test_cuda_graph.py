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


@pytest.mark.parametrize("H,G,D", [(8, 4, 128), (3, 3, 64)])
def test_decode_step_graph_replay_equals_eager(H, G, D):
    max_bs, max_ctx, budget = 8, 6000, 1024
    seq = [5000, 17, 3000, 1025, 64, 4096]
    lay = make_layout(seq, H, G, D, device="cuda", peaked=6.0, backend="triton")
    R = len(seq)
    sm = 1 / math.sqrt(D)
    ws = ops.DecodeWorkspace.allocate(max_bs, H, G, D, budget, 16, max_ctx, "cuda")
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


def test_pdl_launch_equals_plain_launch(monkeypatch):
    """Programmatic dependent launch (Hopper+) changes when a kernel's programs start, never what
    they read: the step launched with it, eagerly and replayed in a graph, equals the step
    launched without it, bit for bit, every time (a kernel reading before the one it follows
    has finished would show as a difference)."""
    from sglang_twilight.kernels import _launch

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90+")
    H, G, D, budget = 8, 4, 128, 1024
    seq = [6000, 17, 3000, 1025, 64, 4096, 5999, 2048]
    lay = make_layout(seq, H, G, D, device="cuda", peaked=6.0, backend="triton")
    R = len(seq)
    ws = ops.DecodeWorkspace.allocate(R, H, G, D, budget, 16, 6000, "cuda")
    p = torch.full((R,), 0.9, device="cuda")
    loc = torch.stack([lay.req_to_token[lay.req_pool_indices[r], n - 1] for r, n in enumerate(seq)]).long()
    out = torch.empty_like(lay.q)

    def step():
        ops.store_sidecar(lay.k_buffer, loc, *lay.sidecar, 16)
        ops.twilight_decode(lay.q, lay.k_buffer, lay.v_buffer, *lay.sidecar, lay.req_to_token,
                            lay.req_pool_indices, lay.seq_lens, p, budget=budget, page_size=16,
                            sm_scale=1 / math.sqrt(D), min_budget=4, max_budget=0,
                            workspace=ws, out=out)
        return out.clone(), ws.kept_counts[:R].clone(), ws.kept_slots[:R].clone()

    monkeypatch.setenv("TWILIGHT_PDL", "0")
    assert not _launch.pdl(lay.q)
    ref = step()
    monkeypatch.delenv("TWILIGHT_PDL")
    assert _launch.pdl(lay.q)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for trial in range(6):
        if trial % 2:
            graph.replay()
            got = (out.clone(), ws.kept_counts[:R].clone(), ws.kept_slots[:R].clone())
        else:
            got = step()
        torch.cuda.synchronize()
        assert torch.equal(got[1], ref[1])
        for r in range(R):
            for h in range(H):
                n = int(ref[1][r, h])
                assert torch.equal(got[2][r, h, :n], ref[2][r, h, :n])
        torch.testing.assert_close(got[0], ref[0], atol=0, rtol=0)
