"""The sidecar and the decode workspace are counted in SGLang's KV pool budget
(srt_patches/pool_sizing.py), CPU.

SGLang 0.5.17 sizes the KV pool as ``available_bytes // cell_size``; ``cell_size`` comes from
``DefaultPoolConfigurator._compute_cell_size``. Here the real ``KVCacheConfigurator`` and
``DefaultPoolConfigurator`` are built for a Llama-3.1-8B-shaped model (32 layers, 8 KV heads,
head_dim 128, bf16) the way ``ModelRunner.init_kv_cache_configurator`` builds them, and the cell
size must grow by exactly the bytes the sidecar allocates per slot -- with the twilight backend
only.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from sglang_twilight.config import ENV_VAR

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "head_dim": 128,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}

# Llama-8B, bf16, page 16, layers 2..31 sparse: per sparse layer and KV head 64 B int4 K + 4 B
# scale/zero per token, plus 2 bounds x 128 int8 codes + a 4 B scale per 16-token page.
KV_CELL = 8 * (128 + 128) * 32 * 2  # 131072 B: SGLang's own K+V per token


def _sidecar(n):
    """Sidecar bytes per token of n (layer, KV head) pairs at D = 128, page 16."""
    return n * (64 + 4) + -(-n * (2 * 128 + 4) // 16)


SIDECAR = _sidecar(8 * 30)  # 20220 B


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama8b")
    (d / "config.json").write_text(json.dumps(LLAMA_8B))
    return str(d)


def _kvc(server_args, model_config, start=0, end=32):
    """``KVCacheConfigurator`` as ``ModelRunner.init_kv_cache_configurator`` builds it (fields
    the plain-MHA sizing never reads are None)."""
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
    from sglang.srt.model_executor.model_runner_components.layer_setup import ModelLayerInfo
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    return KVCacheConfigurator(
        device="cpu", gpu_id=0, ps=None, pp_group=None, model=None, model_config=model_config,
        server_args=server_args, kv_cache_dtype=torch.bfloat16, kv_cache_dtype_str="auto",
        model_dtype=torch.bfloat16, page_size=16, sliding_window_size=None,
        spec_algorithm=SpeculativeAlgorithm.from_string(None), is_draft_worker=False,
        post_capture_kv_active=False, spec_aux_config=None, is_hybrid_swa=False,
        is_hybrid_swa_compress=False, use_mla_backend=False,
        layer_info=ModelLayerInfo(start_layer=start, end_layer=end,
                                  num_effective_layers=end - start),
        forward_stream=None, req_to_token_pool=None, token_to_kv_pool_allocator=None,
        memory_pool_config=None,
    )


@pytest.fixture(scope="module")
def setup(llama8b):
    from sglang_twilight import plugin

    plugin.register()  # --attention-backend twilight is a choice
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.server_args import ServerArgs

    tw = ServerArgs(model_path=llama8b, attention_backend="twilight", device="cpu", page_size=16)
    fi = ServerArgs(model_path=llama8b, attention_backend="flashinfer", device="cpu", page_size=16)
    return tw, fi, ModelConfig.from_server_args(tw)


def _cell(kvc):
    """A real DefaultPoolConfigurator and SGLang's own (unhooked) cell size for ``kvc``."""
    from sglang.srt.model_executor.pool_configurator import DefaultPoolConfigurator

    conf = DefaultPoolConfigurator(kvc)
    fn = DefaultPoolConfigurator._compute_cell_size
    own = getattr(fn, "__wrapped__", fn)  # in case some test applied the hooks in this process
    base = own(conf, kvc, kvc.layer_info.num_effective_layers)
    conf._cell_size = base
    return conf, base


