"""The twilight server end to end on a GPU (issue 4 points 1-4, 6a): ``python -m
sglang_twilight.launch_server`` serving /generate, /v1/completions, /v1/chat/completions,
shared-prefix requests and client aborts, and its greedy output against the dense FlashInfer
backend at p = 1 with B0 >= context (where the sparse path must equal dense attention).

Needs CUDA (marked ``gpu``) and ``TWILIGHT_TEST_MODEL``: a model folder, e.g. the Llama-3.1-8B-shaped
``/tmp/llama8b-dummy`` (copy of ``.gpubundle/llama8b-dummy``; served with ``--load-format dummy``,
the default of ``TWILIGHT_TEST_LOAD_FORMAT``) or a real checkpoint with
``TWILIGHT_TEST_LOAD_FORMAT=auto``. Knobs: ``TWILIGHT_TEST_PORT`` (30100),
``TWILIGHT_TEST_MEM_FRACTION`` (0.8), ``TWILIGHT_TEST_START_TIMEOUT`` (600 s). The twilight server's KV
pool is capped at ``POOL_TOKENS`` so that a few long prompts evict cached prefixes. Server logs go to
``$OUT`` (or the pytest tmp dir).

Dense vs twilight with dummy weights: prefill is FlashInfer in both backends, so the first
generated token must be identical; later tokens come from the sparse decode and, with nearly flat
dummy logits, may flip at near-ties: mismatches are logged with both servers' logprobs, and where
the two token prefixes agree the logprob of the same token must agree closely.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.gpu
log = logging.getLogger("test_serving_gpu")

MODEL = os.environ.get("TWILIGHT_TEST_MODEL")
LOAD_FORMAT = os.environ.get("TWILIGHT_TEST_LOAD_FORMAT", "dummy")
MEM = os.environ.get("TWILIGHT_TEST_MEM_FRACTION", "0.8")
START_TIMEOUT = float(os.environ.get("TWILIGHT_TEST_START_TIMEOUT", "600"))
CTX = 8192
POOL_TOKENS = 40960  # twilight server: small enough that ~6 distinct 7k prompts evict the cache
ROWS_GAUGE = "sglang_twilight_sidecar_prefill_rows"

if not MODEL:
    pytest.skip("set TWILIGHT_TEST_MODEL to a model folder (e.g. /tmp/llama8b-dummy)",
                allow_module_level=True)

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def _free_port(preferred: int) -> int:
    for port in [preferred] + [0] * 5:
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            return s.getsockname()[1]
        except OSError:
            continue
        finally:
            s.close()
    raise RuntimeError("no free port")


class Server:
    """A server process in its own process group; stop() kills the whole group."""

    def __init__(self, name, argv, log_dir, port):
        self.name, self.argv, self.port = name, argv, port
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = os.path.join(log_dir, f"server_{name}.log")
        self.p = None

    def start(self, timeout=START_TIMEOUT):
        self.logf = open(self.log_path, "a")
        self.p = subprocess.Popen(self.argv, start_new_session=True, stdout=self.logf,
                                  stderr=subprocess.STDOUT)
        t0 = time.time()
        while time.time() - t0 < timeout:
            rc = self.p.poll()
            if rc is not None:
                self.stop()
                raise RuntimeError(f"{self.name} server exited rc={rc}: {self.tail()}")
            try:
                if self.get("/health", timeout=5)[0] == 200:
                    log.info("%s up in %.0fs", self.name, time.time() - t0)
                    return self
            except Exception:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"{self.name} server not healthy in {timeout:.0f}s: {self.tail()}")

    def tail(self, n=30):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])[-4000:]
        except OSError:
            return ""

    def stop(self):
        if self.p is None:
            return
        try:
            os.killpg(self.p.pid, signal.SIGTERM)
            self.p.wait(timeout=30)
        except Exception:
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(timeout=10)
            except Exception:
                pass
        self.logf.close()
        self.p = None
        _wait_gpu_free()

    def get(self, path, timeout=30):
        return self._req(path, None, timeout)

    def post(self, path, payload, timeout=300):
        return self._req(path, payload, timeout)

    def _req(self, path, payload, timeout):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.base + path, data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                st, body = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            st, body = e.code, e.read().decode(errors="replace")
        try:
            return st, json.loads(body)
        except ValueError:
            return st, body

    def generate(self, ids, n=16, logprobs=True, **sp):
        payload = {"input_ids": ids,
                   "sampling_params": dict({"max_new_tokens": n, "temperature": 0}, **sp)}
        if logprobs:
            payload.update(return_logprob=True, top_logprobs_num=2)
        st, r = self.post("/generate", payload)
        assert st == 200, (st, r)
        return r


def _wait_gpu_free(limit_s=60):
    t = time.time()
    while time.time() - t < limit_s:
        try:
            used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                                   "--format=csv,noheader,nounits"], capture_output=True,
                                  text=True, timeout=10).stdout.split()
            if int(used[0]) < 3000:
                return
        except Exception:
            return
        time.sleep(1)


def _common(port, tmpl):
    return ["--model-path", MODEL, "--load-format", LOAD_FORMAT, "--mem-fraction-static", MEM,
            "--context-length", str(CTX), "--max-running-requests", "8",
            "--cuda-graph-max-bs-decode", "8", "--page-size", "16", "--chat-template", tmpl,
            "--host", "127.0.0.1", "--port", str(port)]


def _twilight_argv(port, tmpl, *extra):
    # p = 1 and B0 >= context: every token kept, so decode must equal dense attention
    return [sys.executable, "-m", "sglang_twilight.launch_server"] + _common(port, tmpl) + [
        "--top-p-attn", "1.0", "--twilight-budget", str(CTX), "--twilight-min-seq-len", "0",
        "--twilight-min-budget", "1", "--max-total-tokens", str(POOL_TOKENS),
        "--enable-metrics"] + list(extra)


def _dense_argv(port, tmpl):
    return [sys.executable, "-m", "sglang.launch_server"] + _common(port, tmpl) + [
        "--attention-backend", "flashinfer"]


def _prompts():
    rng = random.Random(7)
    return [[rng.randrange(1000, 30000) for _ in range(n)] for n in (40, 2000, 3500, 5000, 7500)]


N_NEW = 32
NEAR_TIE = 0.1  # a greedy flip is accepted only where the dense top-2 logprobs are this close


def _run_prompts(srv):
    return [srv.generate(p, n=N_NEW) for p in _prompts()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = os.environ.get("OUT") or str(tmp_path_factory.mktemp("serving"))
    os.makedirs(out, exist_ok=True)
    tmpl = os.path.join(out, "chat.jinja")
    with open(tmpl, "w") as f:
        f.write(CHAT_TEMPLATE)
    port = _free_port(int(os.environ.get("TWILIGHT_TEST_PORT", "30100")))
    return out, tmpl, port


@pytest.fixture(scope="module")
def dense_out(setup):
    """The dense FlashInfer backend's greedy outputs for ``_prompts()`` (its server stopped)."""
    out, tmpl, port = setup
    dense = Server("dense", _dense_argv(port, tmpl), out, port).start()
    try:
        return _run_prompts(dense)
    finally:
        dense.stop()


