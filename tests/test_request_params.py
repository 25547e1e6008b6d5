"""Per-request p (``custom_params["top_p_attn"]``): validation (HTTP 400 path), the device
table and its admission hook, on CPU with SGLang's real objects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from sglang_twilight.config import ENV_VAR
from sglang_twilight.request_params import (
    RequestTopP,
    active_tables,
    admit_requests,
    unregister_active,
)


@pytest.fixture
def table():
    t = RequestTopP(9, 0.95, "cpu")
    yield t
    unregister_active(t)


# --------------------------------------------------------------------------- RequestTopP


def test_table_starts_at_default_and_registers(table):
    assert table.table.dtype == torch.float32 and table.table.shape == (9,)
    assert torch.all(table.table == torch.tensor(0.95))
    assert any(t is table for t in active_tables())


def test_rows_gathers_per_slot(table):
    table.set(3, 0.5)
    table.set(7, 1.0)
    table.set(1, 0.25)
    for dtype in (torch.int64, torch.int32):
        idx = torch.tensor([7, 0, 3, 3, 1, 8], dtype=dtype)
        got = table.rows(idx)
        exp = torch.tensor([1.0, 0.95, 0.5, 0.5, 0.25, 0.95])
        assert got.dtype == torch.float32 and torch.equal(got, exp)
    out = torch.full((4,), -1.0)
    r = table.rows(torch.tensor([3, 1, 0, 7]), out=out)
    assert r.data_ptr() == out.data_ptr()
    assert torch.equal(out, torch.tensor([0.5, 0.25, 0.95, 1.0]))


def test_rows_random_against_python(table):
    g = torch.Generator().manual_seed(1)
    ps = torch.rand(9, generator=g) * 0.9 + 0.05
    for i in range(1, 9):
        table.set(i, float(ps[i]))
    idx = torch.randint(0, 9, (64,), generator=g)
    exp = torch.where(idx == 0, torch.tensor(0.95), ps.float()[idx])
    assert torch.equal(table.rows(idx), exp)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), "x", None, True])
def test_set_rejects_bad_p(table, bad):
    with pytest.raises(ValueError, match="top_p_attn"):
        table.set(2, bad)
    with pytest.raises(IndexError):
        table.set(9, 0.5)


def test_admit_reads_custom_params_and_falls_back(table):
    def req(slot, cp):
        return SimpleNamespace(req_pool_idx=slot, sampling_params=SimpleNamespace(custom_params=cp))

    table.set(4, 0.3)  # a previous request's p in slot 4 must not survive
    n = table.admit([
        req(1, {"top_p_attn": 0.5, "__req__": object()}),
        req(2, None),
        req(3, {"top_p_attn": "0.7"}),
        req(4, {"thinking_budget": 3}),
        req(5, {"top_p_attn": 7}),  # bypassed validation: default, one warning
        req(None, {"top_p_attn": 0.1}),  # no slot: skipped
    ])
    assert n == 5
    exp = torch.tensor([0.95, 0.5, 0.95, 0.7, 0.95, 0.95, 0.95, 0.95, 0.95])
    assert torch.allclose(table.table, exp)
    # the scheduler hook writes every live table of the process, this one included (other tests'
    # tables may still be alive, so count at least one write per request)
    assert admit_requests([req(6, {"top_p_attn": 0.2})]) >= 1
    assert float(table.table[6]) == pytest.approx(0.2)


def test_registry_is_weak():
    t = RequestTopP(4, 0.9, "cpu")
    assert any(x is t for x in active_tables())
    del t
    import gc

    gc.collect()
    assert all(x.num_req_slots != 4 or x.default_p != 0.9 for x in active_tables())


# --------------------------------------------------------------------------- fresh process

# Plugin registration + SGLang's HookRegistry.apply_hooks() in a fresh process (hooks apply
# once per process), then: SamplingParams.verify (what the tokenizer manager calls before
# answering 400 on ValueError), the OpenAI request -> sampling params path, and a real
# ScheduleBatch (radix cache, req-to-token pool, paged allocator) going through
# prepare_for_extend + ForwardBatch.init_new with the hook writing the device table.
FRESH = r"""
import json, os
os.environ.setdefault("TRITON_INTERPRET", "1")
from array import array
from types import SimpleNamespace
import torch
from sglang.srt.plugins.hook_registry import HookRegistry
from sglang_twilight import plugin
plugin.register()
HookRegistry.apply_hooks()

from sglang.srt.sampling.sampling_params import SamplingParams
out = {}
def verify(cp):
    try:
        SamplingParams(max_new_tokens=4, custom_params=cp).verify(1000)
        return "ok"
    except ValueError as e:
        return "ValueError: " + str(e)
out["bad"] = [verify({"top_p_attn": v}) for v in (1.5, 0, -1, "abc", None, True)]
out["good"] = [verify(cp) for cp in ({"top_p_attn": 0.9}, {"top_p_attn": 1}, {"top_p_attn": "0.5"},
                                       None, {"other": 5})]

from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
cr = CompletionRequest(model="m", prompt="hi", custom_params={"top_p_attn": 2.0})
chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                             custom_params={"top_p_attn": 0.8})
out["openai_chat"] = verify(chat.to_sampling_params(stop=[], model_generation_config={})["custom_params"])
out["openai_completion"] = verify(cr.custom_params)

from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixCache
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
from sglang.srt.runtime_context import get_parallel
from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
from sglang_twilight.request_params import RequestTopP