@pytest.mark.parametrize("tp,start,end,dense,want", [
    (1, 0, 32, 2, SIDECAR),
    (2, 0, 32, 2, SIDECAR // 2),  # 4 KV heads per rank
    (1, 16, 32, 2, _sidecar(8 * 16)),  # pipeline stage 2: layers 16..31, all sparse
    (1, 0, 32, 4, _sidecar(8 * 28)),
    (1, 0, 32, 40, 0),  # every layer dense: no sidecar
])
def test_hook_adds_exactly_the_sidecar(setup, twilight_cfg, tp, start, end, dense, want):
    from sglang.srt.runtime_context import get_parallel

    from sglang_twilight.srt_patches.pool_sizing import after_compute_cell_size

    tw, fi, mc = setup
    twilight_cfg(dense_layers=dense)
    with get_parallel().override(attn_tp_size=tp):
        conf, base = _cell(_kvc(tw, mc, start, end))
        assert base == KV_CELL // tp * (end - start) // 32
        kvc = _kvc(tw, mc, start, end)
        assert after_compute_cell_size(base, conf, kvc, end - start) == base + want
        # other backends: unchanged
        kvc_fi = _kvc(fi, mc, start, end)
        assert after_compute_cell_size(base, conf, kvc_fi, end - start) == base


def test_formula_is_what_the_sidecar_allocates(setup, twilight_cfg):
    """Bytes per slot of the sidecar attached to a real Llama-8B-shaped KV pool == the hook's."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.runtime_context import get_parallel

    from sglang_twilight.sidecar import attach_sidecar
    from sglang_twilight.srt_patches.pool_sizing import sidecar_bytes_per_token

    tw, _, mc = setup
    cfg = twilight_cfg()
    kv = MHATokenToKVPool(4 * 16, page_size=16, dtype=torch.bfloat16, head_num=8, head_dim=128,
                          layer_num=32, device="cpu", enable_memory_saver=False)
    side = attach_sidecar(kv, cfg)
    with get_parallel().override(attn_tp_size=1):
        per_token = sidecar_bytes_per_token(_kvc(tw, mc))
    assert per_token == SIDECAR
    assert side.nbytes() == side.num_slots * per_token  # slots = 5 pages (incl. padding page)
    kv_bytes = kv.get_kv_size_bytes()
    kv_bytes = sum(kv_bytes) if isinstance(kv_bytes, tuple) else kv_bytes
    assert kv_bytes == side.num_slots * KV_CELL


def test_pool_shrinks_by_the_sidecar(setup, twilight_cfg):
    """calculate_pool_sizes: the token count follows the grown cell size (page aligned)."""
    from sglang.srt.runtime_context import get_parallel

    from sglang_twilight.srt_patches.pool_sizing import after_compute_cell_size

    tw, _, mc = setup
    twilight_cfg()
    avail = 60 * (1 << 30)
    with get_parallel().override(attn_tp_size=1):
        conf, base = _cell(_kvc(tw, mc))
        dense_tokens = conf.calculate_pool_sizes(avail, 16).max_total_num_tokens
        conf._cell_size = after_compute_cell_size(base, conf, _kvc(tw, mc), 32)
        tokens = conf.calculate_pool_sizes(avail, 16).max_total_num_tokens
    assert dense_tokens == avail // KV_CELL // 16 * 16
    assert tokens == avail // (KV_CELL + SIDECAR) // 16 * 16
    # KV pool + sidecar of that many tokens stay inside the budget
    assert tokens * (KV_CELL + SIDECAR) <= avail


def test_hook_registered_through_sglang_plugins(llama8b):
    """Fresh process, the way SGLang's scheduler starts: load_plugins() runs our entry point,
    which registers the AFTER hook; apply_hooks() patches DefaultPoolConfigurator. The real
    constructor then computes the grown cell size for twilight and SGLang's own for flashinfer."""
    code = textwrap.dedent(
        """
        import json, sys, torch
        sys.path.insert(0, sys.argv[2])
        from sglang.srt.plugins import load_plugins
        load_plugins()
        from sglang.srt.plugins.hook_registry import HookRegistry
        from sglang.srt.model_executor.pool_configurator import DefaultPoolConfigurator
        from sglang.srt.configs.model_config import ModelConfig
        from sglang.srt.server_args import ServerArgs
        from sglang.srt.runtime_context import get_parallel
        from sglang_twilight.srt_patches.pool_sizing import TARGET
        from tests.test_pool_sizing import _kvc
        from sglang_twilight.srt_patches.pool_sizing import RESERVE_TARGET
        out = {"registered": TARGET in HookRegistry._hooks, "patched": TARGET in HookRegistry._patched,
               "reserve": RESERVE_TARGET in HookRegistry._hooks and RESERVE_TARGET in HookRegistry._patched}
        tw = ServerArgs(model_path=sys.argv[1], attention_backend="twilight", device="cpu")
        fi = ServerArgs(model_path=sys.argv[1], attention_backend="flashinfer", device="cpu",
                        page_size=16)
        mc = ModelConfig.from_server_args(tw)
        out["page_size"] = tw.page_size
        with get_parallel().override(attn_tp_size=1):
            out["twilight"] = DefaultPoolConfigurator(_kvc(tw, mc))._cell_size
            out["flashinfer"] = DefaultPoolConfigurator(_kvc(fi, mc))._cell_size
        print(json.dumps(out))
        """
    )
    env = dict(os.environ)
    env.pop(ENV_VAR, None)
    env.pop("SGLANG_PLUGINS", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code, llama8b, root], capture_output=True,
                       text=True, env=env, timeout=300, cwd=root)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"registered": True, "patched": True, "reserve": True, "page_size": 16,
                   "twilight": KV_CELL + SIDECAR, "flashinfer": KV_CELL}