@pytest.fixture(scope="module")
def dense_spread(setup, dense_out):
    """How far SGLang's two dense backends (FlashInfer, Triton) drift apart on ``_prompts()``:
    the largest logprob difference while their greedy tokens agree, and the largest top-2 gap at
    which their greedy tokens part. Two correct bf16 attention kernels differ by rounding, and a
    deep model amplifies it; the sparse decode at p = 1 is held to the same spread (x 1.5).
    Returns the ``_compare_greedy`` tolerances (``tol``, ``near_tie``) that spread gives."""
    out, tmpl, port = setup
    argv = [a if a != "flashinfer" else "triton" for a in _dense_argv(port, tmpl)]
    srv = Server("dense_triton", argv, out, port).start()
    try:
        got = _run_prompts(srv)
    finally:
        srv.stop()
    lp, gap = 0.0, 0.0
    for a, b in zip(got, dense_out):
        agree = _agree(a, b)
        for j in range(min(agree, len(_lps(a)), len(_lps(b)))):
            lp = max(lp, abs(_lps(a)[j] - _lps(b)[j]))
        if agree < len(_ids(a)) and _top(b, agree) and len(_top(b, agree)) > 1:
            gap = max(gap, _top(b, agree)[0][0] - _top(b, agree)[1][0])
    print(f"dense triton vs flashinfer: max logprob diff {lp:.4f}, divergence top-2 gap {gap:.4f}")
    return dict(tol=1.5 * lp, near_tie=max(NEAR_TIE, 1.5 * gap))