sa = ServerArgs(model_path="dummy", device="cpu")
set_global_server_args_for_scheduler(sa)
P = 16
rtp = ReqToTokenPool(size=4, max_context_len=256, device="cpu", enable_memory_saver=False)
kv = MHATokenToKVPool(512, page_size=P, dtype=torch.bfloat16, head_num=2, head_dim=64,
                      layer_num=1, device="cpu", enable_memory_saver=False)
alloc = PagedTokenToKVPoolAllocator(512, page_size=P, dtype=torch.bfloat16, device="cpu",
                                    kvcache=kv, need_sort=False)
tree = RadixCache(CacheInitParams(disable=False, req_to_token_pool=rtp,
                                  token_to_kv_pool_allocator=alloc, page_size=P))
table = RequestTopP(rtp.req_to_token.shape[0], 0.95, "cpu")  # what the backend does
mc = SimpleNamespace(vocab_size=1000, is_encoder_decoder=False, is_multimodal=False, hf_config=None)
mr = SimpleNamespace(is_draft_worker=False, server_args=sa, device="cpu",
                     ngram_embedding_manager=SimpleNamespace(enabled=False),
                     model_config=SimpleNamespace(model_is_mrope=False), dcp_size=1, dcp_rank=0)

def make_req(i, cp):
    ids = array("q", range(100 + 40 * i, 120 + 41 * i))
    r = Req(f"r{i}", "", ids, SamplingParams(max_new_tokens=8, custom_params=cp))
    r.init_next_round_input(tree)
    r.set_extend_range(len(r.prefix_indices), len(ids))
    return r

def forward(reqs, mode=None):
    b = ScheduleBatch.init_new(reqs, rtp, alloc, tree, mc, False, SpeculativeAlgorithm.NONE)
    b.prepare_for_extend()
    if mode is not None:
        b.forward_mode = mode
    with get_parallel().override(moe_ep_size=1):
        ForwardBatch.init_new(b, mr, return_hidden_states_before_norm=False)
    return b

reqs = [make_req(i, cp) for i, cp in enumerate(
    [{"top_p_attn": 0.5}, None, {"other": 1}, {"top_p_attn": 1}])]
b = forward(reqs)
out["slots"] = [r.req_pool_idx for r in reqs]
out["batch_slots"] = b.req_pool_indices.tolist()
out["table1"] = table.table.tolist()
out["rows1"] = table.rows(b.req_pool_indices).tolist()

# the request in slot of reqs[0] finishes; a new request without a p gets that slot
slot0 = reqs[0].req_pool_idx
rtp.free(reqs[0])
new = make_req(7, None)
forward([new])
out["reused_slot"] = new.req_pool_idx == slot0
out["table2"] = table.table.tolist()

# a decode-mode batch writes nothing (no host work per decode step)
table.table.fill_(0.123)
rtp.free(new)
other = make_req(8, {"top_p_attn": 0.6})
forward([other], mode=ForwardMode.DECODE)
out["decode_untouched"] = table.table.tolist()
print(json.dumps(out))
"""


def test_fresh_process_validation_and_admission_hook():
    env = dict(os.environ)
    env.pop(ENV_VAR, None)
    env.pop("SGLANG_PLUGINS", None)
    env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])

    assert out["good"] == ["ok"] * 5
    for msg, shown in zip(out["bad"], ["1.5", "0", "-1", "abc", "None", "True"]):
        assert msg == f"ValueError: top_p_attn: invalid value {shown} (allowed: 0 < p <= 1)", msg
    assert out["openai_chat"] == "ok"
    assert out["openai_completion"].startswith("ValueError: top_p_attn: invalid value 2.0")

    assert out["slots"] == [1, 2, 3, 4] and out["batch_slots"] == out["slots"]
    assert out["table1"] == pytest.approx([0.95, 0.5, 0.95, 0.95, 1.0])
    assert out["rows1"] == pytest.approx([0.5, 0.95, 0.95, 1.0])
    assert out["reused_slot"] is True
    assert out["table2"] == pytest.approx([0.95, 0.95, 0.95, 0.95, 1.0])  # no stale 0.5
    assert out["decode_untouched"] == pytest.approx([0.123] * 5)


def test_plugin_registers_request_hooks_once():
    from sglang.srt.plugins.hook_registry import HookRegistry

    from sglang_twilight import plugin
    from sglang_twilight.srt_patches import request_top_p as rp

    for _ in range(3):
        plugin.register()
    for target, fn in ((rp.VERIFY_TARGET, rp._verify_hook), (rp.INIT_NEW_TARGET, rp._init_new_hook)):
        hooks = [h for _, h, _ in HookRegistry._hooks.get(target, [])]
        assert hooks.count(fn) == 1, target


def test_init_new_hook_directly(table):
    """The hook on its own: extend-type batches write, decode/idle do not."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from sglang_twilight.srt_patches.request_top_p import _init_new_hook

    def batch(mode, slots_ps):
        reqs = [SimpleNamespace(req_pool_idx=s, sampling_params=SimpleNamespace(custom_params=cp))
                for s, cp in slots_ps]
        return SimpleNamespace(forward_mode=mode, reqs=reqs)

    _init_new_hook(None, object, batch(ForwardMode.DECODE, [(2, {"top_p_attn": 0.5})]))
    _init_new_hook(None, object, batch(ForwardMode.IDLE, []))
    assert torch.all(table.table == torch.tensor(0.95))
    _init_new_hook(None, object, batch(ForwardMode.MIXED, [(2, {"top_p_attn": 0.5}), (6, None)]))
    _init_new_hook(None, object, batch(ForwardMode.EXTEND, [(8, {"top_p_attn": 0.25})]))
    assert table.table[2] == 0.5 and table.table[6] == torch.tensor(0.95) and table.table[8] == 0.25
