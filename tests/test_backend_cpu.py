"""The twilight attention backend on CPU: startup refusals, workspace sizing, and the sparse decode
path fed by SGLang's real pools, against the torch reference and dense attention.

Everything SGLang here is real 0.5.17 code on CPU tensors: ``ServerArgs``, ``ModelConfig``,
``ReqToTokenPool``, ``MHATokenToKVPool``, ``PagedTokenToKVPoolAllocator``, ``RadixAttention``, and
``TwilightAttnBackend``'s own constructor chain through ``FlashInferAttnBackend.__init__``. Only what
cannot exist without a GPU is stubbed: FlashInfer's wrapper classes (flashinfer is not installed
here), the parent's FlashInfer prefill (replaced by a plain ``set_kv_buffer`` — exactly the KV write
the parent does) and, for dense layers, the FlashInfer decode kernel (replaced by fp32 dense
attention). The Twilight kernels run as Triton kernels through Triton's interpreter
(``TRITON_INTERPRET=1``, set by conftest), as the backend calls them on the GPU.
"""

from __future__ import annotations

import copy
import math
import types

import pytest
import torch

from sglang_twilight import ops
from sglang_twilight.kernels import store as store_k

import sglang.srt.layers.attention.flashinfer_backend as fib
from sglang.srt.configs.model_config import AttentionArch, ModelConfig
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.runtime_context import get_context, get_parallel, publish
from sglang.srt.server_args import ServerArgs
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
from tests.models import write_tiny_llama

P = 16
HKV, G, D = 2, 2, 64
HQ = HKV * G
LAYERS = 3  # layer 0 dense, 1 and 2 sparse
POOL_TOKENS = 64 * P
REQ_SLOTS = 8
MAX_CTX = 512
DTYPE = torch.bfloat16
SM = 1.0 / math.sqrt(D)

MODEL_CONFIG = dict(hidden_size=HQ * D, num_attention_heads=HQ, num_key_value_heads=HKV,
                    head_dim=D, num_hidden_layers=LAYERS, max_position_embeddings=MAX_CTX)

_PARALLEL = dict(attn_tp_size=1, attn_tp_rank=0, tp_size=1, tp_rank=0, attn_cp_size=1,
                 attn_cp_rank=0, dcp_size=1, pp_size=1, pp_rank=0)


class _StubWrapper:
    """Stands in for a FlashInfer wrapper class (flashinfer is not installed on CPU)."""

    def __init__(self, *args, **kwargs):
        self.is_cuda_graph_enabled = kwargs.get("use_cuda_graph", False)
        self.forward_fn = None

    def forward(self, q, kv_cache, **kw):
        return self.forward_fn(q, kv_cache, **kw)


@pytest.fixture(scope="module")
def sglang_env(tmp_path_factory):
    """Stub FlashInfer's wrappers, register the plugin, publish real ServerArgs of a tiny
    Llama with ``--attention-backend twilight``, and pin the parallel sizes to 1."""
    mp = pytest.MonkeyPatch()
    for name in ("BatchPrefillWithRaggedKVCacheWrapper", "BatchPrefillWithPagedKVCacheWrapper",
                 "BatchDecodeWithPagedKVCacheWrapper"):
        mp.setattr(fib, name, _StubWrapper, raising=False)
    from sglang_twilight import plugin

    plugin.register()  # the --attention-backend choice
    d = write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), **MODEL_CONFIG)
    sa = ServerArgs(model_path=d, attention_backend="twilight", device="cpu", page_size=P)
    mc = ModelConfig.from_server_args(sa)
    with get_context().preserve_config():
        publish(sa, role="scheduler")
        with get_parallel().override(**_PARALLEL):
            yield types.SimpleNamespace(server_args=sa, model_config=mc)
    mp.undo()


def _sa(env, **changes):
    """A copy of the real ServerArgs with some fields changed (as the CLI would set them)."""
    sa = copy.copy(env.server_args)
    for k, v in changes.items():
        object.__setattr__(sa, k, v)
    return sa


def _runner(env, server_args=None, **over):
    rtp = ReqToTokenPool(size=REQ_SLOTS, max_context_len=MAX_CTX, device="cpu",
                         enable_memory_saver=False)
    kv = MHATokenToKVPool(POOL_TOKENS, page_size=P, dtype=DTYPE, head_num=HKV, head_dim=D,
                          layer_num=LAYERS, device="cpu", enable_memory_saver=False)
    alloc = PagedTokenToKVPoolAllocator(POOL_TOKENS, page_size=P, dtype=DTYPE, device="cpu",
                                        kvcache=kv, need_sort=False)
    mr = types.SimpleNamespace(
        req_to_token_pool=rtp, token_to_kv_pool=kv, token_to_kv_pool_allocator=alloc,
        is_draft_worker=False, spec_algorithm=SpeculativeAlgorithm.from_string(None),
        server_args=server_args or env.server_args, kv_cache_dtype=DTYPE,
        model_config=env.model_config, page_size=P, sliding_window_size=None, device="cpu",
        dtype=DTYPE, use_mla_backend=False,
        model=torch.nn.ModuleList([_layer(i) for i in range(LAYERS)]),
    )
    for k, v in over.items():
        setattr(mr, k, v)
    return mr


def _layer(lid, **kw):
    return RadixAttention(HQ, D, SM, HKV, lid, **kw)


def _backend(env, **over):
    from sglang_twilight.backend import TwilightAttnBackend

    return TwilightAttnBackend(_runner(env, **over))


