#!/usr/bin/env python3
"""Load test of a twilight server: many requests, client aborts, radix-cache eviction, mixed
per-request p; afterwards nothing lost, nothing leaked, and the outputs still equal dense ones.

One run, bounded in time (``--budget-s``, default 360 s) and count (``--requests``), on loopback
only:

1. Starts ``python -m sglang_twilight.launch_server`` itself on 127.0.0.1 (``--model smollm2``: the
   real SmolLM2-135M-Instruct; ``--model llama8b-dummy``: the Llama-3.1-8B-shaped folder
   ``/tmp/llama8b-dummy`` with ``--load-format dummy``) with ``--context-length 8192``, a KV pool
   of ``--max-total-tokens 32768`` (four contexts: far less than 64 requests in flight need, so the
   scheduler queues, retracts and evicts radix-cache entries all the time), ``--top-p-attn 1``,
   ``--twilight-budget`` = the context (B0 >= context: at p = 1 every token is kept),
   ``--twilight-min-seq-len 0`` and ``--twilight-dispatch sparse`` (Twilight on every decode step,
   whatever the batch and context), ``--enable-metrics --decode-log-interval 1`` (the pool gauges
   are published at every step), ``--cuda-graph-max-bs-decode 32`` (larger batches run eagerly:
   both paths serve).
2. A sample of greedy requests (p = 1, 32 tokens each, logprobs) on an empty cache.
3. The load: ``--requests`` (1,000) ``/generate`` requests at ``--concurrency`` (64) in flight, of
   mixed prompt lengths up to the context (half short, some near the context), 60 % of them
   starting with one of a few long shared prefixes; per-request p drawn from
   ``1, 0.95, 0.9, 0.8, 0.6, 0.4`` or the server default; half streamed; 10 % streamed and closed by
   the client after a few events (mid-generation: those ask for 256 tokens, ignoring EOS). A line
   of progress every ``--progress-every`` requests.
4. When the server is idle again: the KV pool's free slots (``sglang:kv_available_tokens`` plus the
   radix cache's evictable ones, ``sglang:kv_evictable_tokens``, from ``/metrics``; SGLang's own
   idle invariant, ``scheduler_components/invariant_checker.py``) must equal the pool's size
   (``max_total_num_tokens`` from ``/server_info``), which is what the pool held free after the
   ``/flush_cache`` before the load. (``/flush_cache`` resets the allocator wholesale, so the count
   is read before the final flush, not after it.)
5. The sample again on an empty cache: the same tokens as in step 2 (nothing stale after load).
6. The dense server (``python -m sglang.launch_server --attention-backend flashinfer
   --page-size 16``, the same other flags) answers the sample; the twilight outputs must equal it,
   up to a divergence at a near-tie of the dense top-2 logprobs (``--near-tie``) and logprobs
   within ``--logprob-tol`` while the tokens agree. (Dummy weights give flat logits, where every
   greedy token is a near-tie: on ``llama8b-dummy`` this comparison says little; SmolLM2 is the
   one that counts.)

Passes when: the server never died and its log has no traceback, no request failed but the
client's own aborts, every completed request has its tokens (a length finish has exactly
``max_new_tokens``) or a stop reason, no slot leaked, the sample is unchanged after the load and
matches dense. Exit status 0 then, 1 otherwise; the JSON says why.

Writes ``benchmarks/results/load_test_<model>_<card>.json`` (``--out`` to change): card, versions,
commit (``$TWILIGHT_COMMIT``, else git), command, requests, completed, aborted, errors,
leaked_slots, wall_s, and the details (mix, finish reasons, cache hits, Twilight's decode steps by
path, the sample comparisons, the checks that failed). Server logs go to ``--log-dir``
(``$OUT`` if set, else /tmp/load_test).

On a GPU machine, from the repository root (the package installed; about 4-6 minutes each):

    python benchmarks/load_test.py --model smollm2 --model-path /tmp/smollm2-hf
    python benchmarks/load_test.py --model llama8b-dummy

The request mix (:func:`make_mix`), the accounting of responses (:func:`classify`,
:func:`summarize`, :func:`failed_checks`), the greedy comparison and the ``/metrics`` parser are
plain Python, tested on CPU in ``tests/test_load_test.py``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

try:
    from benchmarks.common import card_slug, commit, smi_card_name, versions, write_result
    from benchmarks.servers import Server, free_port
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from common import card_slug, commit, smi_card_name, versions, write_result
    from servers import Server, free_port

from sglang_twilight.metrics import parse_prometheus  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

# --------------------------------------------------------------------------- models

MODELS = {
    # real weights: greedy tokens mean something
    "smollm2": dict(model_path=None, load_format="auto"),
    # Llama-3.1-8B shapes, random weights (flat logits and attention)
    "llama8b-dummy": dict(model_path="/tmp/llama8b-dummy", load_format="dummy"),
}
CONTEXT = 8192
POOL_TOKENS = 4 * CONTEXT
PAGE = 16
TOKEN_LO, TOKEN_HI = 1000, 30000  # prompt token ids: inside both vocabularies, no special tokens

# per-request p; None: no custom_params (the server default, here 1)
P_CHOICES: tuple = (None, 1.0, 0.95, 0.9, 0.8, 0.6, 0.4)

# prompt length classes: (weight, lowest, highest as a fraction of the context or tokens)
LENGTH_CLASSES = (
    (0.50, 16, 512),
    (0.30, 512, 2048),
    (0.15, 2048, 6144),
    (0.05, "near", None),  # within ~1,200 tokens of the context
)
MAX_NEW_CHOICES = (1, 2, 8, 16, 32, 32, 64, 64, 128)
ABORT_MAX_NEW = 256
SAMPLE_NEW = 32


# --------------------------------------------------------------------------- the request mix


@dataclass(frozen=True)
class RequestSpec:
    """One request of the mix. The prompt is ``prefixes[prefix]`` (none when ``prefix`` is -1)
    followed by ``suffix_len`` ids drawn from ``Random(seed)``."""

    idx: int
    prefix: int
    prefix_len: int
    suffix_len: int
    seed: int
    max_new_tokens: int
    ignore_eos: bool
    top_p_attn: Optional[float]
    stream: bool
    abort_after: Optional[int]  # the client closes the stream after this many events

    @property
    def prompt_len(self) -> int:
        return self.prefix_len + self.suffix_len


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(TOKEN_LO, TOKEN_HI) for _ in range(n)]


def make_prefixes(context: int, n: int, seed: int) -> list[list[int]]:
    """``n`` shared prefixes, from 512 tokens up to about 3/4 of the context; every second one
    ends mid-page (sharing then splits a page between the cached prefix and each request)."""
    rng = random.Random(seed * 7919 + 1)
    top = max(512, int(0.75 * context))
    out = []
    for i in range(n):
        length = int(512 * (top / 512) ** (i / max(1, n - 1)))
        if i % 2:
            length += 7
        out.append(_ids(rng, min(length, context - 256)))
    return out


def _prompt_len(rng: random.Random, context: int) -> int:
    r = rng.random()
    acc = 0.0
    for weight, lo, hi in LENGTH_CLASSES:
        acc += weight
        if r < acc:
            break
    if lo == "near":
        return rng.randrange(max(16, context - 1200), context - 8)
    hi = min(hi, context - 8)
    return rng.randrange(min(lo, hi - 1), hi)


def make_mix(n: int, context: int = CONTEXT, *, seed: int = 0, abort_frac: float = 0.1,
             shared_frac: float = 0.6, n_prefixes: int = 6,
             p_choices: Sequence[Optional[float]] = P_CHOICES) -> tuple[list[list[int]], list[RequestSpec]]:
    """The shared prefixes and ``n`` requests (deterministic in ``seed``). Every request fits the
    context (prompt + new tokens <= context - 8); exactly ``round(abort_frac * n)`` are streams the
    client closes after 1-6 events, asking for up to 256 tokens with EOS ignored, so that they are
    still generating when closed."""
    if n < 0 or not 0 <= abort_frac <= 1 or not 0 <= shared_frac <= 1:
        raise ValueError("n >= 0, 0 <= abort_frac <= 1, 0 <= shared_frac <= 1")
    if context < 1024:
        raise ValueError(f"context {context} < 1024")
    rng = random.Random(seed)
    prefixes = make_prefixes(context, n_prefixes, seed)
    aborts = set(rng.sample(range(n), round(abort_frac * n)))
    specs = []
    for i in range(n):
        abort = i in aborts
        length = _prompt_len(rng, context)
        if abort:  # room for the tokens it asks for
            length = min(length, context - 8 - 64)
        prefix, plen = -1, 0
        if prefixes and rng.random() < shared_frac:
            fits = [j for j, p in enumerate(prefixes) if len(p) + 16 <= length]
            if not fits:  # too short for any prefix: a prefix and a short suffix instead
                prefix = rng.randrange(len(prefixes))
                length = min(len(prefixes[prefix]) + rng.randrange(16, 512),
                             context - 8 - (64 if abort else 1))
            else:
                prefix = rng.choice(fits)
            plen = len(prefixes[prefix])
        room = context - 8 - length
        if abort:
            max_new = min(ABORT_MAX_NEW, room)
        else:
            max_new = min(rng.choice(MAX_NEW_CHOICES), room)
        specs.append(RequestSpec(
            idx=i, prefix=prefix, prefix_len=plen, suffix_len=length - plen,
            seed=rng.randrange(1 << 30), max_new_tokens=max_new,
            ignore_eos=True if abort else rng.random() < 0.5,
            top_p_attn=rng.choice(list(p_choices)) if p_choices else None,
            stream=True if abort else rng.random() < 0.5,
            abort_after=rng.randint(1, 6) if abort else None))
    return prefixes, specs


def prompt_ids(spec: RequestSpec, prefixes: Sequence[Sequence[int]]) -> list[int]:
    head = list(prefixes[spec.prefix]) if spec.prefix >= 0 else []
    return head + _ids(random.Random(spec.seed), spec.suffix_len)


def payload(spec: RequestSpec, prefixes: Sequence[Sequence[int]]) -> dict:
    """The ``/generate`` body of ``spec`` (greedy)."""
    sp: dict[str, Any] = {"max_new_tokens": spec.max_new_tokens, "temperature": 0,
                          "ignore_eos": spec.ignore_eos}
    if spec.top_p_attn is not None:
        sp["custom_params"] = {"top_p_attn": spec.top_p_attn}
    return {"input_ids": prompt_ids(spec, prefixes), "sampling_params": sp, "stream": spec.stream}


def mix_stats(specs: Sequence[RequestSpec]) -> dict:
    lens = sorted(s.prompt_len for s in specs)
    return {
        "requests": len(specs),
        "prompt_len": {"min": lens[0], "p50": lens[len(lens) // 2], "max": lens[-1],
                       "mean": round(sum(lens) / len(lens), 1)} if lens else {},
        "shared_prefix": sum(s.prefix >= 0 for s in specs),
        "streamed": sum(s.stream for s in specs),
        "planned_aborts": sum(s.abort_after is not None for s in specs),
        "ignore_eos": sum(s.ignore_eos for s in specs),
        "top_p_attn": {str(k): v for k, v in sorted(Counter(s.top_p_attn for s in specs).items(),
                                                     key=lambda kv: (kv[0] is None, kv[0] or 0))},
        "new_tokens_asked": sum(s.max_new_tokens for s in specs),
    }


# --------------------------------------------------------------------------- accounting


@dataclass
class Outcome:
    """What became of one request: ``kind`` is completed, aborted (by the client, as planned) or
    error."""

    idx: int
    kind: str
    status: Optional[int] = None
    tokens: int = 0
    finish: Optional[str] = None
    cached_tokens: int = 0
    events: int = 0
    seconds: float = 0.0
    error: Optional[str] = None


def _finish_type(meta: dict) -> Optional[str]:
    fr = meta.get("finish_reason")
    if isinstance(fr, dict):
        return fr.get("type")
    return fr if isinstance(fr, str) else None


def classify(spec: RequestSpec, status: Optional[int], final: Optional[dict], *, events: int = 0,
             closed_early: bool = False, done: bool = True, error: Optional[str] = None,
             seconds: float = 0.0) -> Outcome:
    """Judge one response. ``final``: the JSON body (non-stream) or the last ``data:`` event of a
    stream; ``events``: data events read; ``closed_early``: the client closed the stream before it
    ended (its planned abort); ``done``: the stream ended with ``[DONE]``; ``error``: a transport
    error. Completed means: HTTP 200, a finish reason ``length`` with exactly ``max_new_tokens``
    tokens or ``stop`` with at most that many, ``output_ids`` and ``completion_tokens`` agreeing."""
    o = Outcome(spec.idx, "error", status=status, events=events, seconds=round(seconds, 3))
    if error is not None:
        o.error = error
        return o
    if status != 200:
        body = json.dumps(final)[:300] if final is not None else ""
        o.error = f"HTTP {status}: {body}"
        return o
    if final is None:
        if closed_early and spec.abort_after is not None:
            o.kind = "aborted"
            return o
        o.error = "no response body" if not spec.stream else "stream without a data event"
        return o
    if "error" in final:
        o.error = f"error event: {json.dumps(final['error'])[:300]}"
        return o
    meta = final.get("meta_info") or {}
    finish = _finish_type(meta)
    ids = final.get("output_ids") or []
    o.tokens, o.finish = len(ids), finish
    o.cached_tokens = int(meta.get("cached_tokens") or 0)
    if closed_early and spec.abort_after is not None and finish is None:
        o.kind = "aborted"
        return o
    if spec.stream and not done and finish is None:
        o.error = f"stream ended after {events} events without a finish reason"
        return o
    if finish == "length":
        if len(ids) != spec.max_new_tokens:
            o.error = f"length finish with {len(ids)} of {spec.max_new_tokens} tokens"
            return o
    elif finish == "stop":
        if len(ids) > spec.max_new_tokens:
            o.error = f"stop finish with {len(ids)} > {spec.max_new_tokens} tokens"
            return o
    elif finish == "abort":
        o.error = f"aborted by the server: {json.dumps(meta.get('finish_reason'))[:300]}"
        return o
    else:
        o.error = f"finish reason {finish!r} ({json.dumps(meta.get('finish_reason'))[:200]})"
        return o
    ct = meta.get("completion_tokens")
    if ct is not None and int(ct) != len(ids):
        o.error = f"completion_tokens {ct} != {len(ids)} output ids"
        return o
    o.kind = "completed"
    return o


def summarize(specs: Sequence[RequestSpec], outcomes: Iterable[Outcome]) -> dict:
    """Counts over the outcomes (requests never sent count as ``not_sent``)."""
    by_idx = {o.idx: o for o in outcomes}
    kinds = Counter(o.kind for o in by_idx.values())
    finishes = Counter(o.finish for o in by_idx.values() if o.kind == "completed")
    errors = [f"#{o.idx}: {o.error}" for o in by_idx.values() if o.kind == "error"]
    planned = [s.idx for s in specs if s.abort_after is not None]
    done = [o for o in by_idx.values() if o.kind == "completed"]
    return {
        "requests": len(specs),
        "sent": len(by_idx),
        "not_sent": sum(1 for s in specs if s.idx not in by_idx),
        "completed": kinds.get("completed", 0),
        "aborted": kinds.get("aborted", 0),
        "errors": kinds.get("error", 0),
        "error_samples": errors[:12],
        "planned_aborts": len(planned),
        "planned_aborts_finished_first": sum(1 for i in planned
                                            if i in by_idx and by_idx[i].kind == "completed"),
        "unplanned_aborts": sum(1 for o in by_idx.values() if o.kind == "aborted"
                                and specs[o.idx].abort_after is None),
        "finish_reasons": dict(sorted((str(k), v) for k, v in finishes.items())),
        "completed_without_tokens_or_stop": sum(1 for o in done
                                                if o.tokens < 1 and o.finish != "stop"),
        "output_tokens": sum(o.tokens for o in done),
        "cached_tokens": sum(o.cached_tokens for o in by_idx.values()),
        "prompt_tokens_sent": sum(specs[i].prompt_len for i in by_idx),
    }


def failed_checks(res: dict) -> list[str]:
    """What makes the run fail, from the result dict ``main`` builds (empty: passed)."""
    bad = []
    s = res.get("load") or {}
    if res.get("crashed"):
        bad.append(f"server died: {res['crashed']}")
    if res.get("tracebacks"):
        bad.append(f"{res['tracebacks']} traceback(s) in the twilight server log")
    if s.get("errors"):
        bad.append(f"{s['errors']} request(s) failed: {s.get('error_samples', [])[:3]}")
    if s.get("not_sent"):
        bad.append(f"{s['not_sent']} request(s) not sent within the time budget")
    if s.get("unplanned_aborts"):
        bad.append(f"{s['unplanned_aborts']} request(s) ended without a finish reason")
    if s.get("completed_without_tokens_or_stop"):
        bad.append(f"{s['completed_without_tokens_or_stop']} completed request(s) without tokens "
                   "or a stop reason")
    if s and s.get("aborted", 0) < 0.5 * s.get("planned_aborts", 0):
        bad.append(f"only {s.get('aborted')} of {s.get('planned_aborts')} planned aborts happened")
    if res.get("leaked_slots") is None:
        bad.append("the KV pool's free slots could not be read")
    elif res["leaked_slots"] != 0:
        bad.append(f"{res['leaked_slots']} KV slot(s) leaked")
    for name in ("sample_after_load", "sample_vs_dense"):
        c = res.get(name)
        if c is None:
            bad.append(f"{name}: not run")
        elif c.get("failures"):
            bad.append(f"{name}: {c['failures'][:3]}")
    return bad


# --------------------------------------------------------------------------- greedy comparison


def _out_ids(r: dict) -> list[int]:
    return list(r.get("output_ids") or [])


def _out_lps(r: dict) -> list[float]:
    return [x[0] for x in (r.get("meta_info") or {}).get("output_token_logprobs") or []]


def _top2(r: dict, i: int) -> Optional[list]:
    tops = (r.get("meta_info") or {}).get("output_top_logprobs") or []
    return [(round(x[0], 4), x[1]) for x in tops[i]] if i < len(tops) and tops[i] else None


def agree_len(a: dict, b: dict) -> int:
    ia, ib = _out_ids(a), _out_ids(b)
    return next((j for j in range(min(len(ia), len(ib))) if ia[j] != ib[j]), min(len(ia), len(ib)))


def compare_greedy(got: Sequence[dict], ref: Sequence[dict], *, tol: float, near_tie: float,
                   first_exact: bool = False, exact: bool = False) -> dict:
    """Greedy outputs (``/generate`` with logprobs and top-2) against a reference, prompt by
    prompt: while the tokens agree the logprobs stay within ``tol``; where they part, the
    reference's top-2 logprobs must be within ``near_tie`` (a near-tie: rounding may pick either);
    a shorter output must end where the reference ends. ``exact``: the tokens must be equal
    outright. ``first_exact``: the first token must be (the same prefill in both). Returns
    ``{"failures": [...], "diverged": [...], "equal": n, "compared_tokens": n, "tokens": n}``."""
    failures, diverged = [], []
    equal = compared = total = 0
    if len(got) != len(ref):
        failures.append(f"{len(got)} outputs against {len(ref)} references")
    for i, (a, b) in enumerate(zip(got, ref)):
        ia, ib = _out_ids(a), _out_ids(b)
        la, lb = _out_lps(a), _out_lps(b)
        n = agree_len(a, b)
        total += len(ib)
        compared += n
        if ia == ib:
            equal += 1
        if not ia and ib:
            failures.append(f"prompt {i}: no tokens")
            continue
        if first_exact and ia[:1] != ib[:1]:
            failures.append(f"prompt {i}: first token {ia[:1]} != reference {ib[:1]}")
        for j in range(min(n, len(la), len(lb))):
            if abs(la[j] - lb[j]) > tol:
                failures.append(f"prompt {i} token {j}: logprob {la[j]:.4f} vs reference {lb[j]:.4f}")
                break
        if ia == ib:
            continue
        if n == min(len(ia), len(ib)):  # one is a prefix of the other
            failures.append(f"prompt {i}: {len(ia)} tokens against {len(ib)} in the reference")
            continue
        top = _top2(b, n)
        gap = top[0][0] - top[1][0] if top and len(top) > 1 else float("inf")
        line = (f"prompt {i}: token {n}: {ia[n]} vs reference {ib[n]}; reference top-2 {top}, "
                f"ours {_top2(a, n)}")
        diverged.append(line)
        if exact:
            failures.append(line + " (must be equal)")
        elif gap > near_tie:
            failures.append(line + f" (top-2 gap {gap:.3f} > {near_tie}: not a near-tie)")
    return {"failures": failures, "diverged": diverged, "equal": equal,
            "compared_tokens": compared, "tokens": total}


# --------------------------------------------------------------------------- /metrics


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {metric name: sum of its samples over label sets}."""
    out: dict[str, float] = {}
    for name, _, v in parse_prometheus(text):
        out[name] = out.get(name, 0.0) + v
    return out


