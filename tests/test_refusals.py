"""What the twilight backend refuses at startup, and the limits behind each refusal.

* Every SGLang 0.5.17 setup that fills KV slots without the attention backend (so the sidecar of
  those slots would go stale, and the sparse decode would select with stale keys) is refused by
  ``check_server_args`` with one line naming the flag (docs/SGLANG_SURFACE.md section 7 lists
  them, and the paths that are safe). The ServerArgs here are SGLang's real ones, built with the
  flag, so SGLang's own resolution runs first.
* ``--enable-deterministic-inference``: refused (SGLang itself refuses a backend it does not know
  as deterministic; ``check_server_args`` refuses it too, naming the flag).
* head dims the kernels do not compile for: refused by ``check_model`` / ``check_layer``; the
  ones they do are run through the kernels (Triton's interpreter on CPU, CUDA on the GPU).
* ``--twilight-budget`` must exceed one page: the selection always keeps the sink page and the
  current page, so the smallest budget the config accepts attends the newest tokens.
* the sidecar is allocated in the KV pool's memory-saver region (``--enable-memory-saver``).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from sglang_twilight import ops
from sglang_twilight.config import TwilightConfig, TwilightConfigError
from tests.models import write_tiny_llama
from tests.pools import make_layout

P = 16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama folder (config.json only) and the plugin registered (twilight is a choice)."""
    from sglang_twilight import plugin

    plugin.register()
    return write_tiny_llama(tmp_path_factory.mktemp("tiny"), hidden_size=256,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                            num_hidden_layers=3, max_position_embeddings=512)


def _server_args(model_path, **flags):
    from sglang.srt.server_args import ServerArgs

    return ServerArgs(model_path=model_path, attention_backend="twilight", device="cpu",
                      page_size=P, **flags)


def _copy_with(sa, **changes):
    sa = copy.copy(sa)
    for k, v in changes.items():
        object.__setattr__(sa, k, v)
    return sa


def _refused(sa, flag, environ=None):
    from sglang_twilight.backend import TwilightUnsupportedError, check_server_args

    with pytest.raises(TwilightUnsupportedError) as ei:
        check_server_args(sa, TwilightConfig().validate(), environ=environ or {})
    msg = str(ei.value)
    assert msg.startswith(flag + ":") and "\n" not in msg, msg
    assert "twilight" in msg
    return msg


# --------------------------------------------------------------------------- KV outside the backend

# built with the flag by SGLang's own ServerArgs (its resolution keeps them)
KV_BYPASS = [
    (dict(enable_flexkv=True), "--enable-flexkv"),
    (dict(radix_cache_backend="flexkv"), "--radix-cache-backend"),
    (dict(hicache_storage_backend="file"), "--hicache-storage-backend"),
    (dict(hicache_storage_backend="mooncake"), "--hicache-storage-backend"),
    (dict(attn_cp_size=2, tp_size=2), "--attn-cp-size"),
    (dict(enable_prefill_cp=True, cp_strategy="zigzag"), "--enable-prefill-cp"),
    (dict(decoupled_spec_role="target"), "--decoupled-spec-role"),
]


@pytest.mark.parametrize("flags,flag", KV_BYPASS, ids=[f"{f}={list(d.values())[0]}" for d, f in KV_BYPASS])
def test_kv_bypass_refused(tiny, flags, flag):
    sa = _server_args(tiny, **flags)
    for k, v in flags.items():
        assert getattr(sa, k) == v  # SGLang kept the setting: the backend is the one to refuse
    _refused(sa, flag)


# SGLang refuses these itself with the twilight backend (an AssertionError/ValueError while it
# resolves its arguments); check_server_args refuses them too, in case SGLang stops doing so
SGLANG_REFUSES_TOO = [
    (dict(enable_deterministic_inference=True), "--enable-deterministic-inference"),
    (dict(enable_unified_memory=True), "--enable-unified-memory"),
    (dict(enable_page_major_kv_layout=True), "--enable-page-major-kv-layout"),
    (dict(prefill_only_disable_kv_cache=True), "--prefill-only-disable-kv-cache"),
]


@pytest.mark.parametrize("flags,flag", SGLANG_REFUSES_TOO, ids=[f for _, f in SGLANG_REFUSES_TOO])
def test_refused_by_sglang_and_by_the_backend(tiny, flags, flag):
    with pytest.raises((ValueError, AssertionError)):
        _server_args(tiny, **flags)
    _refused(_copy_with(_server_args(tiny), **flags), flag)


