"""Time per output token of a served model: dense SGLang against the twilight server, both driven by
SGLang's own client (``python -m sglang.bench_serving``).

On one GPU it starts, one after the other and with the same flags and ``--mem-fraction-static``:

* dense: ``python -m sglang.launch_server --attention-backend flashinfer --page-size 16``;
* twilight: ``python -m sglang_twilight.launch_server`` (Twilight flags added: ``--top-p-attn``
  and, for the dummy 8B shape, ``--twilight-max-budget 512`` — dummy attention is flat, so top-p
  alone would keep almost every candidate).

Both with CUDA graphs (``--cuda-graph-max-bs-decode`` = the largest concurrency) and
``--enable-metrics``. For every (context, concurrency) cell it runs ``bench_serving`` (in this
process, its module imported once) with the ``random-ids`` dataset sent as token ids
(``--tokenize-prompt``: exactly ``context`` prompt tokens), fixed input and output lengths
(``--random-range-ratio 1``), ``--max-concurrency`` = concurrency, ``--num-prompts`` =
``--waves`` x concurrency (at least ``--min-prompts``) and ``--flush-cache`` (the warm-up
request's prompt is not a cache hit later), and keeps its median / p99 TPOT, median ITL, median
TTFT and output tokens/s, and the server's own count of the prompt, cached and generated tokens
over the cell (``server_*_tokens``, from SGLang's ``/metrics``; warm-up included).
A cell whose requests do not fit the KV pool at once (concurrency x (context + output) > pool
tokens) is reported as such, not run. For twilight the mean kept tokens per (request, KV head)
and the share of decode steps that went sparse come from the server's ``/metrics``
(``sglang_twilight_kept_tokens_sum`` etc., read before and after each cell; the server
publishes them every 16 decode steps, its default, so up to 15 steps of a cell's end are counted
in the next cell: the server runs as a user's would, snapshot cost included). One
``generated-shared-prefix`` cell per model (``--shared-prefix``) checks that the advantage holds
on radix-cache hits.

Presets (``--model``): ``smollm2`` (real SmolLM2-135M-Instruct, the launcher's default model;
contexts 2k / 4k / 7.5k x concurrency 1 / 16 / 64 / 128) and ``llama8b`` (the Llama-3.1-8B shape
with dummy weights from ``--model-path``; contexts 2k / 8k / 16k / 30k x concurrency 1 / 4 / 12).

    python benchmarks/bench_tpot.py --model smollm2 --out benchmarks/results/tpot_smollm2_h100.json
    python benchmarks/bench_tpot.py --model llama8b --model-path /tmp/llama8b-dummy \\
        --out benchmarks/results/tpot_llama8b_h100.json
Writes the JSON and a PNG beside it (TPOT per cell, dense vs twilight, and their ratio). The JSON
is rewritten after every cell (``"complete": false`` until the last), so a run cut short keeps
what it measured; ``--merge`` keeps the rows of the methods not run now from an existing
``--out`` of the same model, card and commit, so the two methods may run one after the other in
separate invocations on one machine. ``bench_serving`` needs the ``datasets`` package, one of
SGLang's dependencies.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from benchmarks.common import card_name, command, commit, progress, write_result  # noqa: E402
from benchmarks.servers import Server  # noqa: E402

PRESETS = {
    "smollm2": dict(cells=["2048:1,16,64,128", "4096:1,16,64,128", "7680:1,16,64,128"],
                    twilight=[], load_format="auto", mem=0.85,
                    shared_prefix=dict(groups=8, per_group=16, system_len=6144, question_len=128,
                                       concurrency=64)),
    "llama8b": dict(cells=["2048:1,4,12", "8192:1,4,12", "16384:1,4,12", "30720:1,4,12"],
                    twilight=["--twilight-max-budget", "512"], load_format="dummy", mem=0.9,
                    shared_prefix=dict(groups=2, per_group=12, system_len=16384, question_len=128,
                                       concurrency=12)),
}
RESULT_KEYS = {  # bench_serving's JSONL keys -> our row keys
    "median_tpot_ms": "tpot_ms_median", "p99_tpot_ms": "tpot_ms_p99",
    "median_itl_ms": "itl_ms_median", "median_ttft_ms": "ttft_ms_median",
    "output_throughput": "output_tok_s", "completed": "completed",
}


def parse_cells(specs):
    """``["2048:1,16", ...]`` -> ``[(2048, 1), (2048, 16), ...]``."""
    out = []
    for spec in specs:
        ctx, _, cs = spec.partition(":")
        out += [(int(ctx), int(c)) for c in cs.split(",") if c.strip()]
    return out


def fits(context: int, concurrency: int, output_len: int, pool_tokens: int) -> bool:
    """Every request of a wave holds its whole context and output in the pool at once."""
    return concurrency * (context + output_len) <= pool_tokens


def run_bench_serving(port, model_path, extra, out_file, timeout):
    """One run of SGLang's client (``sglang.bench_serving``: its own argument parser and
    ``run_benchmark``) inside this process: the client module is imported once per benchmark,
    not once per cell (a fresh ``python -m sglang.bench_serving`` spends 10-25 s importing SGLang
    before its first request). Returns its JSON result line (dict) and the equivalent command.
    A run that has not finished after ``timeout`` s raises TimeoutError (its thread is left to
    end with the server)."""
    from sglang.benchmark import serving

    argv = ["--backend", "sglang", "--host", "127.0.0.1", "--port", str(port), "--tokenizer",
            model_path, "--model", model_path, "--output-file", out_file, "--disable-tqdm",
            "--seed", "1"] + extra
    cmd = [sys.executable, "-m", "sglang.bench_serving"] + argv
    box: dict = {}

    def go():
        saved, text = sys.argv, io.StringIO()
        sys.argv = ["sglang.bench_serving"] + argv
        try:
            with contextlib.redirect_stdout(text):
                serving.cli_main()
        except BaseException as e:  # noqa: BLE001 - SystemExit from argparse included
            box["error"] = f"{type(e).__name__}: {e}"
        finally:
            sys.argv = saved
        box["stdout"] = text.getvalue()

    th = threading.Thread(target=go, daemon=True, name="bench_serving")
    th.start()
    th.join(timeout)
    if th.is_alive():
        raise TimeoutError(f"bench_serving did not finish in {timeout:.0f} s")
    if "error" in box or not os.path.exists(out_file):
        raise RuntimeError(f"bench_serving failed: {box.get('error')}; output: "
                           f"{box.get('stdout', '')[-1500:]}")
    with open(out_file) as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip()]
    return json.loads(lines[-1]), cmd


def client_args(kind, ctx, conc, output_len, n, shared_prefix=None):
    """``bench_serving`` flags of one cell. Every run flushes the radix cache after its warm-up
    request (which is the first prompt: without the flush, that prompt's prefill would be a cache
    hit). ``random-ids`` prompts go as token ids (``--tokenize-prompt``): as text, the client
    decodes random ids and the server tokenizes them again into a different count, which may
    even overflow the context window. ``generated-shared-prefix`` only sends text (SGLang's
    client refuses ids there), so its token counts are the server's (``server_*`` in the
    rows)."""
    if kind == "random":
        return ["--dataset-name", "random-ids", "--tokenize-prompt", "--random-input-len",
                str(ctx), "--random-output-len", str(output_len), "--random-range-ratio", "1",
                "--num-prompts", str(n), "--max-concurrency", str(conc), "--flush-cache"]
    sp = shared_prefix
    return ["--dataset-name", "generated-shared-prefix", "--gsp-num-groups", str(sp["groups"]),
            "--gsp-prompts-per-group", str(sp["per_group"]), "--gsp-system-prompt-len",
            str(sp["system_len"]), "--gsp-question-len", str(sp["question_len"]),
            "--gsp-output-len", str(output_len), "--max-concurrency", str(conc), "--flush-cache"]


TOKEN_COUNTERS = {"sglang:prompt_tokens_total": "prompt", "sglang:cached_tokens_total": "cached",
                  "sglang:generation_tokens_total": "generation"}


def server_tokens(metrics_text):
    """SGLang's own token counters in a ``/metrics`` text (summed over label sets): prompt
    tokens received, of them served from the radix cache, and tokens generated."""
    from sglang_twilight.metrics import parse_prometheus

    out = dict.fromkeys(TOKEN_COUNTERS.values(), 0.0)
    for name, _, value in parse_prometheus(metrics_text):
        if name in TOKEN_COUNTERS:
            out[TOKEN_COUNTERS[name]] += value
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--model", choices=sorted(PRESETS), required=True)
    ap.add_argument("--model-path", default=None,
                    help="model folder (default for smollm2: the launcher's default model)")
    ap.add_argument("--cells", nargs="+", default=None, help="CONTEXT:CONC,CONC,...")
    ap.add_argument("--methods", default="dense,twilight")
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--waves", type=int, default=2, help="prompts per cell = waves x concurrency")
    ap.add_argument("--min-prompts", type=int, default=4)
    ap.add_argument("--top-p-attn", type=float, default=0.95)
    ap.add_argument("--mem-fraction-static", type=float, default=None)
    ap.add_argument("--shared-prefix", action="store_true", help="add the shared-prefix cell")
    ap.add_argument("--port", type=int, default=30200)
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--cell-timeout", type=float, default=600)
    ap.add_argument("--log-dir", default=None, help="server logs (default: beside --out)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of the methods not run now from an existing --out (same "
                         "model, output length, card and commit): dense and twilight measured "
                         "in two runs on one machine")
    args, extra_server = ap.parse_known_args()
    preset = PRESETS[args.model]
    model_path = args.model_path
    if model_path is None:
        if args.model != "smollm2":
            ap.error("--model-path is required for --model llama8b")
        from sglang_twilight.default_model import default_model_path

        model_path = default_model_path(log=lambda m: print(m, flush=True))
    cells = parse_cells(args.cells or preset["cells"])
    max_conc = max([c for _, c in cells] + [preset["shared_prefix"]["concurrency"]])
    mem = args.mem_fraction_static or preset["mem"]
    common = ["--model-path", model_path, "--load-format", preset["load_format"],
              "--mem-fraction-static", str(mem), "--port", str(args.port),
              "--cuda-graph-max-bs-decode", str(max_conc), "--enable-metrics",
              "--host", "127.0.0.1"] + extra_server
    servers = {
        "dense": [sys.executable, "-m", "sglang.launch_server", "--attention-backend",
                  "flashinfer", "--page-size", "16"] + common,
        "twilight": [sys.executable, "-m", "sglang_twilight.launch_server", "--top-p-attn",
                     str(args.top_p_attn)] + preset["twilight"] + common,
    }
    log_dir = args.log_dir or os.path.dirname(os.path.abspath(args.out))
    os.makedirs(log_dir, exist_ok=True)
    methods = args.methods.split(",")
    rows, meta = [], {}
    if args.merge and os.path.exists(args.out):
        try:
            rows, meta = prior_rows(args.out, args.model, args.output_len, methods, card_name(),
                                    commit())
        except ValueError as e:
            ap.error(f"--merge: {e}")
        print(f"kept {len(rows)} rows of {', '.join(sorted(meta))} from {args.out}", flush=True)
    from sglang_twilight.metrics import mean_kept, read_kept

    def save(complete: bool = False) -> dict:
        """The result so far (after every cell, so that a run cut short keeps what it measured;
        ``complete`` is false until the last cell is in)."""
        return write_result(args.out, dict(
            benchmark="tpot", model=args.model, model_path=model_path, servers=meta,
            output_len=args.output_len, top_p_attn=args.top_p_attn, complete=complete,
            rows=rows, ratios=_ratios(rows)))

    for method in methods:
        t0 = time.time()
        log_path = os.path.join(log_dir, f"server_{args.model}_{method}.log")
        with Server(method, servers[method], args.port, log_path) as srv:
            ready_s = srv.wait_ready(args.start_timeout, poll=2.0).ready_s
            st, info = srv.get("/server_info")
            if st != 200 or not isinstance(info, dict):
                raise RuntimeError(f"{method} server: /server_info answered {st}: "
                                   f"{str(info)[:300]}")
            pool = int(info.get("max_total_num_tokens") or 0)
            meta[method] = dict(argv=servers[method], ready_s=ready_s, pool_tokens=pool,
                                command=command())
            print(f"[{method}] ready in {ready_s:.0f} s, pool {pool} tokens", flush=True)
            jobs = [("random", c, n) for c, n in cells]
            if args.shared_prefix:
                jobs.append(("shared_prefix", preset["shared_prefix"]["system_len"],
                             preset["shared_prefix"]["concurrency"]))
            for kind, ctx, conc in progress(jobs, f"{args.model} {method}"):
                row = dict(model=args.model, method=method, dataset=kind, context=ctx,
                           output_len=args.output_len, concurrency=conc, pool_tokens=pool)
                if kind == "random" and not fits(ctx, conc, args.output_len, pool):
                    row["skipped"] = (f"{conc} x ({ctx} + {args.output_len}) tokens do not fit "
                                      f"the {pool}-token KV pool")
                    print(f"[{method}] {ctx} x {conc}: {row['skipped']}", flush=True)
                    rows.append(row)
                    save()
                    continue
                if kind == "random":
                    n = max(args.min_prompts, args.waves * conc)
                    extra = client_args(kind, ctx, conc, args.output_len, n)
                else:
                    sp = preset["shared_prefix"]
                    n = sp["groups"] * sp["per_group"]
                    extra = client_args(kind, ctx, conc, args.output_len, n, sp)
                    row["shared_prefix"] = sp
                row["num_prompts"] = n
                text = srv.get_text("/metrics")
                tokens_before = server_tokens(text)
                before = read_kept(text) if method == "twilight" else None
                with tempfile.TemporaryDirectory() as tmp:
                    try:
                        res, cmd = run_bench_serving(args.port, model_path, extra,
                                                     os.path.join(tmp, "r.jsonl"),
                                                     args.cell_timeout)
                    except Exception as e:  # recorded, not dropped
                        row["error"] = str(e)[-1000:]
                        rows.append(row)
                        save()
                        last = [ln for ln in row["error"].splitlines() if ln.strip()][-3:]
                        print(f"[{method}] {kind} {ctx} x {conc}: error: " + " | ".join(last),
                              flush=True)
                        if isinstance(e, TimeoutError):  # its requests may still be running
                            print(f"[{method}] stopping this server's cells", flush=True)
                            break
                        continue
                row.update({ours: res.get(theirs) for theirs, ours in RESULT_KEYS.items()})
                row["bench_serving_command"] = " ".join(cmd[1:])
                time.sleep(0.5)  # the counters' last snapshot lands on a later step
                text = srv.get_text("/metrics")
                # what the server saw, warm-up request included: the prompts' real lengths
                got = server_tokens(text)
                row.update({f"server_{k}_tokens": got[k] - tokens_before[k] for k in got})
                if before is not None:
                    after = read_kept(text)
                    row["kept_tokens_mean"] = mean_kept(before, after)
                    steps = {w: after["steps"].get(w, 0) - before["steps"].get(w, 0)
                             for w in ("sparse", "dense")}
                    row["decode_steps"] = steps
                    tot = sum(steps.values())
                    row["sparse_step_share"] = steps["sparse"] / tot if tot else None
                rows.append(row)
                save()
                shown = ", ".join(f"{k} {row.get(k)}" for k in (
                    "tpot_ms_median", "tpot_ms_p99", "itl_ms_median", "ttft_ms_median",
                    "output_tok_s", "kept_tokens_mean", "sparse_step_share") if k in row)
                print(f"[{method}] {kind} {ctx} x {conc}: {shown}", flush=True)
        print(f"[{method}] done in {time.time() - t0:.0f} s", flush=True)
    written = save(complete=True)
    _plot(written, os.path.splitext(args.out)[0] + ".png")
    print(f"wrote {args.out}")


def prior_rows(path, model, output_len, methods, card, commit_):
    """The rows and server records of an earlier result at ``path`` for every method not in
    ``methods``; ValueError when that result is of another model, output length, card or
    commit (its rows would not compare)."""
    with open(path) as f:
        old = json.load(f)
    for what, have, want in (("model", old.get("model"), model),
                             ("output length", old.get("output_len"), output_len),
                             ("card", old.get("card"), card),
                             ("commit", old.get("commit"), commit_)):
        if have != want:
            raise ValueError(f"{path} has {what} {have!r}, this run {want!r}")
    keep = [r for r in old.get("rows", []) if r.get("method") not in methods]
    meta = {m: v for m, v in (old.get("servers") or {}).items() if m not in methods}
    return keep, meta


def _ratios(rows):
    """twilight / dense per cell measured by both."""
    by = {}
    for r in rows:
        if "tpot_ms_median" in r:
            by.setdefault((r["dataset"], r["context"], r["concurrency"]), {})[r["method"]] = r
    out = []
    for (ds, ctx, conc), m in sorted(by.items()):
        if "dense" in m and "twilight" in m and all(
                m[w].get(k) for w in ("dense", "twilight") for k in ("tpot_ms_median",
                                                                       "ttft_ms_median")):
            d, t = m["dense"], m["twilight"]
            out.append(dict(dataset=ds, context=ctx, concurrency=conc,
                            tpot_twilight_over_dense=t["tpot_ms_median"] / d["tpot_ms_median"],
                            ttft_twilight_over_dense=t["ttft_ms_median"] / d["ttft_ms_median"],
                            speedup=d["tpot_ms_median"] / t["tpot_ms_median"]))
    return out


def _plot(payload, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    rat = [r for r in payload["ratios"] if r["dataset"] == "random"]
    if not rat:
        return
    ctxs = sorted({r["context"] for r in rat})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ctx in ctxs:
        rs = [r for r in rat if r["context"] == ctx]
        concs = [r["concurrency"] for r in rs]
        axes[0].plot(concs, [r["speedup"] for r in rs], marker="o", label=f"{ctx} tokens")
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].axhline(1 / 1.03, color="red", lw=0.8, ls="--", label="never-slower bound (1/1.03)")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("concurrency")
    axes[0].set_ylabel("dense TPOT / twilight TPOT")
    axes[0].legend(fontsize=8)
    rows = [r for r in payload["rows"] if r.get("dataset") == "random" and "tpot_ms_median" in r]
    for method, style in (("dense", "--"), ("twilight", "-")):
        for ctx in ctxs:
            rs = [r for r in rows if r["method"] == method and r["context"] == ctx]
            if rs:
                axes[1].plot([r["concurrency"] for r in rs], [r["tpot_ms_median"] for r in rs],
                             style, marker="o", label=f"{method} {ctx}")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("concurrency")
    axes[1].set_ylabel("median TPOT (ms)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{payload['model']}: TPOT, dense SGLang vs twilight ({payload.get('card', '')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
