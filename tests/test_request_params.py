"""Per-request p (``custom_params["top_p_attn"]``): validation (HTTP 400 path), the device
table and its admission hook, on CPU with SGLang's real objects; SGLang's real HTTP app
answering bad values with 400 before any stream starts (tokenizer manager stand-in: the
scheduler cannot run on CPU; the live server is tested in tests/test_serving_gpu.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from sglang_twilight.config import ENV_VAR, validate_request_top_p
from sglang_twilight.request_params import (
    RequestTopP,
    active_tables,
    admit_requests,
    check_sampling_params,
    top_p_error_in_body,
    unregister_active,
)

# What a client may send as top_p_attn. JSON can carry each of these (Python's json writes
# NaN / Infinity / big integers; SGLang's orjson parser refuses them, see the hook tests).
BAD_VALUES = [
    "abc", "0.5", "", True, False, float("nan"), float("inf"), float("-inf"), 0, 0.0, -0.0,
    -0.5, -1, 1.5, 2, 1.0000001, 10**400, -(10**400), None, [0.5], [], {"p": 0.5}, {},
]
GOOD_VALUES = [(0.5, 0.5), (1, 1.0), (1.0, 1.0), (0.95, 0.95), (1e-6, 1e-6), (2**-126, 2**-126)]
FP32_MIN_NORMAL = 2.0**-126


@pytest.fixture
def table():
    t = RequestTopP(9, 0.95, "cpu")
    yield t
    unregister_active(t)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("x,expected", GOOD_VALUES)
def test_validate_accepts_numbers_in_range(x, expected):
    assert validate_request_top_p(x) == expected


@pytest.mark.parametrize("x", BAD_VALUES, ids=repr)
def test_validate_rejects_with_one_line_naming_the_field(x):
    with pytest.raises(ValueError) as ei:
        validate_request_top_p(x)
    msg = str(ei.value)
    assert msg.startswith("top_p_attn: invalid value ") and msg.endswith(
        "(allowed: a number, 0 < p <= 1)"), msg
    assert "\n" not in msg and len(msg) < 160, msg


def test_validate_keeps_huge_values_short():
    msg = str(pytest.raises(ValueError, validate_request_top_p, 10**400).value)
    assert "(401 characters)" in msg and len(msg) < 120, msg
    big = 10**5000  # beyond Python's int-to-str limit: repr() itself raises
    assert "bits>" in str(pytest.raises(ValueError, validate_request_top_p, big).value)


@pytest.mark.parametrize("x", [1e-300, 5e-324, 1e-40, 1e-38])
def test_tiny_p_is_raised_to_the_smallest_normal_fp32(x):
    """(0, 1] holds 1e-300, but the device table is fp32, where it would be 0 (or a subnormal):
    the validator returns 2**-126 instead, and the table holds a positive normal number."""
    p = validate_request_top_p(x)
    assert p == FP32_MIN_NORMAL
    t = RequestTopP(4, 0.95, "cpu", register=False)
    t.set(1, x)
    t.set_many([2], [p])
    for v in (t.table[1], t.table[2]):
        assert float(v) == FP32_MIN_NORMAL and float(v) > 0
    assert float(torch.tensor([1e-300], dtype=torch.float64).float()) == 0.0  # why it matters
    # a default p of 1e-300 too (--top-p-attn accepts it)
    assert float(RequestTopP(2, 1e-300, "cpu", register=False).table[0]) == FP32_MIN_NORMAL


def test_check_sampling_params_shapes():
    check_sampling_params(None)
    check_sampling_params({})
    check_sampling_params({"custom_params": None})
    check_sampling_params({"custom_params": "not a dict"})  # SGLang's business, not ours
    check_sampling_params({"custom_params": {"other": float("nan")}})
    check_sampling_params([{"custom_params": {"top_p_attn": 0.5}}, None, {}])
    for bad in ({"custom_params": {"top_p_attn": 1.5}},
                [{"custom_params": {"top_p_attn": 0.5}}, {"custom_params": {"top_p_attn": "x"}}]):
        with pytest.raises(ValueError, match="^top_p_attn: invalid value"):
            check_sampling_params(bad)


def test_top_p_error_in_body_names_the_field_where_orjson_gives_up():
    def body(text):
        return text.encode()

    for raw, shown in (("NaN", "nan"), ("Infinity", "inf"), ("-Infinity", "-inf"), ("1e400", "inf"),
                       ("1" + "0" * 400, "(401 characters)")):
        gen = body('{"input_ids": [1], "sampling_params": {"custom_params": {"top_p_attn": %s}}}' % raw)
        oai = body('{"model": "m", "prompt": "x", "custom_params": {"top_p_attn": %s}}' % raw)
        batch = body('{"text": ["a", "b"], "sampling_params": [{}, {"custom_params": {"top_p_attn": %s}}]}'
                     % raw)
        for b in (gen, oai, batch):
            msg = top_p_error_in_body(b)
            assert msg and msg.startswith("top_p_attn: invalid value") and shown in msg, (raw, msg)
    # the bad number is elsewhere, or the body is no JSON at all: SGLang's own error stands
    assert top_p_error_in_body(body('{"sampling_params": {"temperature": NaN}}')) is None
    assert top_p_error_in_body(body('{"custom_params": {"top_p_attn": 0.5}, "x": NaN}')) is None
    assert top_p_error_in_body(body('{"custom_params": {"top_p_attn": 0.5')) is None
    assert top_p_error_in_body(body('[NaN]')) is None
    assert top_p_error_in_body(b"\xff\xfe") is None


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
        req(3, {"top_p_attn": 0.7}),
        req(4, {"thinking_budget": 3}),
        req(5, {"top_p_attn": 7}),  # bypassed validation: default, one warning
        req(7, {"top_p_attn": "0.3"}),  # a string: bypassed validation too
        req(None, {"top_p_attn": 0.1}),  # no slot: skipped
    ])
    assert n == 6
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
out["bad"] = [verify({"top_p_attn": v}) for v in (1.5, 0, -1, "abc", None, True, "0.5", 10**400,
                                                   float("nan"), [0.5], {"a": 1})]
out["good"] = [verify(cp) for cp in ({"top_p_attn": 0.9}, {"top_p_attn": 1}, {"top_p_attn": 1e-300},
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
    shown = ["1.5", "0", "-1", "'abc'", "None", "True", "'0.5'",
             "100000000000000000000000...(401 characters)", "nan", "[0.5]", "{'a': 1}"]
    assert len(out["bad"]) == len(shown)
    for msg, v in zip(out["bad"], shown):
        assert msg == f"ValueError: top_p_attn: invalid value {v} (allowed: a number, 0 < p <= 1)", msg
    assert out["openai_chat"] == "ok"
    assert out["openai_completion"].startswith("ValueError: top_p_attn: invalid value 2.0")

    assert out["slots"] == [1, 2, 3, 4] and out["batch_slots"] == out["slots"]
    assert out["table1"] == pytest.approx([0.95, 0.5, 0.95, 0.95, 1.0])
    assert out["rows1"] == pytest.approx([0.5, 0.95, 0.95, 1.0])
    assert out["reused_slot"] is True
    assert out["table2"] == pytest.approx([0.95, 0.95, 0.95, 0.95, 1.0])  # no stale 0.5
    assert out["decode_untouched"] == pytest.approx([0.123] * 5)


# SGLang's real FastAPI app (routes, orjson body parser, exception handlers, OpenAI completion
# handler, TokenizerManager.create_abort_task) with the plugin's hooks applied, driven over
# ASGI in a fresh process. The tokenizer manager is a stand-in for what cannot run on CPU (the
# tokenizer and the scheduler): its generate_request does what the real one does before a
# request leaves the HTTP process (normalize, SamplingParams(**params).normalize/verify, the
# hooked verify) and then answers one token. Printed: for every (endpoint, stream, value) the
# status, the content type and the body; which requests reached generate_request.
FRESH_HTTP = r"""
import asyncio, json, math, os, sys
os.environ.setdefault("TRITON_INTERPRET", "1")
from types import SimpleNamespace
from sglang.srt.plugins.hook_registry import HookRegistry
from sglang_twilight import plugin
plugin.register()
HookRegistry.apply_hooks()