# --------------------------------------------------------------------------- refusals

REFUSALS = [
    (dict(kv_cache_dtype="fp8_e4m3"), "--kv-cache-dtype"),
    (dict(speculative_algorithm="EAGLE"), "--speculative-algorithm"),
    (dict(enable_hierarchical_cache=True), "--enable-hierarchical-cache"),
    (dict(enable_lmcache=True), "--enable-lmcache"),
    (dict(disaggregation_mode="decode"), "--disaggregation-mode"),
    (dict(disaggregation_mode="prefill"), "--disaggregation-mode"),
    (dict(page_size=32), "--page-size"),
    (dict(decode_attention_backend="flashinfer"), "--decode-attention-backend"),
    (dict(prefill_attention_backend="flashinfer"), "--prefill-attention-backend"),
    (dict(dcp_size=2), "--dcp-size"),
]


def test_supported_server_args_pass(sglang_env, twilight_cfg):
    from sglang_twilight.backend import check_server_args

    check_server_args(sglang_env.server_args, twilight_cfg(), environ={})


@pytest.mark.parametrize("changes,flag", REFUSALS, ids=[f for _, f in REFUSALS])
def test_server_args_refused(sglang_env, twilight_cfg, changes, flag):
    from sglang_twilight.backend import TwilightUnsupportedError, check_server_args

    with pytest.raises(TwilightUnsupportedError) as ei:
        check_server_args(_sa(sglang_env, **changes), twilight_cfg(), environ={})
    msg = str(ei.value)
    assert flag in msg and "\n" not in msg and "twilight" in msg, msg


@pytest.mark.parametrize("var", ["SGLANG_ENABLE_POST_CAPTURE_KV_SIZING", "SGLANG_USE_HND_KVCACHE"])
def test_env_refused(sglang_env, twilight_cfg, var):
    from sglang_twilight.backend import TwilightUnsupportedError, check_server_args

    with pytest.raises(TwilightUnsupportedError, match=var):
        check_server_args(sglang_env.server_args, twilight_cfg(), environ={var: "1"})
    check_server_args(sglang_env.server_args, twilight_cfg(), environ={var: "0"})


def test_backend_constructor_refuses_before_allocating(sglang_env, twilight_cfg):
    from sglang_twilight.backend import TwilightUnsupportedError
    from sglang_twilight.sidecar import POOL_ATTR

    twilight_cfg()
    mr = _runner(sglang_env, server_args=_sa(sglang_env, speculative_algorithm="EAGLE"))
    from sglang_twilight.backend import TwilightAttnBackend

    with pytest.raises(TwilightUnsupportedError, match="--speculative-algorithm"):
        TwilightAttnBackend(mr)
    assert getattr(mr.token_to_kv_pool, POOL_ATTR, None) is None  # no sidecar was attached


def _mc_with(env, **attrs):
    mc = copy.copy(env.model_config)
    for k, v in attrs.items():
        setattr(mc, k, v)
    return mc


@pytest.mark.parametrize("case", ["mla", "sliding", "softcap_cfg", "softcap_layer", "window_layer",
                                  "fp8_kv", "pool", "encdec"])
def test_model_refused(sglang_env, twilight_cfg, case):
    from sglang_twilight.backend import TwilightUnsupportedError, check_model

    twilight_cfg()
    env = sglang_env
    if case == "mla":
        mr, want = _runner(env, model_config=_mc_with(env, attention_arch=AttentionArch.MLA)), "MLA"
    elif case == "sliding":
        mr, want = _runner(env, sliding_window_size=4096), "sliding-window"
    elif case == "softcap_cfg":
        hf = copy.copy(env.model_config.hf_text_config)
        hf.attn_logit_softcapping = 50.0
        mr, want = _runner(env, model_config=_mc_with(env, hf_text_config=hf)), "soft-capping"
    elif case == "softcap_layer":
        mr = _runner(env, model=torch.nn.ModuleList([_layer(0), _layer(1, logit_cap=30.0)]))
        want = "layer 1 uses logit soft-capping"
    elif case == "window_layer":
        mr = _runner(env, model=torch.nn.ModuleList([_layer(0, sliding_window_size=128)]))
        want = "layer 0 uses sliding-window"
    elif case == "fp8_kv":
        mr, want = _runner(env, kv_cache_dtype=torch.float8_e4m3fn), "--kv-cache-dtype"
    elif case == "pool":
        mr, want = _runner(env, token_to_kv_pool=types.SimpleNamespace()), "MHATokenToKVPool"
    else:
        mr, want = _runner(env, model_config=_mc_with(env, is_encoder_decoder=True)), "encoder-decoder"
    with pytest.raises(TwilightUnsupportedError, match=want) as ei:
        check_model(mr)
    assert "\n" not in str(ei.value)
    check_model(_runner(env))  # the plain model passes


# --------------------------------------------------------------------------- workspace


def test_workspace_rows_respect_the_memory_cap():
    from sglang_twilight.backend import workspace_bytes, workspace_rows

    for H, g, budget, ctx in [(2, 2, 64, 512), (8, 4, 8192, 33000), (3, 3, 100, 70)]:
        geo = (H, g, D, budget, ctx, P)
        for rows in (1, 2, 3, 5):
            real = ops.DecodeWorkspace.allocate(rows, H, g, D, budget, P, ctx, "cpu").nbytes()
            assert workspace_bytes(rows, *geo) == real
            assert workspace_rows(100, *geo, limit_bytes=real) == rows
            assert workspace_rows(100, *geo, limit_bytes=real + 1) == rows
        assert workspace_rows(4, *geo, limit_bytes=1 << 40) == 4
        assert workspace_rows(4, *geo, limit_bytes=1) == 1


