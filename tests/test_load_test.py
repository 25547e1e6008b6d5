"""benchmarks/load_test.py on CPU: the request mix, the accounting of responses, the greedy
comparison, the /metrics reading, and the whole driver against a stand-in HTTP server that speaks
SGLang's /generate wire format (the real servers need a GPU: the script's docstring says how to run
it there)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

from benchmarks import load_test as L
from tests.models import write_tiny_llama

# --------------------------------------------------------------------------- the mix


@pytest.mark.parametrize("n,context", [(1000, 8192), (200, 4096), (37, 1024)])
def test_mix_fits_and_mixes(n, context):
    prefixes, specs = L.make_mix(n, context, seed=3)
    assert len(specs) == n and [s.idx for s in specs] == list(range(n))
    for s in specs:
        assert 1 <= s.suffix_len and s.prompt_len + s.max_new_tokens <= context - 8, s
        assert s.max_new_tokens >= 1
        assert (s.prefix < 0) == (s.prefix_len == 0)
        if s.prefix >= 0:
            assert s.prefix_len == len(prefixes[s.prefix])
    aborts = [s for s in specs if s.abort_after is not None]
    assert len(aborts) == round(0.1 * n)
    for s in aborts:  # still generating when the client hangs up
        assert s.stream and s.ignore_eos and 1 <= s.abort_after <= 6
        assert s.max_new_tokens >= 64 and s.max_new_tokens > s.abort_after
    lens = [s.prompt_len for s in specs]
    if n >= 200:
        assert min(lens) < 512 and max(lens) > context - 1200  # short to near the context
        shared = sum(s.prefix >= 0 for s in specs) / n
        assert 0.4 < shared < 0.7, shared
        assert len({s.prefix for s in specs if s.prefix >= 0}) >= 4  # several long prefixes
        assert max(len(p) for p in prefixes) >= 0.7 * context
        ps = Counter(s.top_p_attn for s in specs)
        assert len(ps) == len(L.P_CHOICES) and min(ps.values()) > n / 20, ps
        assert 0.35 < sum(s.stream for s in specs) / n < 0.7
        assert 0.35 < sum(s.ignore_eos for s in specs) / n < 0.7


def test_mix_is_deterministic_and_prompts_share_prefixes():
    a = L.make_mix(300, seed=5)
    b = L.make_mix(300, seed=5)
    c = L.make_mix(300, seed=6)
    assert a == b and a[1] != c[1]
    prefixes, specs = a
    s = next(x for x in specs if x.prefix >= 0)
    t = next(x for x in specs if x.prefix == s.prefix and x.idx != s.idx)
    ps, pt = L.prompt_ids(s, prefixes), L.prompt_ids(t, prefixes)
    assert len(ps) == s.prompt_len and len(pt) == t.prompt_len
    assert ps[: s.prefix_len] == pt[: t.prefix_len] == prefixes[s.prefix]
    assert ps[s.prefix_len:] != pt[t.prefix_len:]
    assert all(L.TOKEN_LO <= x < L.TOKEN_HI for x in ps)
    body = L.payload(s, prefixes)
    assert body["input_ids"] == ps and body["stream"] == s.stream
    sp = body["sampling_params"]
    assert sp["max_new_tokens"] == s.max_new_tokens and sp["temperature"] == 0
    assert ("custom_params" in sp) == (s.top_p_attn is not None)
    with pytest.raises(ValueError):
        L.make_mix(10, 512)


def test_sample_specs_span_the_context():
    prefixes, _ = L.make_mix(10, 8192)
    sample = L.sample_specs(prefixes, 8192)
    assert len(sample) == 8
    assert sample[0].prompt_len == 40 and sample[-1].prompt_len + L.SAMPLE_NEW <= 8192 - 8
    assert any(s.prefix >= 0 for s in sample) and all(s.top_p_attn is None for s in sample)


# --------------------------------------------------------------------------- accounting


def _spec(**kw):
    base = dict(idx=0, prefix=-1, prefix_len=0, suffix_len=10, seed=1, max_new_tokens=4,
                ignore_eos=True, top_p_attn=None, stream=False, abort_after=None)
    base.update(kw)
    return L.RequestSpec(**base)


def _final(ids, finish="length", ct=None, cached=0):
    fr = None if finish is None else {"type": finish}
    return {"output_ids": ids, "meta_info": {"finish_reason": fr, "cached_tokens": cached,
                                             "completion_tokens": len(ids) if ct is None else ct}}


def test_classify():
    s = _spec()
    assert L.classify(s, 200, _final([1, 2, 3, 4])).kind == "completed"
    assert L.classify(s, 200, _final([1, 2], "stop")).kind == "completed"
    assert L.classify(s, 200, _final([], "stop")).kind == "completed"  # EOS first: a stop reason
    bad = {
        "short length": L.classify(s, 200, _final([1, 2, 3])),
        "too long": L.classify(s, 200, _final([1] * 5, "stop")),
        "server abort": L.classify(s, 200, _final([1], "abort")),
        "no finish": L.classify(s, 200, _final([1, 2, 3, 4], None)),
        "count mismatch": L.classify(s, 200, _final([1, 2, 3, 4], ct=5)),
        "http 400": L.classify(s, 400, {"error": {"message": "x"}}),
        "http 500": L.classify(s, 500, None),
        "transport": L.classify(s, None, None, error="ConnectionResetError: boom"),
        "no body": L.classify(s, 200, None),
        "error event": L.classify(_spec(stream=True), 200, {"error": {"message": "bad"}}, events=1),
        "stream cut": L.classify(_spec(stream=True), 200, _final([1], None), events=1, done=False),
        "unplanned close": L.classify(_spec(stream=True), 200, _final([1], None), events=1,
                                      closed_early=True, done=False),
    }
    for what, o in bad.items():
        assert o.kind == "error" and o.error, what
    ab = _spec(stream=True, abort_after=2, max_new_tokens=256)
    o = L.classify(ab, 200, _final([1, 2], None), events=2, closed_early=True, done=False)
    assert o.kind == "aborted" and o.tokens == 2
    # finished before the client's abort: completed
    o = L.classify(_spec(stream=True, abort_after=6, max_new_tokens=3), 200, _final([1, 2, 3]),
                   events=3, done=True)
    assert o.kind == "completed"


def test_summarize_and_checks():
    specs = [_spec(idx=i, abort_after=(2 if i < 2 else None), stream=i < 2) for i in range(6)]
    outs = [L.Outcome(0, "aborted"), L.Outcome(1, "completed", tokens=4, finish="length"),
            L.Outcome(2, "completed", tokens=4, finish="length", cached_tokens=8),
            L.Outcome(3, "completed", tokens=0, finish="stop"),
            L.Outcome(4, "error", error="HTTP 500: x")]
    s = L.summarize(specs, outs)
    assert (s["requests"], s["sent"], s["not_sent"]) == (6, 5, 1)
    assert (s["completed"], s["aborted"], s["errors"]) == (3, 1, 1)
    assert s["planned_aborts"] == 2 and s["planned_aborts_finished_first"] == 1
    assert s["finish_reasons"] == {"length": 2, "stop": 1} and s["cached_tokens"] == 8
    assert s["error_samples"] == ["#4: HTTP 500: x"]
    good = {"load": dict(s, errors=0, not_sent=0, error_samples=[]), "leaked_slots": 0,
            "sample_after_load": {"failures": []}, "sample_vs_dense": {"failures": []}}
    assert L.failed_checks(good) == []
    for change, needle in [({"leaked_slots": 32}, "leaked"), ({"leaked_slots": None}, "could not"),
                           ({"crashed": "exited with -9"}, "died"), ({"tracebacks": 2}, "traceback"),
                           ({"sample_vs_dense": None}, "not run"),
                           ({"sample_after_load": {"failures": ["x"]}}, "sample_after_load")]:
        assert any(needle in f for f in L.failed_checks(dict(good, **change))), change
    assert any("failed" in f for f in L.failed_checks(dict(good, load=s)))
    assert any("not sent" in f for f in L.failed_checks(dict(good, load=s)))
    few = dict(good["load"], aborted=0, planned_aborts=100)
    assert any("planned aborts" in f for f in L.failed_checks(dict(good, load=few)))


# --------------------------------------------------------------------------- greedy comparison


def _resp(ids, lps=None, tops=None):
    lps = lps or [-0.1] * len(ids)
    tops = tops or [[[-0.1, t, None], [-3.0, t + 1, None]] for t in ids]
    return {"output_ids": ids, "meta_info": {"output_token_logprobs": [[x, t, None] for x, t in
                                                                         zip(lps, ids)],
                                             "output_top_logprobs": tops}}


def test_compare_greedy_can_fail():
    ref = [_resp([5, 6, 7, 8]), _resp([9, 10, 11])]
    ok = L.compare_greedy(ref, ref, tol=0.05, near_tie=0.1)
    assert ok["failures"] == [] and ok["equal"] == 2 and ok["compared_tokens"] == 7
    # a divergence where the reference was sure: fails
    r = L.compare_greedy([_resp([5, 6, 99, 8]), ref[1]], ref, tol=0.05, near_tie=0.1)
    assert len(r["failures"]) == 1 and "not a near-tie" in r["failures"][0]
    # the same divergence at a near-tie of the reference: allowed, reported
    tied = _resp([5, 6, 7, 8], tops=[[[-0.1, 5, None], [-3, 6, None]],
                                     [[-0.1, 6, None], [-3, 7, None]],
                                     [[-0.69, 7, None], [-0.70, 99, None]],
                                     [[-0.1, 8, None], [-3, 9, None]]])
    r = L.compare_greedy([_resp([5, 6, 99, 8])], [tied], tol=0.05, near_tie=0.1)
    assert r["failures"] == [] and len(r["diverged"]) == 1
    assert L.compare_greedy([_resp([5, 6, 99, 8])], [tied], tol=0.05, near_tie=0.1,
                            exact=True)["failures"]
    # logprobs drifting while the tokens agree
    r = L.compare_greedy([_resp([5, 6, 7, 8], lps=[-0.1, -0.1, -0.5, -0.1])], [ref[0]],
                         tol=0.05, near_tie=0.1)
    assert r["failures"] and "logprob" in r["failures"][0]
    # lost tokens, a first-token flip, a missing output
    assert L.compare_greedy([_resp([5, 6])], [ref[0]], tol=1, near_tie=1)["failures"]
    assert L.compare_greedy([_resp([])], [ref[0]], tol=1, near_tie=1)["failures"]
    assert L.compare_greedy([_resp([4, 6, 7, 8])], [ref[0]], tol=1, near_tie=10,
                            first_exact=True)["failures"]
    assert L.compare_greedy([ref[0]], ref, tol=1, near_tie=1)["failures"]


# --------------------------------------------------------------------------- /metrics

METRICS = """# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m",tp_rank="0"} 0.0
sglang:num_queue_reqs{model_name="m",tp_rank="0"} 0.0
sglang:kv_available_tokens{model_name="m",tp_rank="0"} 30000.0
sglang:kv_evictable_tokens{model_name="m",tp_rank="0"} 2752.0
sglang:kv_used_tokens{model_name="m",tp_rank="0"} 16.0
sglang_twilight_decode_steps{path="sparse",tp_rank="0"} 120.0
sglang_twilight_decode_steps{path="dense",tp_rank="0"} 3.0
"""


def test_metrics_pool_and_leak():
    m = L.parse_metrics(METRICS)
    assert m["sglang:kv_available_tokens"] == 30000 and m["sglang_twilight_decode_steps"] == 123
    idle = L.idle_pool(m)
    assert idle is not None and L.leaked_slots(32768, idle) == 16
    assert L.leaked_slots(32752, idle) == 0
    busy = L.parse_metrics(METRICS.replace('tp_rank="0"} 0.0\nsglang:num_queue', 'tp_rank="0"} 3.0\n'
                                           'sglang:num_queue'))
    assert L.idle_pool(busy) is None
    assert L.twilight_steps(METRICS) == {"sparse": 120.0, "dense": 3.0}


# --------------------------------------------------------------------------- the whole driver

# A stand-in for the two servers: SGLang's /generate wire format (JSON, or SSE events with the
# cumulative output ids, then [DONE]), /flush_cache, /server_info, /metrics, /health. Tokens are a
# function of the prompt, so both "servers" agree unless FAKE_MODE says otherwise:
# leak (the idle pool misses 48 slots), dense_differs (the dense one answers another token where
# it was sure), error (every 25th request gets a 500).
FAKE_SERVER = textwrap.dedent(r'''
    import json, os, sys, threading, time, zlib
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    role = sys.argv[1]
    port = int(sys.argv[sys.argv.index("--port") + 1])
    mode = os.environ.get("FAKE_MODE", "ok")
    TOTAL = 32768
    lock = threading.Lock()
    state = {"running": 0, "served": 0, "aborted": 0}

    def token(seed, i):
        return 1000 + zlib.crc32(f"{seed}:{i}".encode()) % 29000

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *a):
            pass

        def _json(self, code, obj):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                return self._json(200, {})
            if self.path == "/server_info":
                return self._json(200, {"max_total_num_tokens": TOTAL, "attention_backend": role})
            if self.path == "/metrics":
                leak = 48 if mode == "leak" else 0
                text = "".join(f'{k}{{tp_rank="0"}} {v}\n' for k, v in [
                    ("sglang:num_running_reqs", state["running"]), ("sglang:num_queue_reqs", 0),
                    ("sglang:kv_available_tokens", TOTAL - 4096 - leak),
                    ("sglang:kv_evictable_tokens", 4096), ("sglang:kv_used_tokens", leak)])
                text += f'sglang_twilight_decode_steps{{tp_rank="0",path="sparse"}} {state["served"]}\n'
                data = text.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                return self.wfile.write(data)
            self._json(404, {})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
            if self.path == "/flush_cache":
                return self._json(200 if state["running"] == 0 else 400, {})
            if self.path != "/generate":
                return self._json(404, {})
            with lock:
                state["running"] += 1
                state["served"] += 1
                nth = state["served"]
            try:
                self._generate(body, nth)
            except (BrokenPipeError, ConnectionResetError):
                with lock:
                    state["aborted"] += 1
            finally:
                with lock:
                    state["running"] -= 1

        def _generate(self, body, nth):
            sp = body["sampling_params"]
            ids = body["input_ids"]
            seed = zlib.crc32(json.dumps(ids).encode())
            n = sp["max_new_tokens"]
            if mode == "error" and nth % 25 == 0:
                return self._json(500, {"error": {"message": "boom"}})
            out, finish = [], {"type": "length", "length": n}
            lps, tops = [], []
            for i in range(n):
                t = token(seed, i)
                if role == "dense" and mode == "dense_differs" and i == 5:
                    t += 1
                if not sp.get("ignore_eos") and t % 40 == 0:
                    out.append(2)
                    finish = {"type": "stop", "matched": 2}
                    break
                out.append(t)
            meta_tail = {"id": str(nth), "cached_tokens": 0, "prompt_tokens": len(ids)}
            if body.get("return_logprob"):
                meta_tail["output_token_logprobs"] = [[-0.1, t, None] for t in out]
                meta_tail["output_top_logprobs"] = [[[-0.1, t, None], [-2.5, t + 1, None]] for t in out]
            if not body.get("stream"):
                meta = dict(meta_tail, finish_reason=finish, completion_tokens=len(out))
                return self._json(200, {"text": "x", "output_ids": out, "meta_info": meta})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for k in range(1, len(out) + 1):
                time.sleep(0.002)
                meta = dict(meta_tail, completion_tokens=k,
                            finish_reason=finish if k == len(out) else None)
                event = {"text": "x", "output_ids": out[:k], "meta_info": meta}
                self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")

    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
''')


def _drive(tmp_path, mode, n=80):
    model = write_tiny_llama(tmp_path / "model")
    fake = tmp_path / "fake_server.py"
    fake.write_text(FAKE_SERVER)
    out = tmp_path / "result.json"
    env = dict(os.environ, FAKE_MODE=mode)
    env.pop("OUT", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(L.__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "load_test.py"),
                        "--model", "llama8b-dummy", "--model-path", model, "--requests", str(n),
                        "--concurrency", "8", "--budget-s", "400", "--start-timeout", "30",
                        "--progress-every", "20", "--out", str(out), "--log-dir", str(tmp_path),
                        "--server-prefix", json.dumps([sys.executable, str(fake)])],
                       capture_output=True, text=True, env=env, timeout=300, cwd=root)
    return r, json.loads(out.read_text())


def test_driver_passes_against_a_well_behaved_server(tmp_path):
    r, res = _drive(tmp_path, "ok")
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    for key in ("card", "versions", "commit", "command", "requests", "completed", "aborted",
                "errors", "leaked_slots", "wall_s"):
        assert key in res, key
    assert res["passed"] is True and res["failed_checks"] == []
    assert res["requests"] == 80 and res["errors"] == 0 and res["leaked_slots"] == 0
    assert res["completed"] + res["aborted"] == 80
    assert res["aborted"] == res["load"]["planned_aborts"] == 8  # closed mid-stream, each one
    assert res["sample_after_load"]["equal"] == 8 and res["sample_vs_dense"]["equal"] == 8
    assert res["twilight_decode_steps"]["sparse"] > 0
    assert "load: 20/80 done" in r.stdout and "load: 80/80 done" in r.stdout
    assert "--twilight-dispatch sparse" in res["twilight_server"]
    assert "--attention-backend flashinfer" in res["dense_server"]


@pytest.mark.parametrize("mode,needle", [("leak", "48 KV slot(s) leaked"),
                                         ("dense_differs", "sample_vs_dense"),
                                         ("error", "request(s) failed")])
def test_driver_fails_when_something_is_wrong(tmp_path, mode, needle):
    r, res = _drive(tmp_path, mode, n=60)
    assert r.returncode == 1 and res["passed"] is False
    assert any(needle in f for f in res["failed_checks"]), res["failed_checks"]