from sglang.srt.entrypoints import http_server
from sglang.srt.entrypoints.openai.serving_completions import OpenAIServingCompletion
from sglang.srt.managers.tokenizer_manager import TokenizerManager
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.server_args import ServerArgs


class StandIn(TokenizerManager):
    def __init__(self):
        self.server_args = ServerArgs(model_path="dummy", device="cpu")
        self.request_logger = SimpleNamespace(log_requests=False, log_requests_level=0)
        self.reached = []
        self.aborted = []

    async def generate_request(self, obj, request=None):
        obj.normalize_batch_and_arguments()
        sp = SamplingParams(**obj.sampling_params)
        sp.normalize(None)
        sp.verify(1000)
        self.reached.append(obj.rid)
        yield {"text": "ok", "output_ids": [7], "index": 0,
               "meta_info": {"id": obj.rid, "finish_reason": {"type": "length", "length": 1},
                             "prompt_tokens": 3, "completion_tokens": 1, "cached_tokens": 0,
                             "weight_version": "default"}}

    def abort_request(self, rid="", abort_all=False, **kw):  # create_abort_task's task, 2 s later
        self.aborted.append(rid)


tm = StandIn()
http_server.set_global_state(SimpleNamespace(tokenizer_manager=tm, template_manager=None,
                                             scheduler_info={}))