# --------------------------------------------------------------------------- servers


def _log(*a: Any) -> None:
    print(f"[load_test +{time.monotonic() - _T0:.0f}s]", *a, flush=True)


_T0 = time.monotonic()


def wait_gpu_free(limit_s: float = 60, below_mib: int = 3000) -> None:
    """Until the GPU's used memory is below ``below_mib`` (a stopped server's memory comes back
    a little after its processes exit), at most ``limit_s``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        try:
            used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                                   "--format=csv,noheader,nounits"], capture_output=True,
                                  text=True, timeout=10).stdout.split()
            if not used or int(used[0]) < below_mib:
                return
        except (OSError, ValueError, subprocess.SubprocessError):
            return
        time.sleep(1)


def common_flags(model_path: str, load_format: str, port: int, args) -> list[str]:
    return ["--model-path", model_path, "--load-format", load_format,
            "--context-length", str(args.context), "--max-total-tokens", str(args.pool_tokens),
            "--page-size", str(PAGE), "--mem-fraction-static", str(args.mem_fraction),
            "--cuda-graph-max-bs-decode", "32", "--chunked-prefill-size", "8192",
            "--enable-metrics", "--decode-log-interval", "1",
            "--host", "127.0.0.1", "--port", str(port)]


def twilight_flags(args) -> list[str]:
    return ["--top-p-attn", "1", "--twilight-budget", str(args.context),
            "--twilight-min-seq-len", "0", "--twilight-min-budget", "1",
            "--twilight-dispatch", args.dispatch]


# --------------------------------------------------------------------------- the client


def _stream(srv: Server, spec: RequestSpec, body: dict, timeout: float):
    """One streamed request: (status, last data event, events, closed early, saw [DONE])."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=timeout)
    resp = None
    try:
        conn.request("POST", "/generate", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            text = resp.read().decode(errors="replace")
            try:
                return resp.status, json.loads(text), 0, False, False
            except ValueError:
                return resp.status, {"body": text[:300]}, 0, False, False
        last, events, done = None, 0, False
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            events += 1
            last = json.loads(data)
            if "error" in last:
                break
            if spec.abort_after is not None and events >= spec.abort_after:
                if _finish_type(last.get("meta_info") or {}) is None:
                    if conn.sock is not None:  # the client hangs up mid-generation
                        conn.sock.shutdown(socket.SHUT_RDWR)
                    return 200, last, events, True, False
        return 200, last, events, False, done
    finally:
        if resp is not None:
            resp.close()
        conn.close()


def run_one(srv: Server, spec: RequestSpec, prefixes, timeout: float) -> Outcome:
    body = payload(spec, prefixes)
    t0 = time.monotonic()
    try:
        if spec.stream:
            st, last, events, closed, done = _stream(srv, spec, body, timeout)
            return classify(spec, st, last, events=events, closed_early=closed, done=done,
                            seconds=time.monotonic() - t0)
        st, res = srv.post("/generate", body, timeout=timeout)
        return classify(spec, st, res if isinstance(res, dict) else {"body": str(res)[:300]},
                        seconds=time.monotonic() - t0)
    except Exception as e:  # noqa: BLE001 - a transport failure is an error outcome
        return classify(spec, None, None, error=f"{type(e).__name__}: {e}",
                        seconds=time.monotonic() - t0)


def run_load(srv: Server, specs: Sequence[RequestSpec], prefixes, *, concurrency: int,
             deadline: float, progress_every: int, timeout: float) -> list[Outcome]:
    """Send ``specs`` with ``concurrency`` requests in flight until done or ``deadline``
    (monotonic time: no request starts after it). A progress line every ``progress_every``."""
    todo = list(specs)
    lock = threading.Lock()
    outcomes: list[Outcome] = []
    t0 = time.monotonic()

    def worker():
        while True:
            with lock:
                if not todo or time.monotonic() > deadline:
                    return
                spec = todo.pop(0)
            o = run_one(srv, spec, prefixes, timeout)
            with lock:
                outcomes.append(o)
                n = len(outcomes)
                if n % progress_every == 0 or n == len(specs):
                    k = Counter(x.kind for x in outcomes)
                    _log(f"load: {n}/{len(specs)} done in {time.monotonic() - t0:.0f} s: "
                         f"{k.get('completed', 0)} completed, {k.get('aborted', 0)} aborted, "
                         f"{k.get('error', 0)} errors")

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(outcomes, key=lambda o: o.idx)


def sample_specs(prefixes, context: int, n: int = 8, seed: int = 99) -> list[RequestSpec]:
    """The comparison sample: greedy, ``SAMPLE_NEW`` tokens, p = 1 (server default), lengths from
    40 tokens to near the context, half of them on a shared prefix."""
    rng = random.Random(seed)
    lengths = [40, 300, 1500, 3000, 4500, 6000, 7000, context - SAMPLE_NEW - 16][:n]
    out = []
    for i, length in enumerate(lengths):
        prefix, plen = -1, 0
        if i % 2 and prefixes:
            fits = [j for j, p in enumerate(prefixes) if len(p) + 16 <= length]
            if fits:
                prefix = fits[-1]
                plen = len(prefixes[prefix])
        out.append(RequestSpec(idx=i, prefix=prefix, prefix_len=plen, suffix_len=length - plen,
                               seed=rng.randrange(1 << 30), max_new_tokens=SAMPLE_NEW,
                               ignore_eos=True, top_p_attn=None, stream=False, abort_after=None))
    return out


def run_sample(srv: Server, specs, prefixes) -> list[dict]:
    out = []
    for spec in specs:
        body = payload(spec, prefixes)
        body.update(return_logprob=True, top_logprobs_num=2)
        st, res = srv.post("/generate", body, timeout=300)
        if st != 200 or not isinstance(res, dict):
            raise RuntimeError(f"sample request {spec.idx} answered {st}: {str(res)[:300]}")
        out.append(res)
    return out


POOL_GAUGES = ("num_running_reqs", "num_queue_reqs", "kv_available_tokens",
               "kv_evictable_tokens", "kv_used_tokens")


def idle_pool(metrics: dict[str, float]) -> Optional[dict]:
    """The pool counters of a ``parse_metrics`` result when they were published with nothing
    running or waiting, else None. SGLang publishes them with every prefill and decode log line
    (``--decode-log-interval 1``: every step) and, once the running-request gauge is stale, from
    its idle loop; so zero running and waiting requests means the idle publication, after the
    last step."""
    vals = {k: metrics.get(f"sglang:{k}") for k in POOL_GAUGES}
    if vals["num_running_reqs"] == 0 and vals["num_queue_reqs"] == 0 \
            and vals["kv_available_tokens"] is not None:
        return vals
    return None


def leaked_slots(pool_tokens: int, idle: dict) -> int:
    """Slots neither free nor held by the radix cache on an idle server (SGLang's idle
    invariant: available + evictable + protected == total, nothing protected when idle)."""
    return int(pool_tokens - idle["kv_available_tokens"] - (idle["kv_evictable_tokens"] or 0))


def wait_idle_pool(srv: Server, timeout: float = 75) -> Optional[dict]:
    t0 = time.monotonic()
    vals = None
    while time.monotonic() - t0 < timeout:
        m = parse_metrics(srv.get_text("/metrics"))
        vals = idle_pool(m)
        if vals is not None:
            return vals
        time.sleep(1)
    _log(f"pool not idle within {timeout:.0f} s")
    return None


def twilight_steps(text: str) -> dict[str, float]:
    """Twilight's decode steps by path (sparse / dense) from /metrics."""
    out: dict[str, float] = {}
    for name, labels, v in parse_prometheus(text):
        if name == "sglang_twilight_decode_steps":
            key = labels.get("path", "?")
            out[key] = out.get(key, 0.0) + v
    return out


# --------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), required=True)
    ap.add_argument("--model-path", help="override the model folder (smollm2: default the "
                    "launcher's converted default model)")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--abort-frac", type=float, default=0.1)
    ap.add_argument("--context", type=int, default=CONTEXT)
    ap.add_argument("--pool-tokens", type=int, default=POOL_TOKENS,
                    help="--max-total-tokens of both servers (small: forces eviction)")
    ap.add_argument("--mem-fraction", type=float, default=0.8)
    ap.add_argument("--dispatch", choices=("sparse", "auto", "dense"), default="sparse",
                    help="--twilight-dispatch of the twilight server")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=360, help="the whole run, seconds")
    ap.add_argument("--start-timeout", type=float, default=240)
    ap.add_argument("--request-timeout", type=float, default=300)
    ap.add_argument("--progress-every", type=int, default=100)
    ap.add_argument("--logprob-tol", type=float, default=0.55,
                    help="sample vs dense: logprob difference allowed while tokens agree (1.5x "
                    "the largest seen between SGLang's FlashInfer and Triton dense backends on "
                    "SmolLM2)")
    ap.add_argument("--near-tie", type=float, default=0.2,
                    help="sample vs dense: a divergence is allowed where the dense top-2 "
                    "logprobs are this close")
    ap.add_argument("--skip-dense", action="store_true", help="no dense comparison (fails the run)")
    ap.add_argument("--out", help="result JSON (default benchmarks/results/"
                    "load_test_<model>_<card>.json)")
    ap.add_argument("--log-dir", default=os.environ.get("OUT") or "/tmp/load_test")
    # tests of the driver on CPU: a command (JSON list) run as "<cmd> twilight|dense <flags>"
    ap.add_argument("--server-prefix", type=json.loads, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    t_start = time.monotonic()
    end = t_start + args.budget_s
    card = smi_card_name()
    out_path = Path(args.out) if args.out else RESULTS / f"load_test_{args.model}_{card_slug(card)}.json"
    log_dir = Path(args.log_dir)
    prof = MODELS[args.model]
    model_path = args.model_path or prof["model_path"]
    if model_path is None:
        from sglang_twilight.default_model import default_model_path

        model_path = default_model_path(_log)
    if not Path(model_path, "config.json").is_file():
        print(f"--model-path: {model_path} has no config.json", file=sys.stderr)
        return 2

    prefixes, specs = make_mix(args.requests, args.context, seed=args.seed,
                               abort_frac=args.abort_frac)
    sample = sample_specs(prefixes, args.context)
    port = free_port()
    tw_cmd = [sys.executable, "-m", "sglang_twilight.launch_server"]
    dense_cmd = [sys.executable, "-m", "sglang.launch_server"]
    if args.server_prefix:
        tw_cmd, dense_cmd = args.server_prefix + ["twilight"], args.server_prefix + ["dense"]
    tw_argv = tw_cmd + common_flags(model_path, prof["load_format"], port, args) + twilight_flags(args)
    dense_argv = (dense_cmd + common_flags(model_path, prof["load_format"], port, args)
                  + ["--attention-backend", "flashinfer"])
    res: dict[str, Any] = {
        "card": card, "versions": versions(), "commit": commit(),
        "command": " ".join(["python"] + sys.argv),
        "model": args.model, "model_path": model_path, "load_format": prof["load_format"],
        "twilight_server": " ".join(tw_argv[1:]), "dense_server": " ".join(dense_argv[1:]),
        "mix": mix_stats(specs), "concurrency": args.concurrency, "context": args.context,
        "pool_tokens_flag": args.pool_tokens, "budget_s": args.budget_s,
        "requests": len(specs), "completed": 0, "aborted": 0, "errors": 0,
        "leaked_slots": None, "wall_s": None, "crashed": None, "tracebacks": None,
    }

    def save(final: bool = False):
        res["wall_s"] = round(time.monotonic() - t_start, 1)
        res["failed_checks"] = failed_checks(res)
        res["passed"] = final and not res["failed_checks"]
        write_result(out_path, res)

    tw = Server("twilight", tw_argv, port, log_dir / f"load_test_{args.model}_twilight.log",
                log=_log)
    before = None
    try:
        tw.start().wait_ready(min(args.start_timeout, end - time.monotonic()))
        st, info = tw.get("/server_info")
        pool = int(info.get("max_total_num_tokens")) if isinstance(info, dict) else None
        res["pool_tokens"] = pool
        res["attention_backend"] = info.get("attention_backend") if isinstance(info, dict) else None
        # warm-up (kernels compile at first use), then an empty cache
        run_sample(tw, sample[:2], prefixes)
        if not tw.flush_cache():
            raise RuntimeError("/flush_cache refused after the warm-up")
        before = run_sample(tw, sample, prefixes)
        if not tw.flush_cache():
            raise RuntimeError("/flush_cache refused before the load")
        res["free_slots_start"] = pool  # an emptied pool: every slot free
        steps0 = twilight_steps(tw.get_text("/metrics"))
        _log(f"load: {len(specs)} requests, {args.concurrency} in flight, pool {pool} tokens")
        t_load = time.monotonic()
        # time kept for what follows the load: idle wait and sample (~30 s), the dense server
        # (start and sample, ~90 s)
        reserve = 30 + (0 if args.skip_dense else 90)
        outcomes = run_load(tw, specs, prefixes, concurrency=args.concurrency,
                            deadline=end - reserve, progress_every=args.progress_every,
                            timeout=args.request_timeout)
        res["load_s"] = round(time.monotonic() - t_load, 1)
        s = summarize(specs, outcomes)
        res["load"] = s
        res.update(completed=s["completed"], aborted=s["aborted"], errors=s["errors"])
        res["latency_s"] = _latency([o for o in outcomes if o.kind == "completed"])
        save()
        if not tw.alive():
            res["crashed"] = f"exited with {tw.p.returncode}" if tw.p else "gone"
            raise RuntimeError("twilight server died during the load")
        idle = wait_idle_pool(tw)
        res["pool_after_load"] = idle
        if idle is not None and pool is not None:
            res["leaked_slots"] = leaked_slots(pool, idle)
            res["free_slots_end"] = pool - res["leaked_slots"]
        text = tw.get_text("/metrics")
        steps1 = twilight_steps(text)
        res["twilight_decode_steps"] = {k: steps1.get(k, 0) - steps0.get(k, 0) for k in steps1}
        m = parse_metrics(text)
        res["retracted_requests"] = m.get("sglang:num_retracted_requests_total")
        res["cache_hit_rate_gauge"] = m.get("sglang:cache_hit_rate")
        # the same sample on an empty cache again: nothing stale
        if not tw.flush_cache():
            raise RuntimeError("/flush_cache refused after the load")
        after = run_sample(tw, sample, prefixes)
        res["sample_after_load"] = compare_greedy(after, before, tol=1e-3, near_tie=0.0,
                                                  exact=True)
        st, h = tw.get("/health")
        res["health_after"] = st
        save()
    except Exception as e:  # noqa: BLE001 - recorded in the result
        res["exception"] = f"{type(e).__name__}: {e}"
        _log(res["exception"])
    finally:
        if tw.p is not None and not tw.alive() and not res.get("crashed"):
            res["crashed"] = f"exited with {tw.p.returncode}"
        tw.stop()
        res["tracebacks"] = _count_tracebacks(tw.log_path)
        save()

    if not args.skip_dense and before is not None and end - time.monotonic() > 60:
        wait_gpu_free()
        dense = Server("dense", dense_argv, port, log_dir / f"load_test_{args.model}_dense.log",
                       log=_log)
        try:
            dense.start().wait_ready(min(args.start_timeout, end - time.monotonic()))
            run_sample(dense, sample[:2], prefixes)
            dense.flush_cache()
            ref = run_sample(dense, sample, prefixes)
            res["sample_vs_dense"] = compare_greedy(before, ref, tol=args.logprob_tol,
                                                    near_tie=args.near_tie, first_exact=True)
        except Exception as e:  # noqa: BLE001
            res["dense_exception"] = f"{type(e).__name__}: {e}"
            _log(res["dense_exception"])
        finally:
            dense.stop()
    elif not args.skip_dense:
        res["dense_exception"] = "skipped: the twilight phase failed or the time budget ran out"
    save(final=True)
    _log(f"wrote {out_path}: {res['completed']} completed, {res['aborted']} aborted, "
         f"{res['errors']} errors, leaked {res['leaked_slots']}, {res['wall_s']} s; "
         + ("PASSED" if res["passed"] else f"FAILED: {res['failed_checks']}"))
    return 0 if res["passed"] else 1


def _latency(done: Sequence[Outcome]) -> dict:
    xs = sorted(o.seconds for o in done)
    if not xs:
        return {}
    return {"p50": xs[len(xs) // 2], "p99": xs[min(len(xs) - 1, int(0.99 * len(xs)))],
            "max": xs[-1]}


def _count_tracebacks(path: Path) -> Optional[int]:
    try:
        return Path(path).read_text(errors="replace").count("Traceback (most recent call last)")
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