def test_workspace_sizing_in_backend(sglang_env, twilight_cfg, monkeypatch):
    from sglang_twilight.backend import workspace_bytes

    cfg = twilight_cfg(budget=64, min_sparse_len=32, min_budget=8, dense_layers=1)
    b = _backend(sglang_env)
    tw = b.twilight
    assert tw.budget == cfg.capacity == 64 and tw.max_context == MAX_CTX
    assert tw.workspace is None  # nothing until graphs are set up or the first eager decode
    # graphs: the parent's init_cuda_graph_state allocates on "cuda"; keep only ours
    monkeypatch.setattr(fib.FlashInferAttnBackend, "init_cuda_graph_state",
                        lambda self, *a, **k: None)
    b.init_cuda_graph_state(5, 5)
    ws = tw.workspace
    assert (ws.max_rows, ws.num_kv_heads, ws.group, ws.capacity) == (5, HKV, G, 64)
    assert ws.max_pages == MAX_CTX // P
    b.init_cuda_graph_state(3, 3)  # never shrinks (captured graphs point at it)
    assert tw.workspace is ws
    # the memory cap: a workspace of 2 rows' worth gives 2 rows
    tw.workspace_limit_bytes = workspace_bytes(2, HKV, G, D, 64, MAX_CTX, P)
    b.init_cuda_graph_state(7, 7)
    assert tw.workspace is ws  # 2 rows < 5 already there
    assert tw.rows_for(7) == 2


def test_eager_workspace_lazy_and_selector_none(sglang_env, twilight_cfg):
    twilight_cfg(selector="none", budget=64, min_sparse_len=32, min_budget=8, dense_layers=1)
    b = _backend(sglang_env)
    tw = b.twilight
    assert tw.budget == MAX_CTX  # selector none: every token is a candidate
    ws = tw.ensure_workspace()
    assert ws.max_rows == tw.max_rows == int(b.kv_indptr[0].shape[0]) - 1
    assert ws.capacity >= ws.max_pages * P


# --------------------------------------------------------------------------- decode path