app = http_server.app
app.state.openai_serving_completion = OpenAIServingCompletion(
    tm, SimpleNamespace(completion_template_name=None))


async def call(path, body):
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 30000), "state": {}}
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if pending:
            return pending.pop(0)
        await asyncio.sleep(3600)  # the client never hangs up

    sent = []

    async def send(m):
        sent.append(m)

    await asyncio.wait_for(app(scope, receive, send), 60)
    start = next(m for m in sent if m["type"] == "http.response.start")
    ctype = dict(start["headers"]).get(b"content-type", b"").decode()
    text = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], ctype, text.decode(errors="replace")


VALUES = json.loads(sys.argv[1])  # [[json text of the value, tag], ...]


async def main():
    out = []
    for stream in (False, True):
        for raw, tag in VALUES:
            cp = '{"top_p_attn": %s}' % raw
            bodies = {
                "/generate": '{"input_ids": [1, 2, 3], "stream": %s, "sampling_params": '
                             '{"max_new_tokens": 1, "custom_params": %s}}' % (json.dumps(stream), cp),
                "/v1/completions": '{"model": "m", "prompt": [1, 2, 3], "max_tokens": 1, '
                                   '"stream": %s, "custom_params": %s}' % (json.dumps(stream), cp),
            }
            for path, body in bodies.items():
                n = len(tm.reached)
                st, ctype, text = await call(path, body.encode())
                out.append(dict(path=path, stream=stream, tag=tag, status=st, ctype=ctype,
                                body=text[:400], reached=len(tm.reached) > n))
    print(json.dumps({"results": out, "aborted": len(tm.aborted)}))


asyncio.run(main())
"""

# (JSON text of top_p_attn, tag); Python's json writes NaN / Infinity / big integers this way
HTTP_BAD = ['"abc"', '"0.5"', "true", "false", "NaN", "Infinity", "-Infinity", "0", "0.0", "-0.5",
            "1.5", "1e400", "1" + "0" * 400, "null", "[0.5]", '{"p": 0.5}']
HTTP_GOOD = ["0.5", "1", "1e-300"]


def test_http_bad_top_p_is_400_before_any_stream():
    """Every bad value on /generate and /v1/completions, streaming or not: HTTP 400 with one
    message naming top_p_attn, never a 200 stream carrying an error event, and the request
    never reaches the tokenizer manager (nothing submitted, no abort task). Good values pass."""
    env = dict(os.environ)
    env.pop(ENV_VAR, None)
    env.pop("SGLANG_PLUGINS", None)
    env["TRITON_INTERPRET"] = "1"
    values = [[v, "bad"] for v in HTTP_BAD] + [[v, "good"] for v in HTTP_GOOD]
    r = subprocess.run([sys.executable, "-c", FRESH_HTTP, json.dumps(values)], capture_output=True,
                       text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    res = out["results"]
    assert len(res) == 2 * 2 * len(values)
    bad = [x for x in res if x["tag"] == "bad"]
    good = [x for x in res if x["tag"] == "good"]
    for x in bad:
        where = (x["path"], x["stream"], x["body"][:200])
        assert x["status"] == 400, where
        assert "text/event-stream" not in x["ctype"], where
        body = json.loads(x["body"])
        msg = body.get("message") or body["error"]["message"]
        assert msg.startswith("top_p_attn: invalid value ") and "0 < p <= 1" in msg, where
        assert not x["reached"], where
    for x in good:
        where = (x["path"], x["stream"], x["body"][:200])
        assert x["status"] == 200 and x["reached"], where
        if x["stream"]:
            assert "text/event-stream" in x["ctype"] and x["body"].startswith("data: "), where
            assert '"error"' not in x["body"], where
    assert out["aborted"] == sum(1 for x in good if x["stream"])  # each good stream's abort task ran


def test_plugin_registers_request_hooks_once():
    from sglang.srt.plugins.hook_registry import HookRegistry

    from sglang_twilight import plugin
    from sglang_twilight.srt_patches import request_top_p as rp

    for _ in range(3):
        plugin.register()
    for target, fn in ((rp.VERIFY_TARGET, rp._verify_hook), (rp.INIT_NEW_TARGET, rp._init_new_hook),
                       (rp.ABORT_TASK_TARGET, rp._abort_task_hook), (rp.JSON_TARGET, rp._json_hook)):
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