@pytest.fixture(scope="module")
def servers(setup, dense_out, dense_spread):
    """The twilight server (after the dense reference servers have stopped)."""
    out, tmpl, port = setup
    tw = Server("twilight", _twilight_argv(port, tmpl), out, port).start()
    try:
        yield tw, dense_out, out, tmpl
    finally:
        tw.stop()


def _ids(r):
    return list(r["output_ids"])


def _lps(r):
    return [x[0] for x in r["meta_info"].get("output_token_logprobs") or []]


def _top(r, i):
    tops = r["meta_info"].get("output_top_logprobs") or []
    return [(round(x[0], 4), x[1]) for x in tops[i]] if i < len(tops) and tops[i] else None


def _agree(a, b) -> int:
    """How many leading output tokens two responses share (``a``'s length when all)."""
    ia, ib = _ids(a), _ids(b)
    return next((j for j in range(min(len(ia), len(ib))) if ia[j] != ib[j]), len(ia))


def test_generate_and_openai_endpoints(servers):
    tw = servers[0]
    r = tw.generate(list(range(1000, 3000)), n=8, logprobs=False)
    assert len(r["output_ids"]) == 8
    st, r = tw.post("/v1/completions", {"model": "default", "prompt": "The capital of France is",
                                        "max_tokens": 8, "temperature": 0})
    assert st == 200 and r["choices"][0]["text"] is not None and r["usage"]["completion_tokens"] > 0
    st, r = tw.post("/v1/chat/completions", {"model": "default", "max_tokens": 8, "temperature": 0,
                                             "messages": [{"role": "user", "content": "Hello!"}]})
    assert st == 200 and r["choices"][0]["message"]["content"] is not None
    st, info = tw.get("/server_info")
    assert st == 200 and info.get("attention_backend") == "twilight" and info.get("page_size") == 16


def _compare_greedy(got, ref, what, first_exact=True, tol=0.0, near_tie=NEAR_TIE):
    """Greedy outputs against a reference: the same logprobs while the tokens agree (within
    0.05 + 2 %, or ``tol``), and a divergence only at a near-tie of the reference's top-2
    logprobs (gap <= ``near_tie``). ``first_exact``: the first token must be equal outright (the
    same prefill computation in both). Returns the failures."""
    report, bad = [], []
    for i, (a, b) in enumerate(zip(got, ref)):
        ia, ib = _ids(a), _ids(b)
        la, lb = _lps(a), _lps(b)
        if first_exact and ia[0] != ib[0]:
            bad.append(f"prompt {i}: first token {ia[0]} != reference {ib[0]}")
        agree = _agree(a, b)
        for j in range(min(agree, len(la), len(lb))):
            if abs(la[j] - lb[j]) > max(0.05 + 0.02 * abs(lb[j]), tol):
                bad.append(f"prompt {i} token {j}: logprob {la[j]:.4f} vs reference {lb[j]:.4f}")
                break
        if agree < len(ia):
            top = _top(b, agree)
            gap = top[0][0] - top[1][0] if top and len(top) > 1 else float("inf")
            line = (f"prompt {i}: diverges at token {agree}: {what} {ia[agree]} top2 "
                    f"{_top(a, agree)} | reference {ib[agree]} top2 {top}")
            report.append(line)
            if gap > near_tie:
                bad.append(line + f" (reference top-2 gap {gap:.3f} > {near_tie:.3f}: not a near-tie)")
    for line in report:
        log.warning("greedy divergence at a near-tie: %s", line)
    print(f"{what}, {N_NEW} greedy tokens x {len(ref)} prompts: "
          + ("; ".join(report) or "all equal"))
    return bad