class Driver:
    """Requests on the real paged allocator, prefilled through ``backend.forward_extend`` and
    decoded one step through ``backend.forward_decode``."""

    def __init__(self, backend, mr, seed=0):
        self.b, self.mr = backend, mr
        self.kv = mr.token_to_kv_pool
        self.alloc = mr.token_to_kv_pool_allocator
        self.rtt = mr.req_to_token_pool.req_to_token
        self.g = torch.Generator().manual_seed(seed)
        self.layers = [_layer(i) for i in range(LAYERS)]
        self.rows, self.lens = [], []

    def rand(self, *shape, scale=1.0):
        return (torch.randn(*shape, generator=self.g) * scale).to(DTYPE)

    def prefill(self, n, row):
        pages = -(-n // P)
        slots = self.alloc.alloc(pages * P)
        assert slots is not None
        slots = slots[:n]
        self.rtt[row, :n] = slots.to(torch.int32)
        fb = types.SimpleNamespace(out_cache_loc=slots.to(torch.int64),
                                   forward_mode=ForwardMode.EXTEND)
        for lay in self.layers:
            k, v, q = self.rand(n, HKV, D), self.rand(n, HKV, D), self.rand(n, HQ * D)
            self.b.forward_extend(q, k, v, lay, fb)
        self.rows.append(row)
        self.lens.append(n)

    def decode_batch(self, pad_rows=0):
        """New slot per request (next offset of its last page, else a fresh page), like
        ``alloc_decode``; plus ``pad_rows`` CUDA-graph padding rows (req row 0, slot 0, len 1)."""
        locs = []
        for i, (row, n) in enumerate(zip(self.rows, self.lens)):
            last = int(self.rtt[row, n - 1])
            loc = last + 1 if (last + 1) % P else int(self.alloc.alloc(P)[0])
            self.rtt[row, n] = loc
            self.lens[i] = n + 1
            locs.append(loc)
        locs += [0] * pad_rows
        return types.SimpleNamespace(
            forward_mode=ForwardMode.DECODE,
            out_cache_loc=torch.tensor(locs, dtype=torch.int64),
            req_pool_indices=torch.tensor(self.rows + [0] * pad_rows, dtype=torch.int64),
            seq_lens=torch.tensor(self.lens + [1] * pad_rows, dtype=torch.int64),
        )

    def dense(self, q, lid, fb):
        """fp32 dense decode attention from the pool (what FlashInfer computes)."""
        kb, vb = self.kv.get_key_buffer(lid), self.kv.get_value_buffer(lid)
        out = torch.empty(q.shape[0], HQ, D)
        for r in range(q.shape[0]):
            n = int(fb.seq_lens[r])
            s = self.rtt[int(fb.req_pool_indices[r]), :n].long()
            k = kb[s].float().repeat_interleave(G, 1)
            v = vb[s].float().repeat_interleave(G, 1)
            w = torch.softmax(torch.einsum("hd,nhd->hn", q[r].float(), k) * SM, -1)
            out[r] = torch.einsum("hn,nhd->hd", w, v)
        return out


@pytest.fixture
def stub_parent(monkeypatch):
    """The parent's FlashInfer prefill -> its KV write only (returns zeros)."""

    def extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        if k is not None and save_kv_cache:
            self.token_to_kv_pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
        return q.new_zeros(q.shape[0], layer.tp_q_head_num * layer.head_dim)

    monkeypatch.setattr(fib.FlashInferAttnBackend, "forward_extend", extend)


def _set_dense_decode(b, drv, fb):
    """FlashInfer decode of the dense layers -> fp32 dense attention of the same batch."""
    w = _StubWrapper()
    w.calls = 0

    def fwd(q, kv_cache, sm_scale, **kw):
        w.calls += 1
        lid = next(l for l in range(LAYERS) if kv_cache[0] is drv.kv.get_key_buffer(l))
        assert sm_scale == SM
        return drv.dense(q, lid, fb).to(q.dtype)

    w.forward_fn = fwd
    b.forward_metadata = fib.DecodeMetadata([w])
    return w


def _fresh_sidecar(kb, n_slots):
    """The sidecar of one layer recomputed from scratch with the torch reference."""
    kq = torch.zeros(n_slots, HKV, D // 2, dtype=torch.uint8)
    ks = torch.zeros(n_slots, HKV, dtype=torch.float16)
    kz = torch.zeros(n_slots, HKV, dtype=torch.float16)
    return (kq, ks, kz) + store_k.bounds_buffers(n_slots // P, HKV, D, "cpu")


def _run_step(env, cfg_kw, twilight_cfg, lens, per_req_p=None, pad_rows=0, seed=0):
    cfg = twilight_cfg(**cfg_kw)
    mr = _runner(env)
    from sglang_twilight.backend import TwilightAttnBackend

    b = TwilightAttnBackend(mr)
    drv = Driver(b, mr, seed=seed)
    for i, n in enumerate(lens):
        drv.prefill(n, row=i + 1)
    if per_req_p is not None:
        for row, p in zip(drv.rows, per_req_p):
            b.twilight.top_p.table[row] = p
    fb = drv.decode_batch(pad_rows=pad_rows)
    wrapper = _set_dense_decode(b, drv, fb)
    outs, qs, kept = {}, {}, {}
    for lay in drv.layers:
        bs = fb.req_pool_indices.shape[0]
        q = drv.rand(bs, HQ * D)
        k, v = drv.rand(bs, HKV, D), drv.rand(bs, HKV, D)
        o = b.forward_decode(q, k, v, lay, fb)
        assert o.shape == (bs, HQ * D) and o.dtype == DTYPE
        outs[lay.layer_id], qs[lay.layer_id] = o.view(bs, HQ, D), q.view(bs, HQ, D)
        if b.twilight.is_sparse(lay.layer_id) and b.twilight.last_kept is not None:
            kept[lay.layer_id] = b.twilight.last_kept.clone()
    return types.SimpleNamespace(cfg=cfg, b=b, drv=drv, fb=fb, outs=outs, qs=qs, kept=kept,
                                 wrapper=wrapper)


def _reference(run, lid):
    """ops.twilight_decode with the torch backend on an independently rebuilt sidecar."""
    drv, fb, cfg, b = run.drv, run.fb, run.cfg, run.b
    kb, vb = drv.kv.get_key_buffer(lid), drv.kv.get_value_buffer(lid)
    side = _fresh_sidecar(kb, kb.shape[0])
    used = torch.cat([drv.rtt[r, :n].long() for r, n in zip(drv.rows, drv.lens)])
    ops.store_sidecar(kb, used.sort().values, ops.SidecarLayer(*side), P, backend="torch")
    p_rows = b.twilight.top_p.table[fb.req_pool_indices]
    return ops.twilight_decode(
        run.qs[lid], kb, vb, ops.SidecarLayer(*side), drv.rtt, fb.req_pool_indices, fb.seq_lens, p_rows,
        budget=b.twilight.budget, page_size=P, sm_scale=SM, min_budget=cfg.min_budget,
        max_budget=cfg.max_budget, min_sparse_len=cfg.min_sparse_len, selector=cfg.selector,
        backend="torch"), side


def test_decode_sparse_matches_torch_reference(sglang_env, twilight_cfg, stub_parent):
    lens = [20, 90, 200, 333]  # the first below min_sparse_len: dense inside the sparse call
    run = _run_step(sglang_env, dict(top_p=0.9, budget=64, min_sparse_len=32, min_budget=8,
                                     max_budget=48, dense_layers=1),
                    twilight_cfg, lens, per_req_p=[0.9, 0.5, 0.95, 0.8])
    n = len(lens)
    # layer 0 is dense: FlashInfer (the stub) got it, and only it
    assert run.wrapper.calls == 1
    torch.testing.assert_close(run.outs[0].float(), run.drv.dense(run.qs[0], 0, run.fb),
                               atol=1e-2, rtol=1e-2)
    for lid in (1, 2):
        (o_ref, kept_ref), side = _reference(run, lid)
        # the sidecar the backend wrote (prefill + this decode step) equals a fresh recompute
        got = run.b.twilight.sidecar.layer(lid).as_tuple()
        for a, e in zip(got, side):
            assert torch.equal(a, e)
        kept = run.kept[lid]
        assert kept.shape == (n, HKV)
        same = (kept == kept_ref).all(dim=1)
        assert int(same.sum()) >= n - 1, (kept, kept_ref)  # near-ties may flip one row
        for r in range(n):
            if bool(same[r]):
                torch.testing.assert_close(run.outs[lid][r].float(), o_ref[r].float(),
                                           atol=2e-2, rtol=2e-2)
        # short request: every token, equal to dense attention
        assert kept[0].tolist() == [lens[0] + 1] * HKV
        torch.testing.assert_close(run.outs[lid][0].float(),
                                   run.drv.dense(run.qs[lid], lid, run.fb)[0], atol=2e-2, rtol=2e-2)
        # long requests are pruned and clamped to [min_budget, max_budget]
        assert bool((kept[1:] <= 48).all()) and bool((kept[1:] >= 8).all())


def test_decode_p1_full_budget_equals_dense(sglang_env, twilight_cfg, stub_parent):
    lens = [17, 100, 250, 31]
    run = _run_step(sglang_env, dict(top_p=1.0, budget=256, min_sparse_len=0, min_budget=1,
                                     dense_layers=1), twilight_cfg, lens, seed=3)
    for lid in (1, 2):
        dense = run.drv.dense(run.qs[lid], lid, run.fb)
        torch.testing.assert_close(run.outs[lid].float(), dense, atol=2e-2, rtol=2e-2)
        assert run.kept[lid].tolist() == [[n + 1] * HKV for n in lens]


def test_dense_way_decodes_every_layer_densely_and_keeps_the_sidecar(sglang_env, twilight_cfg,
                                                                     stub_parent):
    """--twilight-dispatch dense: the sparse layers go through FlashInfer's decode (the stub
    counts the calls) and equal dense attention, and the sidecar of the new slots is written as
    in a sparse step (a later sparse step must find it)."""
    lens = [40, 130, 257]
    run = _run_step(sglang_env, dict(top_p=0.5, budget=64, min_sparse_len=32, min_budget=8,
                                     dense_layers=1, dispatch="dense"), twilight_cfg, lens, seed=7)
    assert not run.b.twilight.step_sparse
    assert run.wrapper.calls == LAYERS  # every layer, the sparse ones too
    assert run.kept == {}  # no Twilight decode ran
    # the sidecars were written once per sparse layer, all of them after the last layer
    assert run.b.twilight.sidecar.rows_written() == {lid: sum(lens) + len(lens) for lid in (1, 2)}
    for lid in range(LAYERS):
        torch.testing.assert_close(run.outs[lid].float(),
                                   run.drv.dense(run.qs[lid], lid, run.fb), atol=1e-2, rtol=1e-2)
    for lid in (1, 2):
        _, side = _reference(run, lid)
        for a, e in zip(run.b.twilight.sidecar.layer(lid).as_tuple(), side):
            assert torch.equal(a, e)


def test_auto_way_follows_the_cost_model_per_step(sglang_env, twilight_cfg, stub_parent,
                                                  monkeypatch):
    """--twilight-dispatch auto: before each decode step the backend asks the cost model with
    the step's context lengths (seq_lens_cpu) and the tokens its requests share (counted by the
    ForwardBatch.init_new hook), and the step runs that way; the way is counted."""
    from sglang.srt.mem_cache.radix_cache import TreeNode

    from sglang_twilight.dispatch import DispatchPolicy, StepCostModel
    from sglang_twilight.srt_patches import shared_prefix

    monkeypatch.setattr(fib.FlashInferAttnBackend, "init_forward_metadata", lambda s, fb: None)
    twilight_cfg(top_p=0.5, budget=64, min_sparse_len=32, min_budget=8, dense_layers=1)
    mr = _runner(sglang_env)
    from sglang_twilight.backend import TwilightAttnBackend

    b = TwilightAttnBackend(mr)
    tw = b.twilight
    # dense costs 1 ms per 100 context tokens (half of it only once per distinct token),
    # sparse a flat 2 ms: sparse from 200 tokens on, unless the requests share a prefix
    model = StepCostModel(card="cpu", dense=(0.0, 0.0, 0.005, 0.0, 0.005),
                          sparse=(2.0, 0.0, 0.0, 0.0, 0.0), margin=0.0, **tw.geometry())
    tw.policy = DispatchPolicy("auto", model, tw.budget)
    shared_prefix.want(tw, True)  # as the constructor does for a model that prices sharing
    drv = Driver(b, mr, seed=4)
    drv.prefill(60, row=1)
    fb = drv.decode_batch()
    fb.seq_lens_cpu, fb.batch_size = fb.seq_lens.clone(), 1
    b.init_forward_metadata(fb)
    assert tw.step_sparse is False and tw.kept_stats.steps == {"sparse": 0, "dense": 1}
    drv.prefill(250, row=2)
    fb = drv.decode_batch()
    fb.seq_lens_cpu, fb.batch_size = fb.seq_lens.clone(), 2
    b.init_forward_metadata(fb)
    assert tw.step_sparse is True and tw.kept_stats.steps == {"sparse": 1, "dense": 1}
    wrapper = _set_dense_decode(b, drv, fb)
    for lay in drv.layers:
        b.forward_decode(drv.rand(2, HQ * D), drv.rand(2, HKV, D), drv.rand(2, HKV, D), lay, fb)
    assert wrapper.calls == 1  # only the dense layer 0
    # the same two requests, now as if both held one cached 60-token prefix in the radix
    # tree: 315 tokens, 255 distinct -> 2.85 ms dense, sparse still; a 250-token one -> dense
    for prefix, sparse in ((60, True), (250, False)):
        root, node = TreeNode(), TreeNode()
        node.parent, node.key = root, list(range(prefix))
        batch = types.SimpleNamespace(forward_mode=ForwardMode.DECODE, reqs=[
            types.SimpleNamespace(last_node=node), types.SimpleNamespace(last_node=node)])
        shared_prefix._init_new_hook(None, None, batch)
        fb = drv.decode_batch()
        fb.seq_lens_cpu, fb.batch_size = fb.seq_lens.clone(), 2
        b.init_forward_metadata(fb)
        assert tw.step_shared == prefix and tw.step_sparse is sparse
    # a CUDA-graph replay's view: padded to 4 rows, 2 of them real
    shared_prefix._init_new_hook(None, None, batch)
    fb = drv.decode_batch(pad_rows=2)
    fb.seq_lens_cpu, fb.batch_size, fb.num_padding = fb.seq_lens.clone(), 4, 2
    b.init_forward_metadata(fb)
    assert tw.step_shared == 250 and tw.step_sparse is False
    # no count for this step (e.g. taken already): nothing shared, 319 tokens -> sparse
    fb = drv.decode_batch()
    fb.seq_lens_cpu, fb.batch_size = fb.seq_lens.clone(), 2
    b.init_forward_metadata(fb)
    assert tw.step_shared == 0 and tw.step_sparse is True
    shared_prefix.want(tw, False)


def test_graph_padding_rows(sglang_env, twilight_cfg, stub_parent):
    """Padded rows of a CUDA-graph batch (req row 0, slot 0, seq_len 1) are harmless: one kept
    token, finite output, real rows unchanged."""
    lens = [60, 120]
    kw = dict(top_p=0.9, budget=64, min_sparse_len=32, min_budget=8, dense_layers=1)
    run = _run_step(sglang_env, kw, twilight_cfg, lens, pad_rows=2, seed=5)
    for lid in (1, 2):
        assert run.kept[lid][2:].tolist() == [[1] * HKV] * 2
        assert bool(torch.isfinite(run.outs[lid].float()).all())
        (o_ref, kept_ref), _ = _reference(run, lid)
        torch.testing.assert_close(run.outs[lid][:2].float(), o_ref[:2].float(),
                                   atol=2e-2, rtol=2e-2)


def test_chunked_rows_equal_one_pass(sglang_env, twilight_cfg, stub_parent):
    """A batch larger than the workspace runs in static chunks with the same result."""
    from sglang_twilight.backend import workspace_bytes

    lens = [40, 130, 77, 210, 95]
    kw = dict(top_p=0.85, budget=64, min_sparse_len=32, min_budget=8, dense_layers=1)
    run = _run_step(sglang_env, kw, twilight_cfg, lens, seed=7)
    tw = run.b.twilight
    assert tw.workspace.max_rows >= len(lens)
    big = {lid: run.outs[lid] for lid in (1, 2)}
    tw.workspace = None
    tw.workspace_limit_bytes = workspace_bytes(2, HKV, G, D, tw.budget, tw.max_context, P)
    for lid in (1, 2):
        o = tw.decode(run.qs[lid], lid, SM, run.fb.req_pool_indices, run.fb.seq_lens)
        assert tw.workspace.max_rows == 2
        torch.testing.assert_close(o.float(), big[lid].float(), atol=1e-3, rtol=1e-3)
        assert torch.equal(tw.last_kept, run.kept[lid])


def test_extend_writes_only_new_slots(sglang_env, twilight_cfg, stub_parent):
    """A request that continues on another's cached full pages (prefix hit / next chunk) writes
    sidecar rows for its own new slots only; the shared rows stay bit-identical."""
    twilight_cfg(budget=64, min_sparse_len=32, min_budget=8, dense_layers=1)
    mr = _runner(sglang_env)
    from sglang_twilight.backend import TwilightAttnBackend

    b = TwilightAttnBackend(mr)
    drv = Driver(b, mr, seed=11)
    drv.prefill(64, row=1)
    side = b.twilight.sidecar
    assert side.rows_written() == {1: 64, 2: 64}
    before = [t.clone() for t in side.layer(1).as_tuple()]
    shared = drv.rtt[1, :48].clone()  # 3 full pages
    new = drv.alloc.alloc(2 * P)[:20]
    drv.rtt[2, :48] = shared
    drv.rtt[2, 48:68] = new.to(torch.int32)
    fb = types.SimpleNamespace(out_cache_loc=new.to(torch.int64), forward_mode=ForwardMode.EXTEND)
    for lay in drv.layers:
        b.forward_extend(drv.rand(20, HQ * D), drv.rand(20, HKV, D), drv.rand(20, HKV, D), lay, fb)
    assert side.rows_written() == {1: 84, 2: 84}  # dense layer 0 has no sidecar
    assert b.twilight.prefill_rows.total == 84  # what the server's prefill-rows gauge shows
    after = side.layer(1).as_tuple()
    s = shared.long()
    assert torch.equal(after[0][s], before[0][s]) and torch.equal(after[1][s], before[1][s])
    pages = torch.unique(s // P)
    assert torch.equal(after[3][pages], before[3][pages]) and torch.equal(after[4][pages],
                                                                          before[4][pages])


def test_step_hooks_and_stats(sglang_env, twilight_cfg, stub_parent, monkeypatch):
    """on_step runs once per decode step on the host (eager: init_forward_metadata; graphs: the
    replay's init_forward_metadata_out_graph, not at capture), and the step's way is counted;
    a layer's kept counts are staged once per sparse layer and committed once per step, after
    the last sparse layer, with the real rows."""
    twilight_cfg(budget=64, min_sparse_len=32, min_budget=8, dense_layers=1, dispatch="sparse")
    monkeypatch.setattr(fib.FlashInferAttnBackend, "init_forward_metadata", lambda s, fb: None)
    monkeypatch.setattr(fib.FlashInferAttnBackend, "init_forward_metadata_out_graph",
                        lambda s, fb, in_capture=False: None)
    mr = _runner(sglang_env)
    from sglang_twilight.backend import TwilightAttnBackend

    b = TwilightAttnBackend(mr)

    class Rec:
        steps, resets, records, ways = 0, 0, [], []

        def on_step(self):
            Rec.steps += 1

        def reset(self):
            Rec.resets += 1

        def count_step(self, sparse):
            Rec.ways.append(sparse)

        def stage(self, layer_id, kept, bs):
            Rec.records.append((layer_id, tuple(kept.shape), bs))

        def commit(self, bs, num_valid_rows=None, seq_lens=None):
            Rec.records.append(("commit", bs, int(num_valid_rows), tuple(seq_lens.tolist())))

    b.twilight.kept_stats = Rec()
    dec = types.SimpleNamespace(forward_mode=ForwardMode.DECODE)
    ext = types.SimpleNamespace(forward_mode=ForwardMode.EXTEND)
    b.init_forward_metadata(dec)
    b.init_forward_metadata(ext)
    b.init_forward_metadata_out_graph(dec, in_capture=True)
    b.init_forward_metadata_out_graph(dec)
    b.init_forward_metadata_out_graph(ext)
    assert Rec.steps == 2 and Rec.ways == [True, True]
    assert Rec.resets == 1  # the stats recorded while capturing are dropped once
    drv = Driver(b, mr, seed=2)
    drv.prefill(50, row=1)
    drv.prefill(70, row=2)
    fb = drv.decode_batch(pad_rows=1)  # a padded graph row is not counted
    _set_dense_decode(b, drv, fb)
    for lay in drv.layers:
        b.forward_decode(drv.rand(3, HQ * D), drv.rand(3, HKV, D), drv.rand(3, HKV, D), lay, fb)
    lens = tuple(fb.seq_lens.tolist())
    assert Rec.records == [(1, (3, HKV), 3), (2, (3, HKV), 3), ("commit", 3, 2, lens)]


def test_warm_up_runs_every_store_specialization(sglang_env, twilight_cfg, monkeypatch):
    """The backend compiles the store kernel for 1, a multiple of 16 and other token counts when
    it is built (not in the first long prefill), and leaves the row counters at zero."""
    seen, seen_all = [], []
    real, real_all = ops.store_sidecar, ops.store_sidecar_layers

    def spy(k_buffer, loc, *a, **kw):
        seen.append(int(loc.numel()))
        return real(k_buffer, loc, *a, **kw)

    def spy_all(layers, loc, *a, **kw):
        seen_all.append((len(layers), int(loc.numel())))
        return real_all(layers, loc, *a, **kw)

    monkeypatch.setattr(ops, "store_sidecar", spy)
    monkeypatch.setattr(ops, "store_sidecar_layers", spy_all)
    twilight_cfg(budget=64, min_sparse_len=32, min_budget=8, dense_layers=1)
    from sglang_twilight.backend import TwilightAttnBackend

    b = TwilightAttnBackend(_runner(sglang_env))
    assert seen == [1, 16, 17]
    assert seen_all == [(2, 1), (2, 16), (2, 17)]  # the dense-way store of both sparse layers
    assert b.twilight.sidecar.rows_written() == {1: 0, 2: 0}


# --------------------------------------------------------------------------- mixed chunks, memory


def test_mixed_chunk_decode_rows_dense_and_sidecar_written(sglang_env, twilight_cfg, stub_parent):
    """--enable-mixed-chunk: SGLang merges running decode requests into a prefill batch
    (ScheduleBatch.mix_with_running: ForwardMode.MIXED, the decode rows' new slots appended to
    out_cache_loc), and AttentionBackend.forward sends MIXED to forward_extend. The decode rows
    there get FlashInfer's dense prefill attention (documented: no Twilight decode runs), and the
    sidecar of their new slots is written with the prefill's, so the next pure decode step equals
    the reference on a sidecar rebuilt from scratch."""
    assert ForwardMode.MIXED.is_extend() and not ForwardMode.MIXED.is_decode()
    cfg = twilight_cfg(top_p=0.85, budget=64, min_sparse_len=32, min_budget=8, dense_layers=1)
    mr = _runner(sglang_env)
    from sglang_twilight.backend import TwilightAttnBackend

    b = TwilightAttnBackend(mr)
    drv = Driver(b, mr, seed=21)
    drv.prefill(150, row=1)
    drv.prefill(95, row=2)
    # the mixed batch: a new request's first 40 tokens, then one decode token per running request
    new = drv.alloc.alloc(3 * P)[:40]
    drv.rtt[3, :40] = new.to(torch.int32)
    dec = drv.decode_batch()  # the running rows' new slots (alloc_decode's rule)
    fb = types.SimpleNamespace(forward_mode=ForwardMode.MIXED,
                               out_cache_loc=torch.cat([new.to(torch.int64), dec.out_cache_loc]))
    n_tok = fb.out_cache_loc.numel()

    def no_sparse_decode(*a, **k):
        raise AssertionError("a Twilight decode ran in a mixed batch")

    b.twilight.decode = no_sparse_decode  # on the instance: the class's comes back with del
    side = b.twilight.sidecar
    before = side.rows_written()
    for lay in drv.layers:
        o = b.forward(drv.rand(n_tok, HQ * D), drv.rand(n_tok, HKV, D), drv.rand(n_tok, HKV, D),
                      lay, fb)
        assert torch.equal(o, torch.zeros(n_tok, HQ * D, dtype=DTYPE))  # the parent's output
    assert side.rows_written() == {lid: before[lid] + n_tok for lid in (1, 2)}
    drv.rows.append(3)
    drv.lens.append(40)
    del b.twilight.decode  # the sparse decode back for the next, pure decode step
    fb2 = drv.decode_batch()
    _set_dense_decode(b, drv, fb2)
    outs, qs, kept = {}, {}, {}
    for lay in drv.layers:
        q = drv.rand(3, HQ * D)
        outs[lay.layer_id] = b.forward(q, drv.rand(3, HKV, D), drv.rand(3, HKV, D), lay,
                                       fb2).view(3, HQ, D)
        qs[lay.layer_id] = q.view(3, HQ, D)
        if b.twilight.is_sparse(lay.layer_id):
            kept[lay.layer_id] = b.twilight.last_kept.clone()
    run = types.SimpleNamespace(cfg=cfg, b=b, drv=drv, fb=fb2, qs=qs)
    for lid in (1, 2):
        (o_ref, kept_ref), fresh = _reference(run, lid)
        for a, e in zip(side.layer(lid).as_tuple(), fresh):
            assert torch.equal(a, e)  # the mixed step's decode slots included
        same = (kept[lid] == kept_ref).all(dim=1)
        assert int(same.sum()) >= 2, (kept[lid], kept_ref)  # near-ties may flip one row
        for r in range(3):
            if bool(same[r]):
                torch.testing.assert_close(outs[lid][r].float(), o_ref[r].float(), atol=2e-2,
                                           rtol=2e-2)


def test_eager_workspace_within_the_reserved_bytes(sglang_env, twilight_cfg, monkeypatch):
    """The KV budget reserves (srt_patches.pool_sizing) exactly the workspace this backend builds
    for eager decode, computed from SGLang's ServerArgs and ModelConfig alone: the same bytes for
    the backend's own row count, and the backend's rows within the bound the reserve uses."""
    from sglang.srt.mem_cache.allocation_sizing import get_req_to_token_extra_context_len

    from sglang_twilight.srt_patches import pool_sizing as ps
    from tests.test_pool_sizing import _kvc

    sa = sglang_env.server_args
    cfg = twilight_cfg(budget=64, min_sparse_len=32, min_budget=8, dense_layers=1)
    width = sglang_env.model_config.context_len + get_req_to_token_extra_context_len(sa)
    rtp = ReqToTokenPool(size=REQ_SLOTS, max_context_len=width, device="cpu",
                         enable_memory_saver=False)
    b = _backend(sglang_env, req_to_token_pool=rtp)
    tw = b.twilight
    nbytes = tw.ensure_workspace().nbytes()
    assert tw.max_rows <= ps.eager_rows_bound(sa)
    monkeypatch.setattr(ps, "eager_rows_bound", lambda server_args: tw.max_rows)
    kvc = _kvc(sa, sglang_env.model_config, 0, LAYERS)
    assert ps.workspace_reserve_bytes(kvc, cfg) == nbytes


@pytest.mark.parametrize("dispatch", ["auto", "sparse"])
def test_both_ways_of_a_batch_size_share_the_flashinfer_wrappers(sglang_env, twilight_cfg,
                                                                  dispatch, monkeypatch):
    """Under --twilight-dispatch auto a decode batch size is captured twice (dense and sparse
    way); both graphs must use the one set of FlashInfer wrappers the replay plans into. The
    parent makes new wrappers per capture, which left the first graph on its capture-time plan."""
    twilight_cfg(budget=64, min_sparse_len=32, min_budget=8, dense_layers=1, dispatch=dispatch)
    mr = _runner(sglang_env)
    from sglang_twilight.backend import TwilightAttnBackend

    b = TwilightAttnBackend(mr)
    # FlashInfer's graph wrappers need CUDA buffers: a fresh stand-in list per creation
    monkeypatch.setattr(fib.FlashInferAttnBackend, "_create_decode_wrappers",
                        lambda self, bs, num_tokens: [_StubWrapper(use_cuda_graph=True)])
    b._prepare_cuda_graph_metadata(4, 4, ForwardMode.DECODE, None)
    first = b.decode_cuda_graph_metadata[4]
    assert b.forward_metadata.decode_wrappers is first
    b._prepare_cuda_graph_metadata(4, 4, ForwardMode.DECODE, None)
    again = b.decode_cuda_graph_metadata[4]
    if dispatch == "auto":
        assert again is first and b.forward_metadata.decode_wrappers is first
    else:  # one capture per size: SGLang's own behaviour, untouched
        assert again is not first
    b._prepare_cuda_graph_metadata(2, 2, ForwardMode.DECODE, None)  # another size: its own
    assert b.decode_cuda_graph_metadata[2] is not first