def test_deterministic_inference_refused_by_name(tiny):
    """SGLang's own refusal names the backend; ours names the flag and the reason."""
    with pytest.raises(ValueError, match="twilight"):
        _server_args(tiny, enable_deterministic_inference=True)
    msg = _refused(_copy_with(_server_args(tiny), enable_deterministic_inference=True),
                   "--enable-deterministic-inference")
    assert "batch" in msg


@pytest.mark.parametrize("var", [
    "SGLANG_KV_CANARY_PERTURB_REAL_KV_USED_PROB",
    "SGLANG_KV_CANARY_PERTURB_REAL_KV_UNUSED_CACHE_PROB",
    "SGLANG_KV_CANARY_PERTURB_REAL_KV_POST_FORWARD_PROB",
])
def test_kv_fault_injection_refused(tiny, var):
    from sglang_twilight.backend import check_server_args

    sa = _server_args(tiny, kv_canary="log")
    _refused(sa, var, environ={var: "0.01"})
    check_server_args(sa, TwilightConfig().validate(), environ={var: "0"})


# documented safe (docs/SGLANG_SURFACE.md section 7): every KV slot they hand to a request was
# written through the backend, or (memory saver) is written again before it is read
SAFE = [
    dict(enable_mixed_chunk=True),
    dict(enable_memory_saver=True),
    dict(disable_radix_cache=True),
    dict(kv_canary="log"),
    dict(enable_streaming_session=True),
    dict(enable_two_batch_overlap=True),
]


@pytest.mark.parametrize("flags", SAFE, ids=[list(d)[0] for d in SAFE])
def test_safe_setups_pass(tiny, flags):
    from sglang_twilight.backend import check_server_args

    check_server_args(_server_args(tiny, **flags), TwilightConfig().validate(), environ={})


# --------------------------------------------------------------------------- head_dim


def _runner_for(mc, head_dim, layers=2):
    """What check_model reads of SGLang's ModelRunner, with SGLang's real pool and layers."""
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    kv = MHATokenToKVPool(4 * P, page_size=P, dtype=torch.bfloat16, head_num=2,
                          head_dim=head_dim, layer_num=layers, device="cpu",
                          enable_memory_saver=False)
    model = torch.nn.ModuleList(
        [RadixAttention(4, head_dim, head_dim ** -0.5, 2, i) for i in range(layers)])
    return types.SimpleNamespace(model_config=mc, use_mla_backend=False, sliding_window_size=None,
                                 kv_cache_dtype=torch.bfloat16, token_to_kv_pool=kv, model=model)


@pytest.mark.parametrize("head_dim", [16, 48, 80, 96, 112, 192, 1024])
def test_head_dim_refused(tmp_path, head_dim):
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.layers.radix_attention import RadixAttention

    from sglang_twilight.backend import check_layer, check_model
    from sglang_twilight import plugin

    plugin.register()
    d = write_tiny_llama(tmp_path, hidden_size=4 * head_dim, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=head_dim)
    mc = ModelConfig.from_server_args(_server_args(d))
    assert mc.head_dim == head_dim
    from sglang_twilight.backend import TwilightUnsupportedError

    with pytest.raises(TwilightUnsupportedError) as ei:
        check_model(_runner_for(mc, head_dim))
    msg = str(ei.value)
    assert msg.startswith("--model-path:") and f"head_dim {head_dim}" in msg and "\n" not in msg
    assert "32, 64, 128, 256, 512" in msg
    with pytest.raises(TwilightUnsupportedError, match=f"layer 3 has head_dim {head_dim}"):
        check_layer(RadixAttention(4, head_dim, 0.1, 2, 3))


@pytest.mark.parametrize("head_dim", [32, 64, 128, 256, 512])
def test_head_dim_supported(tmp_path, head_dim):
    from sglang.srt.configs.model_config import ModelConfig

    from sglang_twilight.backend import SUPPORTED_HEAD_DIMS, check_model
    from sglang_twilight import plugin

    plugin.register()
    assert head_dim in SUPPORTED_HEAD_DIMS
    d = write_tiny_llama(tmp_path, hidden_size=4 * head_dim, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=head_dim)
    check_model(_runner_for(ModelConfig.from_server_args(_server_args(d)), head_dim))