def test_greedy_matches_dense(servers, dense_spread):
    """p = 1, B0 >= context: the sparse decode attends every token, so its greedy output is the
    dense one's up to the spread between SGLang's own dense backends (x 1.5)."""
    tw, dense_out = servers[0], servers[1]
    bad = _compare_greedy(_run_prompts(tw), dense_out, "twilight vs dense", **dense_spread)
    assert not bad, bad


def test_tp2_matches_tp1(servers, dense_spread):
    """``--tp 2`` on two GPUs serves, and at p = 1 (B0 >= context) gives the TP=1 dense output.

    Needs a model with informative logits (dummy weights give a flat distribution: every greedy
    token is a tie) whose head counts split in two; SmolLM2-135M (9 q / 3 KV heads) padded with
    zero heads to 12 / 4 (``python -m tests.models pad``) computes exactly SmolLM2's outputs.
    Sharded matmuls and the all-reduce change the prefill's rounding too, so even the first token
    may flip at a near-tie."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    tw, dense_out, out, tmpl = servers
    tw.stop()  # its GPU memory is needed
    tp2 = Server("twilight_tp2", _twilight_argv(tw.port, tmpl, "--tp", "2"), out, tw.port).start()
    try:
        got = _run_prompts(tp2)
        st, r = tp2.post("/v1/completions", {"model": "default", "prompt": "Hello", "max_tokens": 4,
                                             "temperature": 0})
        assert st == 200 and r["usage"]["completion_tokens"] > 0
    finally:
        tp2.stop()
        tw.start()
    bad = _compare_greedy(got, dense_out, "twilight tp2 vs dense tp1", first_exact=False,
                          **dense_spread)
    assert not bad, bad


def _prefill_rows(srv) -> float:
    """The sidecar rows written by prefill/extend so far (first sparse layer), from /metrics."""
    with urllib.request.urlopen(srv.base + "/metrics", timeout=30) as r:
        text = r.read().decode()
    vals = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(ROWS_GAUGE + "{")]
    assert vals, f"{ROWS_GAUGE} not in /metrics"
    return sum(vals)


def test_shared_prefix_reuses_cache_and_matches_no_hit(servers):
    """The second of two requests sharing a 4k prefix hits the radix cache, writes sidecar rows
    only for its own new tokens, and decodes like the same request with no cache hit."""
    tw = servers[0]
    rng = random.Random(11)
    prefix = [rng.randrange(1000, 30000) for _ in range(4096)]
    a = prefix + [rng.randrange(1000, 30000) for _ in range(200)]
    b = prefix + [rng.randrange(1000, 30000) for _ in range(300)]
    assert tw.post("/flush_cache", {})[0] == 200
    tw.generate(a, n=4, logprobs=False)
    rows0 = _prefill_rows(tw)
    hit = tw.generate(b, n=N_NEW)
    cached = hit["meta_info"].get("cached_tokens", 0)
    assert cached >= 4096 - 16, hit["meta_info"]
    rows1 = _prefill_rows(tw)
    print(f"prefix hit: cached {cached} of {len(b)}, sidecar rows written {rows1 - rows0:.0f}")
    assert rows1 - rows0 == len(b) - cached, (rows0, rows1, cached)
    assert tw.post("/flush_cache", {})[0] == 200
    miss = tw.generate(b, n=N_NEW)
    assert miss["meta_info"].get("cached_tokens", 0) == 0
    # the hit's prefill attends over the cached prefix through another FlashInfer path than the
    # miss's one-pass prefill, so even its first token may flip - at a near-tie only
    bad = _compare_greedy([hit], [miss], "prefix hit vs miss", first_exact=False)
    assert not bad, bad


def test_concurrent_mixed_lengths_and_abort(servers):
    """Requests of different lengths join and leave the running batch; a client that hangs up
    mid-stream is aborted; the server keeps serving."""
    tw = servers[0]
    rng = random.Random(5)
    results, errors = {}, []

    def one(i, n_in, n_out):
        try:
            ids = [rng.randrange(1000, 30000) for _ in range(n_in)]
            results[i] = tw.generate(ids, n=n_out, logprobs=False, ignore_eos=True)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    def aborted():
        conn = http.client.HTTPConnection("127.0.0.1", tw.port, timeout=120)
        body = {"input_ids": list(range(1000, 5000)), "stream": True,
                "sampling_params": {"max_new_tokens": 2000, "temperature": 0, "ignore_eos": True}}
        conn.request("POST", "/generate", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        got = 0
        for line in resp:
            if line.startswith(b"data:"):
                got += 1
                if got >= 5:
                    break
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()  # client disconnect -> SGLang aborts the request

    threads = [threading.Thread(target=one, args=(i, n_in, n_out)) for i, (n_in, n_out) in
               enumerate([(100, 40), (2500, 8), (6000, 24), (30, 64), (1200, 16), (4000, 4)])]
    threads.append(threading.Thread(target=aborted))
    for t in threads:
        t.start()
        time.sleep(0.2)
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert sorted(len(r["output_ids"]) for r in results.values()) == [4, 8, 16, 24, 40, 64]
    time.sleep(2)
    assert tw.get("/health")[0] == 200
    r = tw.generate(list(range(1000, 1500)), n=4, logprobs=False)
    assert len(r["output_ids"]) == 4
    with open(tw.log_path, errors="replace") as f:
        text = f.read()
    assert "Traceback" not in text, tw.tail()


def test_eager_equals_graph(servers, tmp_path):
    """Decode inside SGLang's CUDA graphs (default) and eager decode give the same tokens."""
    tw, _, out, tmpl = servers
    graph = [tw.generate(p, n=8) for p in _prompts()[:3]]
    tw.stop()
    eager = Server("twilight_eager", _twilight_argv(tw.port, tmpl, "--disable-cuda-graph"),
                   out, tw.port).start()
    try:
        got = [eager.generate(p, n=8) for p in _prompts()[:3]]
    finally:
        eager.stop()
        tw.start()  # leave the module's server running for any test after this one
    for g, e in zip(graph, got):
        n = _agree(g, e)
        for j in range(n):
            assert abs(_lps(g)[j] - _lps(e)[j]) < 0.05 + 0.02 * abs(_lps(e)[j])
        if n < 8:
            log.warning("graph vs eager diverge at token %d: %s vs %s", n, _top(g, n), _top(e, n))