# --------------------------------------------------------------------------- decode workspace
# A fixed amount, reserved out of the bytes SGLang profiles for the KV pool (AFTER hook on
# KVCacheConfigurator._profile_available_bytes), so that the workspace the backend allocates after
# the pool (graph set-up, or the first eager decode step) does not come out of the activation slack.


_PARALLEL = dict(attn_tp_size=1, attn_tp_rank=0, tp_size=1, tp_rank=0, attn_cp_size=1,
                 attn_cp_rank=0, attn_dp_size=1, dcp_size=1, pp_size=1, pp_rank=0)


@contextlib.contextmanager
def _scheduler(server_args):
    """What a scheduler process has when SGLang sizes its pools: the published config and the
    parallel sizes (get_cuda_graph_max_batch_size reads both)."""
    from sglang.srt.runtime_context import get_context, get_parallel, publish

    with get_context().preserve_config():
        publish(server_args, role="scheduler")
        with get_parallel().override(**_PARALLEL):
            yield


def _geo(tw_args, mc, cfg):
    """The decode workspace geometry of a Llama-8B rank, written out by hand (TP 1)."""
    from sglang.srt.mem_cache.allocation_sizing import get_req_to_token_extra_context_len

    max_context = 131072 + get_req_to_token_extra_context_len(tw_args)
    return (8, 4, 128, cfg.capacity, max_context, 16)


def test_workspace_reserve_is_the_backend_workspace(setup, twilight_cfg, monkeypatch):
    """The reserve = the workspace of workspace_rows(eager rows bound) rows, at this geometry,
    once per attention backend; 0 for other backends, a draft worker, or no sparse layer; it
    follows $SGLANG_TWILIGHT_WORKSPACE_MB."""
    from sglang_twilight.backend import workspace_bytes, workspace_rows
    from sglang_twilight.srt_patches import pool_sizing as ps

    tw, fi, mc = setup
    cfg = twilight_cfg()
    geo = _geo(tw, mc, cfg)
    with _scheduler(tw):
        rows = workspace_rows(ps.eager_rows_bound(tw), *geo)
        want = workspace_bytes(rows, *geo)
        assert ps.workspace_reserve_bytes(_kvc(tw, mc), cfg) == want
        assert 400 << 20 < want <= 512 << 20  # the default cap binds at 8B shapes x 128k context
        # one workspace per backend: two-batch overlap builds three, PD-multiplexing 1 + groups
        tbo = copy.copy(tw)
        object.__setattr__(tbo, "enable_two_batch_overlap", True)
    with _scheduler(tbo):
        rows_tbo = workspace_rows(ps.eager_rows_bound(tbo), *geo)
        assert ps.workspace_reserve_bytes(_kvc(tbo, mc), cfg) == 3 * workspace_bytes(rows_tbo, *geo)
    with _scheduler(tw):
        # the cap: 64 MiB of workspace
        monkeypatch.setenv("SGLANG_TWILIGHT_WORKSPACE_MB", "64")
        small = ps.workspace_reserve_bytes(_kvc(tw, mc), cfg)
        assert small <= 64 << 20 and small == workspace_bytes(workspace_rows(
            ps.eager_rows_bound(tw), *geo), *geo)
        monkeypatch.delenv("SGLANG_TWILIGHT_WORKSPACE_MB")
        # a GPU's SM count sizes the attention split scratch: more SMs, more bytes
        assert ps.workspace_reserve_bytes(_kvc(tw, mc), cfg, num_sms=132) == workspace_bytes(
            rows, *geo, num_sms=132) > want
        assert ps.workspace_reserve_bytes(_kvc(fi, mc), cfg) == 0
        draft = _kvc(tw, mc)
        draft.is_draft_worker = True
        assert ps.workspace_reserve_bytes(draft, cfg) == 0
        assert ps.workspace_reserve_bytes(_kvc(tw, mc), twilight_cfg(dense_layers=32)) == 0