def _decode_at(head_dim, device, backend, seed):
    """One decode step at ``head_dim`` through ops.twilight_decode (p < 1, a budget that prunes),
    and its torch reference on the same inputs."""
    lens = [70, 200, 33]
    lay = make_layout(lens, 2, 2, head_dim, device=device, peaked=6.0, seed=seed, backend=backend)
    p = torch.tensor([0.9, 0.8, 0.95], device=device)
    kw = dict(budget=64, page_size=P, sm_scale=head_dim ** -0.5, min_budget=8, max_budget=0,
              min_sparse_len=40)
    args = (lay.q, lay.k_buffer, lay.v_buffer, lay.sidecar, lay.req_to_token,
            lay.req_pool_indices, lay.seq_lens, p)
    got = ops.twilight_decode(*args, backend=backend, **kw)
    ref = ops.twilight_decode(*args, backend="torch", **kw)
    return got, ref


@pytest.mark.parametrize("head_dim", [32, 512])
def test_kernels_at_the_head_dim_bounds_cpu(head_dim):
    """The smallest and largest supported head_dim through the Triton kernels (interpreted on
    CPU): same kept counts and outputs as the torch reference."""
    if torch.cuda.is_available():
        pytest.skip("the GPU variant below runs them compiled")
    (o, kc), (o_ref, kc_ref) = _decode_at(head_dim, "cpu", "triton", seed=head_dim)
    assert torch.equal(kc, kc_ref), (kc, kc_ref)
    torch.testing.assert_close(o.float(), o_ref.float(), atol=2e-2, rtol=2e-2)


# Every kernel the backend launches, compiled for the A100 (sm80) and the H100 (sm90) without a GPU
# (tests/test_sm80.py's compile run, at other head dims): the bounds of SUPPORTED_HEAD_DIMS and
# the dims just outside them
HEAD_DIM_COMPILE = textwrap.dedent(
    """
    import json, sys
    import tests.test_sm80 as T
    cap = int(sys.argv[1])
    for d in [int(x) for x in sys.argv[2].split(",")]:
        T.MODELS = {"m": (2, 4, d, 4096)}
        T.CASES = [("m", "bf16", 8, 1024, 16, "quest")]
        T.STORE_TOKENS = (1, 17)
        try:
            recs = T._compile_all(cap)
        except Exception as e:  # Triton refuses the kernel source at this head_dim
            print(json.dumps(dict(head_dim=d, error=type(e).__name__)), flush=True)
            continue
        problems = sorted({f"{r['kernel']}: {p}" for r in recs for p in r["problems"]})
        print(json.dumps(dict(head_dim=d, kernels=len({r["kernel"] for r in recs}),
                              problems=problems)), flush=True)
    """
)


def test_head_dim_bounds_compile_for_a100_and_h100(tmp_path):
    """32 and 512 (the ends of SUPPORTED_HEAD_DIMS) compile for sm80 and sm90 and fit the cards'
    shared memory and registers; 16 and 96 do not compile; 1024 compiles but its attend kernel
    needs more shared memory than either card has. No GPU needed."""
    from sglang_twilight.backend import SUPPORTED_HEAD_DIMS

    assert (min(SUPPORTED_HEAD_DIMS), max(SUPPORTED_HEAD_DIMS)) == (32, 512)
    procs = {}
    for cap in (80, 90):
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        env["TRITON_CACHE_DIR"] = str(tmp_path / f"triton-sm{cap}")
        env["CUDA_VISIBLE_DEVICES"] = ""
        procs[cap] = subprocess.Popen(
            [sys.executable, "-c", HEAD_DIM_COMPILE, str(cap), "32,512,16,96,1024"], env=env,
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for cap, proc in procs.items():
        out, err = proc.communicate(timeout=1800)
        assert proc.returncode == 0, err[-4000:]
        got = {r["head_dim"]: r for r in map(json.loads, (x for x in out.splitlines()
                                                          if x.startswith("{")))}
        for d in (32, 512):
            assert "error" not in got[d] and got[d]["kernels"] >= 6 and not got[d]["problems"], (
                cap, got[d])
        assert "error" in got[16] and "error" in got[96], (cap, got[16], got[96])
        assert any("attend" in p and "shared memory" in p for p in got[1024]["problems"]), (
            cap, got[1024])


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [32, 64, 128, 256, 512])
def test_kernels_compile_at_supported_head_dims(head_dim):
    """Every head_dim check_model admits runs on this GPU and matches the reference."""
    (o, kc), (o_ref, kc_ref) = _decode_at(head_dim, "cuda", "triton", seed=head_dim)
    torch.cuda.synchronize()
    same = (kc == kc_ref).all(dim=1)
    assert int(same.sum()) >= kc.shape[0] - 1, (kc, kc_ref)  # a near-tie may flip one row
    for r in range(kc.shape[0]):
        if bool(same[r]):
            torch.testing.assert_close(o[r].float(), o_ref[r].float(), atol=2e-2, rtol=2e-2)