def test_evicted_slots_serve_no_stale_sidecar(servers):
    """Under eviction pressure, a prompt whose slots were freed and handed to other requests is
    served exactly as on its first run. p = 0.5 makes the kept set depend on the sidecar's int4
    keys, so stale rows in reused slots would change it."""
    tw = servers[0]
    rng = random.Random(23)
    x = [rng.randrange(1000, 30000) for _ in range(6000)]
    sp = {"custom_params": {"top_p_attn": 0.5}}
    assert tw.post("/flush_cache", {})[0] == 200
    first = tw.generate(x, n=N_NEW, **sp)
    assert first["meta_info"].get("cached_tokens", 0) == 0
    for _ in range(POOL_TOKENS // 7000 + 2):  # distinct prompts: the pool must recycle x's slots
        tw.generate([rng.randrange(1000, 30000) for _ in range(7000)], n=4, logprobs=False, **sp)
    again = tw.generate(x, n=N_NEW, **sp)
    assert again["meta_info"].get("cached_tokens", 0) < 16, "x was not evicted; raise the pressure"
    assert _ids(again) == _ids(first)
    diff = max(abs(u - v) for u, v in zip(_lps(again), _lps(first)))
    print(f"after eviction: same {N_NEW} tokens, max logprob diff {diff:.2e}")
    assert diff < 1e-3