def test_split_rows_follow_the_workspace_allocation():
    """workspace_bytes(num_sms=...) prices the attention split scratch with split_rows, which
    must be the count DecodeWorkspace.allocate sizes it by (8 SMs off the GPU)."""
    from sglang_twilight import ops
    from sglang_twilight.backend import split_rows, workspace_bytes

    for rows, H, G, D in [(1, 8, 4, 128), (7, 3, 3, 64), (40, 8, 4, 128), (300, 2, 8, 128)]:
        ws = ops.DecodeWorkspace.allocate(rows, H, G, D, 512, 16, 4096, "meta")
        assert ws.mid_lse.numel() == split_rows(rows, H, ws.num_sms) * G
        assert ws.mid_o.numel() == split_rows(rows, H, ws.num_sms) * G * D
        assert workspace_bytes(rows, H, G, D, 512, 4096, 16, num_sms=ws.num_sms) == ws.nbytes()
        big = split_rows(rows, H, 132)
        assert workspace_bytes(rows, H, G, D, 512, 4096, 16, num_sms=132) == (
            ws.nbytes() + (big - split_rows(rows, H, ws.num_sms)) * G * (D + 1) * 4)


def test_eager_rows_bound_covers_sglang_request_pool(setup, twilight_cfg):
    """eager_rows_bound >= the decode rows the FlashInfer parent (and the twilight backend's
    eager workspace) is sized for: get_cuda_graph_max_batch_size(req pool size), where the pool
    has SGLang's own resolve_max_num_reqs(token capacity) rows, for any capacity, with and
    without --max-running-requests."""
    from sglang.srt.utils.common import get_cuda_graph_max_batch_size

    from sglang_twilight.srt_patches.pool_sizing import eager_rows_bound

    tw, _, mc = setup
    twilight_cfg()
    for mrr in (None, 64, 10000):
        sa = copy.copy(tw)
        object.__setattr__(sa, "max_running_requests", mrr)
        with _scheduler(sa):
            kvc = _kvc(sa, mc)
            kvc.ps = types.SimpleNamespace(attn_dp_size=1)
            bound = eager_rows_bound(sa)
            for tokens in (4096, 131072, 1 << 20, 1 << 24, 1 << 28):
                reqs = kvc.resolve_max_num_reqs(tokens)
                assert get_cuda_graph_max_batch_size(sa, reqs) <= bound, (mrr, tokens)


def test_reserve_hook_leaves_room_for_the_workspace(setup, twilight_cfg):
    """The AFTER hook takes the reserve off the profiled bytes; the pool sized from what is left
    plus its sidecar plus the workspace fits the bytes SGLang profiled. Other backends: unchanged."""
    from sglang_twilight.srt_patches.pool_sizing import (
        after_compute_cell_size,
        after_profile_available_bytes,
        workspace_reserve_bytes,
    )

    tw, fi, mc = setup
    twilight_cfg()
    avail = 20 * (1 << 30)
    with _scheduler(tw):
        kvc = _kvc(tw, mc)
        reserve = workspace_reserve_bytes(kvc)
        assert reserve > 0
        left = after_profile_available_bytes(avail, kvc, 0)
        assert left == avail - reserve
        assert after_profile_available_bytes(reserve // 2, kvc, 0) == 0  # never negative
        assert after_profile_available_bytes(avail, _kvc(fi, mc), 0) == avail
        conf, base = _cell(kvc)
        conf._cell_size = after_compute_cell_size(base, conf, _kvc(tw, mc), 32)
        tokens = conf.calculate_pool_sizes(left, 16).max_total_num_tokens
    assert tokens * (KV_CELL + SIDECAR) + reserve <= avail
    assert tokens == (avail - reserve) // (KV_CELL + SIDECAR) // 16 * 16