# --------------------------------------------------------------------------- the smallest budget


def _accepted(budget, page):
    try:
        TwilightConfig(budget=budget, page_size=page, min_sparse_len=0, min_budget=1).validate()
        return True
    except TwilightConfigError:
        return False


@pytest.mark.parametrize("page", [8, 16])
def test_every_accepted_budget_keeps_sink_and_current_page(page):
    """For the budgets around the smallest the config accepts, those it accepts select, in the
    Quest selection (torch reference and Triton kernel) of long requests, the sink page and the
    current page - the newest tokens - of every (request, KV head). A one-page budget, were it
    accepted, fails here: its one candidate page is the sink."""
    lens = [page * 9 + 3, page * 6, page * 2 + 1, page * 11 + page - 1]
    lay = make_layout(lens, 2, 3, 64, page_size=page, peaked=6.0, seed=page)
    rows = lay.req_to_token[lay.req_pool_indices.long()]
    checked = 0
    for budget in (1, page - 1, page, page + 1, 2 * page, 2 * page + 1, 3 * page):
        if not _accepted(budget, page):
            assert budget <= page
            continue
        for backend in ("torch", "triton"):
            slots, counts = ops.quest_select(lay.q, lay.kmax, lay.kmin, lay.kbscale,
                                             lay.req_to_token, lay.req_pool_indices, lay.seq_lens,
                                             budget, page, backend=backend)
            for r, n in enumerate(lens):
                sink = set(rows[r, :min(page, n)].tolist())
                current = set(rows[r, (n - 1) // page * page:n].tolist())
                for h in range(2):
                    got = set(slots[r, h, :int(counts[r, h])].tolist())
                    assert sink <= got and current <= got, (budget, backend, r, h)
            checked += 1
    assert checked == 2 * 4  # four accepted budgets, both backends


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_smallest_budget_attends_sink_and_current_page(backend):
    """At the smallest accepted budget (one token over a page: two pages of candidates) and p = 1,
    a long request's decode output is attention over exactly its sink page and its current
    page, newest token included."""
    page = P
    budget = page + 1
    assert _accepted(budget, page) and not _accepted(page, page)
    lens = [page * 7 + 5, page * 4 + 1]
    lay = make_layout(lens, 2, 2, 64, page_size=page, seed=3)
    sm = 64 ** -0.5
    o, kc = ops.twilight_decode(lay.q, lay.k_buffer, lay.v_buffer, lay.sidecar, lay.req_to_token,
                                lay.req_pool_indices, lay.seq_lens, budget=budget,
                                page_size=page, sm_scale=sm, quest_only=True, backend=backend)
    rows = lay.req_to_token[lay.req_pool_indices.long()]
    for r, n in enumerate(lens):
        last = (n - 1) // page * page
        keep = torch.cat([rows[r, :page], rows[r, last:n]]).long()
        assert kc[r].tolist() == [keep.numel()] * 2
        k = lay.k_buffer[keep].float().repeat_interleave(2, 1)
        v = lay.v_buffer[keep].float().repeat_interleave(2, 1)
        w = torch.softmax(torch.einsum("hd,nhd->hn", lay.q[r].float(), k) * sm, -1)
        want = torch.einsum("hn,nhd->hd", w, v)
        torch.testing.assert_close(o[r].float(), want, atol=2e-2, rtol=2e-2)


# --------------------------------------------------------------------------- memory saver


class _RecordingSaver:
    """Stands in for torch_memory_saver's adapter on CPU (the real one needs CUDA; the GPU test
    below uses it): records the region tags entered and whether a region is open."""

    enabled = True

    def __init__(self):
        self.tags, self.open = [], False

    def region(self, tag, enable_cpu_backup=False):
        from contextlib import contextmanager

        @contextmanager
        def cm():
            self.tags.append(tag)
            self.open = True
            try:
                yield
            finally:
                self.open = False

        return cm()


def test_sidecar_allocated_in_the_kv_region(monkeypatch):
    """Every sidecar buffer is allocated while the KV pool's memory-saver region for the KV cache
    is open (what --enable-memory-saver releases and resumes); with the memory saver off, no
    region at all."""
    from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from sglang_twilight import sidecar as S

    kv = MHATokenToKVPool(4 * P, page_size=P, dtype=torch.bfloat16, head_num=2, head_dim=64,
                          layer_num=3, device="cpu", enable_memory_saver=False)
    saver = _RecordingSaver()
    kv.memory_saver_adapter = saver
    inside = []
    for name in ("code_buffer", "scale_zero_buffers", "bounds_buffers"):
        real = getattr(S, name)

        def spy(*a, _real=real, **k):
            inside.append(saver.open)
            return _real(*a, **k)

        monkeypatch.setattr(S, name, spy)
    side = S.attach_sidecar(kv, TwilightConfig(dense_layers=1).validate())
    assert side.sparse_layer_ids == [1, 2]
    assert saver.tags == [GPU_MEMORY_TYPE_KV_CACHE]
    assert inside == [True] * 6 and not saver.open
    # memory saver off (SGLang's no-op adapter): no region entered, same buffers
    kv2 = MHATokenToKVPool(4 * P, page_size=P, dtype=torch.bfloat16, head_num=2, head_dim=64,
                           layer_num=3, device="cpu", enable_memory_saver=False)
    assert not kv2.memory_saver_adapter.enabled
    assert S.attach_sidecar(kv2, TwilightConfig(dense_layers=1).validate()).nbytes() == side.nbytes()


@pytest.mark.gpu
def test_memory_saver_releases_and_restores_the_sidecar():
    """With SGLang's real memory saver (torch_memory_saver) on a CUDA KV pool: pausing the KV
    cache tag frees the sidecar's bytes with the KV pool's, resuming maps them back at the same
    addresses, and the sidecar is written and read correctly afterwards. Runs in a fresh process
    (the memory saver must be set up before CUDA allocates)."""
    code = textwrap.dedent(
        """
        import json, sys, torch
        sys.path.insert(0, sys.argv[1])
        import torch_memory_saver
        torch_memory_saver.torch_memory_saver.hook_mode = "torch"
        from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
        from sglang_twilight.config import TwilightConfig
        from sglang_twilight.sidecar import TwilightSidecarPool, attach_sidecar
        P = 16
        kv = MHATokenToKVPool(1 << 18, page_size=P, dtype=torch.bfloat16, head_num=8,
                              head_dim=128, layer_num=4, device="cuda", enable_memory_saver=True)
        side = attach_sidecar(kv, TwilightConfig(dense_layers=0).validate())
        ptrs = [t.data_ptr() for t in side.layer(1).as_tuple()]
        torch.cuda.synchronize()
        def free():
            torch.cuda.synchronize()
            return torch.cuda.mem_get_info()[0]
        kv_bytes = kv.get_kv_size_bytes()
        kv_bytes = sum(kv_bytes) if isinstance(kv_bytes, tuple) else kv_bytes
        f0 = free()
        kv.memory_saver_adapter.pause(GPU_MEMORY_TYPE_KV_CACHE)
        f1 = free()
        kv.memory_saver_adapter.resume(GPU_MEMORY_TYPE_KV_CACHE)
        f2 = free()
        same = ptrs == [t.data_ptr() for t in side.layer(1).as_tuple()]
        loc = torch.arange(P, 3 * P, device="cuda")
        kb = kv.get_key_buffer(1)
        kb[loc] = torch.randn(loc.numel(), 8, 128, device="cuda").to(kb.dtype)
        side.write(1, loc)
        # the same rows written by the torch reference into a fresh sidecar outside any region
        fresh = TwilightSidecarPool(side.num_slots, 8, 128, torch.bfloat16, [1], P, "cuda")
        fresh.write(1, loc, k_buffer=kb, backend="torch")
        ref = fresh.layer(1).as_tuple()
        got = side.layer(1).as_tuple()
        pages = torch.tensor([1, 2], device="cuda")
        ok = all(torch.equal(a[loc], b[loc]) for a, b in zip(got[:3], ref[:3])) and all(
            torch.equal(a[pages], b[pages]) for a, b in zip(got[3:], ref[3:]))
        print(json.dumps(dict(kv=int(kv_bytes), side=int(side.nbytes()), released=int(f1 - f0),
                              restored=int(f1 - f2), same_ptrs=bool(same), rewritten_ok=bool(ok))))
        """
    )
    r = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    slack = 64 << 20  # allocator granularity and the CUDA context
    assert out["released"] >= out["kv"] + out["side"] - slack, out
    assert out["restored"] >= out["kv"] + out["side"] - slack, out
    assert out["same_ptrs"] and out["rewritten_ok"], out
