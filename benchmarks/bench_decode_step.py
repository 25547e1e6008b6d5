"""Decode-step time of a served model inside SGLang's CUDA graphs: dense SGLang against Twilight,
both ways of ``--twilight-dispatch`` in one process, the fitted dispatch cost model, the byte
model of a step, and a per-kernel profile of graph replays.

SGLang's ``bench_one_batch`` machinery (``sglang.benchmark.one_batch``: its model loading,
``extend`` and ``decode``) in one process per method, with the prefill done request by request so
that 12 x 32k fits beside the KV pool. Per context the largest batch is prefilled once; the
smaller batches are the same batch filtered down (largest first). Each (context, batch) cell
times ``--steps`` decode steps after ``--warmup`` (median ms per step, CUDA graphs on):

* ``dense``: ``python -m sglang.launch_server --attention-backend flashinfer --page-size 16``'s
  decode, i.e. SGLang as shipped;
* ``twilight``: the twilight backend with ``--twilight-dispatch auto`` (so both graphs of every
  batch size exist), each cell timed with every step forced sparse (``sparse_ms``), forced dense
  (``dense_way_ms``), and, when a cost model for this GPU and geometry was loaded at start, as
  the model chooses (``auto_ms``, ``auto_way``).

``--shared-cells CONTEXT:BS,...`` adds cells whose requests all share one cached prefix (all
but the last ``--shared-suffix`` tokens, whole pages): the first request is prefilled whole,
the others hit its prefix in a real SGLang ``RadixCache`` and prefill only their own tokens, as
the server does with a radix-cache hit; their rows carry ``shared_prefix`` and the step's
``shared_tokens`` (srt_patches/shared_prefix.py), which the cost model's ``distinct`` feature
is fitted from.

``--fit`` fits the dispatch cost model (sglang_twilight/dispatch.py) to the twilight process's
two ways and stores it in ``sglang_twilight/dispatch_profiles.json`` (or ``--profiles-out``);
``--refit RESULT`` does the same from a result file this script wrote, without a GPU
(``--dense-way-from sglang`` takes dense SGLang's times of the same cells as the dense way's;
with ``--out`` the result is written again with that fit).
``--profile AxB,...`` adds, for those cells, the CUDA kernels of a few graph replays of each way
summed by kernel and by kind (Twilight's kernels, FlashInfer decode, GEMMs, the rest), and the
host side of a few more steps under cProfile (``host``: where the step's time outside its
kernels goes).

Usage (Llama-3.1-8B shape, dummy weights, flat attention clamped to 512 kept tokens):
    python benchmarks/bench_decode_step.py --model-path /tmp/llama8b-dummy --load-format dummy \\
        --cells 30720:12,8,4,2,1 16384:12,8,4,2,1 2048:64,16,4,1 --twilight-max-budget 512 \\
        --shared-cells 16384:12,8,4,2 30720:12,4 \\
        --mem-fraction-static 0.92 --fit --profile 30720x12,2048x1 \\
        --out benchmarks/results/decode_step_llama8b_h100.json
Every flag it does not know goes to SGLang's ServerArgs of both processes (e.g.
``--load-format``, ``--mem-fraction-static``); ``--twilight-*`` / ``--top-p-attn`` to twilight's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from benchmarks.common import card_name, progress, write_result  # noqa: E402

KINDS = (  # kernel name fragment -> kind, first match wins
    ("_store_sidecar", "twilight"), ("_page_scores", "twilight"), ("_select_kernel", "twilight"),
    ("_estimate", "twilight"), ("_topp", "twilight"), ("_union", "twilight"),
    ("_attend_", "twilight"), ("_expand", "twilight"),
    ("BatchDecode", "flashinfer_decode"), ("flashinfer", "flashinfer_other"),
    ("gemm", "gemm"), ("Gemm", "gemm"), ("nvjet", "gemm"), ("xmma", "gemm"), ("cutlass", "gemm"),
)


def kind_of(name: str) -> str:
    for frag, kind in KINDS:
        if frag in name:
            return kind
    return "other"


def parse_cells(specs: list[str]) -> list[tuple[int, list[int]]]:
    """``["30720:12,8,4", "2048:64,1"]`` -> ``[(30720, [12, 8, 4]), (2048, [64, 1])]`` (each
    batch list largest first)."""
    out = []
    for spec in specs:
        ctx, _, bss = spec.partition(":")
        if not bss:
            raise ValueError(f"cell {spec!r}: expected CONTEXT:BS,BS,...")
        out.append((int(ctx), sorted({int(b) for b in bss.split(",")}, reverse=True)))
    return out


def shared_prefix_len(context: int, suffix: int, page_size: int) -> int:
    """The cached prefix of a shared-prefix cell: all but ``suffix`` tokens, whole pages."""
    prefix = (context - suffix) // page_size * page_size
    if prefix <= 0:
        raise ValueError(f"shared cell {context}: no whole page before its last {suffix} tokens")
    return prefix


def parse_pairs(text: str) -> set[tuple[int, int]]:
    """``"30720x12,2048x1"`` -> ``{(30720, 12), (2048, 1)}``."""
    out = set()
    for item in filter(None, (x.strip() for x in (text or "").split(","))):
        c, _, b = item.partition("x")
        out.add((int(c), int(b)))
    return out


# --------------------------------------------------------------------------- the byte model


def step_bytes(method: str, seq_lens: list[int], *, weight_bytes: int, num_layers: int,
               dense_layers: int, num_kv_heads: int, head_dim: int, kv_bytes: int = 2,
               capacity: int = 8192, page_size: int = 16, kept: float = 0.0,
               shared: int = 0) -> dict:
    """Bytes one decode step must read from HBM (weights once, then attention per layer).

    dense: every layer reads K and V of every context token. twilight: the dense layers the
    same; each sparse layer reads the Quest bounds of every page (two int8 codes per channel +
    an fp32 scale, per KV head), the int4 keys of the candidates (D/2 bytes + fp16 scale and
    zero, per KV head), and K and V of the ``kept`` tokens per (request, KV head).
    ``shared``: context tokens that several requests hold (a cached prefix, counted once per
    extra holder); the K/V and page-bound reads that cover every token count them once, the
    candidates' and kept tokens' reads (chosen per request) in full."""
    H, D = num_kv_heads, head_dim
    kv_tok = H * D * 2 * kv_bytes  # K + V of one token, one layer
    dense_attn = (sum(seq_lens) - shared) * kv_tok
    if method == "dense":
        attn = num_layers * dense_attn
    else:
        sparse = num_layers - dense_layers
        pages = sum(-(-n // page_size) for n in seq_lens) - shared // page_size
        cands = sum(min(n, capacity) for n in seq_lens)
        per_layer = (pages * H * (2 * D + 4) + cands * H * (D // 2 + 4)
                     + len(seq_lens) * kept * kv_tok)
        attn = dense_layers * dense_attn + sparse * per_layer
    return {"weights": int(weight_bytes), "attention": int(attn),
            "total": int(weight_bytes + attn)}


# --------------------------------------------------------------------------- the child process


def _child(args, sglang_argv: list[str]) -> None:
    """Load the model for one method and time every cell; write the JSON to ``args.child_out``."""
    import numpy as np
    import torch

    method = args.child
    if method == "twilight":
        from sglang_twilight.config import TwilightConfig

        cfg = TwilightConfig.from_dict(json.loads(args.twilight_config))
        cfg.to_env()
        from sglang.srt.plugins import load_plugins

        load_plugins()  # the twilight backend, its hooks (graph variants, pool sizing)

    import sglang.benchmark.one_batch as ob
    from sglang.srt.model_executor.cuda_graph_config import Phase
    from sglang.srt.server_args import PortArgs, ServerArgs

    from sglang_twilight.srt_patches.shared_prefix import shared_prefix_tokens

    # (context, batches, shared prefix tokens): the plain cells, then the shared-prefix ones
    cells = [(c, b, 0) for c, b in parse_cells(args.cells)] + [
        (c, b, shared_prefix_len(c, args.shared_suffix, args.page_size))
        for c, b in parse_cells(args.shared_cells)]
    max_bs = max(max(b) for _, b, _ in cells)
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    sargs = parser.parse_args(sglang_argv + [
        "--attention-backend", "twilight" if method == "twilight" else "flashinfer",
        "--page-size", str(args.page_size)])
    server_args = ServerArgs.from_cli_args(sargs)
    if server_args.cuda_graph_config is not None:
        server_args.cuda_graph_config[Phase.DECODE].max_bs = max_bs
    ob._set_envs_and_config(server_args)
    ob.initialize_moe_config(server_args)
    ob.initialize_fp8_gemm_config(server_args)
    ob.initialize_fp4_gemm_config(server_args)
    port_args = PortArgs.init_new(server_args)
    t0 = time.perf_counter()
    bench_runner, _ = ob.load_model(server_args, port_args, 0, 0)
    runner = bench_runner.torch_runner
    load_s = time.perf_counter() - t0
    ob.BenchArgs.output_len = 1 << 20  # requests never finish on their own here
    decoder = getattr(runner.attn_backend, "twilight", None)
    policy = decoder.policy if decoder is not None else None
    has_model = policy is not None and policy.model is not None
    mc = runner.model_config
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    info = dict(method=method, load_s=load_s, pool_tokens=int(runner.max_total_num_tokens),
                weight_bytes=int(weight_bytes), num_layers=int(mc.num_hidden_layers),
                num_kv_heads=int(mc.get_num_kv_heads(1)), head_dim=int(mc.head_dim),
                num_q_heads=int(mc.num_attention_heads),
                kv_bytes=int(torch.empty(0, dtype=runner.kv_cache_dtype).element_size()))
    if decoder is not None:
        info.update(geometry=decoder.geometry(mc.num_hidden_layers), card=card_name(),
                    policy=policy.describe(), budget=decoder.budget,
                    dense_layers=decoder.cfg.dense_layers,
                    sidecar_bytes=decoder.sidecar.nbytes(),
                    workspace_bytes=decoder.ensure_workspace().nbytes())

    def sync():
        torch.cuda.synchronize()

    def time_steps(ids, batch, n):
        lat = []
        for _ in range(n):
            sync()
            tic = time.perf_counter()
            ids, _ = ob.decode(ids, batch, runner)
            sync()
            lat.append((time.perf_counter() - tic) * 1e3)
        return ids, lat

    profile_cells = parse_pairs(args.profile)
    ways = [("sparse", True), ("dense_way", False)] if decoder is not None else [("dense", None)]
    if has_model:
        ways.append(("auto", None))
    rows, prefills = [], []
    rng = np.random.default_rng(args.seed)
    for ctx, bss, prefix in cells:
        bench_runner.clear()
        n_req = bss[0]
        name = f"{ctx}" + (f" (shared {prefix})" if prefix else "")
        own = ctx - prefix  # KV tokens each request adds to the pool
        if prefix + n_req * (own + 2 * (args.steps + args.warmup) * len(ways) * len(bss) + 64) \
                > runner.max_total_num_tokens:
            rows.append(dict(context=ctx, batch=n_req, shared_prefix=prefix,
                             skipped="does not fit the KV pool "
                                     f"({runner.max_total_num_tokens} tokens)"))
            print(f"[{method}] {name} x {n_req}: does not fit the pool", flush=True)
            continue
        ids_in = rng.integers(0, 10000, (n_req, ctx), dtype=np.int32)
        tree = None
        if prefix:  # one prefix for all, cached in a real radix tree by the first request
            ids_in[1:, :prefix] = ids_in[0, :prefix]
            tree = _radix_tree(runner, args.page_size)
        reqs = ob.prepare_synthetic_inputs_for_latency_test(n_req, ctx, ids_in.tolist())
        next_ids, batch = [], None
        t_cell = time.perf_counter()
        for i, req in enumerate(reqs):  # one request at a time: 12 x 32k fits beside the pool
            if tree is not None:
                # Scheduler: match the prefix and lock its node (scheduler.py:3228,
                # schedule_batch.py:1316); extend from there (schedule_policy.py:844)
                req.init_next_round_input(tree)
                tree.inc_lock_ref(req.last_node)
                req.set_extend_range(len(req.prefix_indices), ctx)
            sync()
            tic = time.perf_counter()
            nid, _, b = ob.extend([req], runner)
            sync()
            prefills.append(dict(context=ctx, shared_prefix=prefix, index=len(prefills),
                                 cached=len(req.prefix_indices) if tree is not None else 0,
                                 seconds=time.perf_counter() - tic))
            if tree is not None:  # the prompt goes into the tree (maybe_cache_unfinished_req)
                tree.cache_unfinished_req(req)
            next_ids.append(nid)
            if batch is None:
                batch = b
            else:
                batch.merge_batch(b)
        ids = torch.cat(next_ids)
        print(f"[{method}] {name}: prefilled {n_req} requests in "
              f"{time.perf_counter() - t_cell:.1f} s", flush=True)
        for bs in bss:
            if bs < len(batch.reqs):
                batch.filter_batch(keep_indices=list(range(bs)))
                ids = ids[:bs]
            row = dict(context=ctx, batch=bs)
            if prefix:
                row.update(shared_prefix=prefix, shared_tokens=shared_prefix_tokens(batch.reqs))
            for way, force in ways:
                if policy is not None:
                    policy.force = force
                ids, _ = time_steps(ids, batch, args.warmup)
                if way == "auto":
                    row["auto_way"] = "sparse" if decoder.step_sparse else "dense"
                ids, lat = time_steps(ids, batch, args.steps)
                row[f"{way}_ms"] = statistics.median(lat)
                row[f"{way}_ms_all"] = [round(x, 4) for x in lat]
                if (ctx, bs) in profile_cells and not prefix:
                    ids, prof = _profile_steps(ids, batch, runner, ob, args.profile_steps)
                    row[f"{way}_profile"] = prof
            row["seq_lens"] = batch.seq_lens.tolist()
            if policy is not None:
                policy.force = None
            rows.append(row)
            print(f"[{method}] {name} x {bs}: " + ", ".join(
                f"{w} {row[f'{w}_ms']:.3f} ms" for w, _ in ways), flush=True)
    # mean kept tokens per (request, KV head) of the sparse steps: from the device counters
    if decoder is not None:
        c = decoder.kept_stats.counters.cpu()
        L = len(decoder.sparse_layer_ids)
        rows_counted = int(c[L, 0])
        info["kept_mean"] = (float(c[:L, 0].sum()) / (rows_counted * L * decoder.num_kv_heads)
                             if rows_counted else None)
    with open(args.child_out, "w") as f:
        json.dump(dict(info=info, rows=rows, prefills=prefills), f)


def _radix_tree(runner, page_size: int):
    """A real SGLang radix cache over the runner's pools (the benchmark's own batches use a
    stand-in that caches nothing)."""
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.radix_cache import RadixCache

    return RadixCache(CacheInitParams(
        disable=False, req_to_token_pool=runner.req_to_token_pool,
        token_to_kv_pool_allocator=runner.token_to_kv_pool_allocator, page_size=page_size))


def _profile_steps(ids, batch, runner, ob, steps):
    """CUDA kernels of ``steps`` decode steps (graph replays), by name and by kind, per step."""
    import torch

    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        tic = time.perf_counter()
        for _ in range(steps):
            ids, _ = ob.decode(ids, batch, runner)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - tic) * 1e3 / steps
    per, calls = defaultdict(float), defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            t = getattr(ev, "device_time_total", None)
            per[ev.name] += (t if t is not None else ev.cuda_time_total) / 1e3  # ms
            calls[ev.name] += 1
    kinds = defaultdict(float)
    for name, ms in per.items():
        kinds[kind_of(name)] += ms / steps
    top = sorted(per.items(), key=lambda kv: -kv[1])[:25]
    ids, host = _host_profile(ids, batch, runner, ob, steps)
    return ids, dict(steps=steps, wall_ms=wall, kernel_ms=sum(per.values()) / steps,
                     kinds={k: round(v, 4) for k, v in sorted(kinds.items())},
                     kernels=[dict(name=n[:120], ms=round(ms / steps, 4),
                                   calls=calls[n] // steps, kind=kind_of(n)) for n, ms in top],
                     host=host)


def _host_profile(ids, batch, runner, ob, steps):
    """The host side of ``steps`` decode steps under cProfile (which slows Python down, so read
    the entries against each other, not as absolute times): per step, the functions with the most
    own time (``torch.cuda.synchronize`` there is the wait for the GPU) and the project's and
    the attention backend's functions by cumulative time. Where a step's wall time exceeds its
    kernels' time, this says which host work the GPU waited for."""
    import cProfile
    import pstats

    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    prof = cProfile.Profile()
    sync()
    prof.enable()
    for _ in range(steps):
        ids, _ = ob.decode(ids, batch, runner)
        sync()
    prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (cc, calls, tottime, cumtime, ...)

    def entry(key, v):
        return dict(fn=f"{Path(key[0]).name}:{key[1]}:{key[2]}"[:100], calls=v[1] // steps,
                    own_ms=round(v[2] * 1e3 / steps, 4), cum_ms=round(v[3] * 1e3 / steps, 4))

    own = sorted(stats.items(), key=lambda kv: -kv[1][2])[:20]
    ours = [kv for kv in stats.items()
            if any(t in kv[0][0] for t in ("sglang_twilight", "srt_patches", "attention/",
                                            "cuda_graph_runner", "hook_registry"))]
    ours = sorted(ours, key=lambda kv: -kv[1][3])[:20]
    total = sum(v[2] for v in stats.values())
    return ids, dict(total_ms=round(total * 1e3 / steps, 4), own=[entry(k, v) for k, v in own],
                     backend_cum=[entry(k, v) for k, v in ours])


# --------------------------------------------------------------------------- the parent


def merge(dense: dict, tw: dict) -> list[dict]:
    """One row per (context, batch, shared prefix) with both methods' times and ratios."""
    def key_of(r):
        return r["context"], r["batch"], r.get("shared_prefix", 0)

    by = {key_of(r): dict(r) for r in tw["rows"]}
    out = []
    for r in dense["rows"]:
        key = key_of(r)
        t = by.get(key, {})
        row = dict(context=key[0], batch=key[1])
        if key[2]:
            row.update(shared_prefix=key[2], shared_tokens=r.get("shared_tokens", 0))
        if "skipped" in r or "skipped" in t:
            row["skipped"] = r.get("skipped") or t.get("skipped")
            out.append(row)
            continue
        row.update(dense_ms=r["dense_ms"], seq_lens=t.get("seq_lens", r.get("seq_lens")),
                   twilight_sparse_ms=t["sparse_ms"], twilight_dense_way_ms=t["dense_way_ms"])
        if "auto_ms" in t:
            row.update(twilight_auto_ms=t["auto_ms"], auto_way=t["auto_way"])
        for k in ("sparse_profile", "dense_way_profile", "auto_profile"):
            if k in t:
                row[f"twilight_{k}"] = t[k]
        if "dense_profile" in r:
            row["dense_profile"] = r["dense_profile"]
        out.append(row)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--cells", nargs="+", default=["30720:12,8,4,2,1", "16384:12,4,1",
                                                   "2048:64,16,1"],
                    help="CONTEXT:BS,BS,... per context (the largest batch is prefilled)")
    ap.add_argument("--shared-cells", nargs="*", default=[],
                    help="CONTEXT:BS,BS,... cells whose requests share one cached prefix")
    ap.add_argument("--shared-suffix", type=int, default=128,
                    help="tokens of each request of a shared cell after the shared prefix")
    ap.add_argument("--methods", default="dense,twilight")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--profile", default="", help="cells to profile: CONTEXTxBS,...")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fit", action="store_true", help="fit and store the dispatch cost model")
    ap.add_argument("--profiles-out", default=None,
                    help="profiles JSON to update (default: sglang_twilight/dispatch_profiles.json)")
    ap.add_argument("--margin", type=float, default=None, help="the cost model's margin")
    ap.add_argument("--dense-way-from", choices=("twilight", "sglang"), default="twilight",
                    help="the dense way's times for --fit: the twilight process's forced-dense "
                         "steps, or dense SGLang's")
    ap.add_argument("--refit", default=None, metavar="RESULT",
                    help="fit from a result file of this script instead of measuring (no GPU)")
    ap.add_argument("--note", default=None, help="with --refit --out: a note kept in the file")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--twilight-config", default=None, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.child:
        sglang_argv = json.loads(os.environ["BENCH_DECODE_SGLANG_ARGV"])
        return _child(args, sglang_argv)
    if args.refit:
        return _refit(args)
    if not args.out:
        ap.error("--out is required (or --refit RESULT)")

    from sglang_twilight.config import TwilightConfig, add_twilight_args

    tparser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_twilight_args(tparser)
    tns, sglang_argv = tparser.parse_known_args(rest)
    cfg = TwilightConfig.from_args(tns)
    cfg = TwilightConfig.from_dict(dict(cfg.to_dict(), dispatch="auto"))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in progress(args.methods.split(","), "methods"):
            child_out = os.path.join(tmp, f"{method}.json")
            cmd = [sys.executable, __file__, "--child", method, "--child-out", child_out,
                   "--cells", *args.cells, "--shared-cells", *args.shared_cells,
                   "--shared-suffix", str(args.shared_suffix), "--steps", str(args.steps),
                   "--warmup",
                   str(args.warmup), "--profile", args.profile, "--profile-steps",
                   str(args.profile_steps), "--page-size", str(args.page_size), "--seed",
                   str(args.seed), "--twilight-config",
                   json.dumps(cfg.to_dict())]
            env = dict(os.environ, BENCH_DECODE_SGLANG_ARGV=json.dumps(sglang_argv))
            t0 = time.time()
            rc = subprocess.run(cmd, env=env).returncode
            if rc != 0 or not os.path.exists(child_out):
                print(f"{method}: the benchmark process failed (exit {rc})", file=sys.stderr)
                results[method] = None
                continue
            with open(child_out) as f:
                results[method] = json.load(f)
            print(f"{method}: done in {time.time() - t0:.0f} s", flush=True)
    payload = dict(benchmark="decode_step", cells=args.cells, shared_cells=args.shared_cells,
                   shared_suffix=args.shared_suffix, twilight_config=cfg.to_dict(),
                   sglang_args=sglang_argv,
                   methods={m: (r or {}).get("info") for m, r in results.items()},
                   prefills={m: (r or {}).get("prefills") for m, r in results.items()})
    dense, tw = results.get("dense"), results.get("twilight")
    if dense and tw:
        rows = merge(dense, tw)
        info = tw["info"]
        geo = info["geometry"]
        kept = info.get("kept_mean") or 0.0
        for row in rows:
            if "skipped" in row:
                continue
            lens = row["seq_lens"]
            kw = dict(weight_bytes=info["weight_bytes"], num_layers=info["num_layers"],
                      dense_layers=info["dense_layers"], num_kv_heads=geo["num_kv_heads"],
                      head_dim=geo["head_dim"], kv_bytes=info["kv_bytes"],
                      capacity=geo["capacity"], page_size=geo["page_size"], kept=kept,
                      shared=row.get("shared_tokens", 0))
            bd, bt = step_bytes("dense", lens, **kw), step_bytes("twilight", lens, **kw)
            row["bytes_dense"], row["bytes_twilight"] = bd, bt
            row["byte_ceiling"] = bd["total"] / bt["total"]  # dense / twilight, best case
            row["speedup_sparse"] = row["dense_ms"] / row["twilight_sparse_ms"]
            if "twilight_auto_ms" in row:
                row["speedup_auto"] = row["dense_ms"] / row["twilight_auto_ms"]
        payload["rows"] = rows
        if args.fit:
            try:
                payload["fit"] = _fit(args, tw, rows)
            except ValueError as e:  # e.g. fewer measured cells than the model has features
                payload["fit_error"] = str(e)
                print(f"no fit: {e}")
    write_result(args.out, payload)
    print(f"wrote {args.out}")
    _print_table(payload.get("rows", []))


def _command() -> str:
    """This run's command line, without the text of a ``--note`` (it is kept in the file)."""
    argv, out = list(sys.argv), []
    while argv:
        a = argv.pop(0)
        if a == "--note":
            argv = argv[1:]
            continue
        out.append(a)
    return " ".join(["python"] + out)


def _refit(args) -> None:
    """``--refit RESULT``: the dispatch model from a result file this script wrote, no GPU."""
    with open(args.refit) as f:
        payload = json.load(f)
    tw = {"info": payload["methods"]["twilight"]}
    rows = [dict(r) for r in payload["rows"]]
    fit = _fit(args, tw, rows)
    fit["from_result"] = os.path.basename(args.refit)
    if args.out:  # the result again, with this fit (and without the columns it did not use)
        if args.dense_way_from == "sglang":
            for r in rows:
                r.pop("twilight_dense_way_ms", None)
                r.pop("twilight_dense_way_profile", None)
        out = dict(payload, rows=rows, fit=fit, refit_command=_command())
        if args.note:
            out["notes"] = list(payload.get("notes", [])) + [args.note]
        write_result(args.out, out)
    for r in rows:
        if "skipped" not in r:
            print(f"{_cell(r):>14} x {r['batch']:>3}: dense {r['dense_ms']:.3f} ms, sparse "
                  f"{r['twilight_sparse_ms']:.3f} -> {r['model_way']} "
                  f"({r['model_way_vs_dense']:.3f} of dense)")


def _fit(args, tw: dict, rows: list[dict]) -> dict:
    from sglang_twilight.dispatch import (DEFAULT_MARGIN, fit_step_models, save_profile,
                                          step_features)

    info = tw["info"]
    geo = info["geometry"]
    # the dense way's step times: the twilight process's own (FlashInfer decode in every layer
    # plus the sidecar write), or dense SGLang's of the same cells (--dense-way-from sglang)
    dense_col = "dense_ms" if args.dense_way_from == "sglang" else "twilight_dense_way_ms"
    measured = [row for row in rows if "skipped" not in row]
    feats = [step_features(row["seq_lens"], geo["capacity"], shared=row.get("shared_tokens", 0))
             for row in measured]
    points = [dict(features=f, dense_ms=row[dense_col], sparse_ms=row["twilight_sparse_ms"])
              for f, row in zip(feats, measured)]
    model = fit_step_models(points, card=info["card"],
                            margin=DEFAULT_MARGIN if args.margin is None else args.margin, **geo)
    model = type(model).from_dict(dict(model.to_dict(), fit=dict(
        model.fit, command=_command(), dense_way=dense_col)))
    path = args.profiles_out or os.path.join(Path(__file__).resolve().parents[1],
                                             "sglang_twilight", "dispatch_profiles.json")
    save_profile(model, path)
    for f, row in zip(feats, measured):
        d, s = model.predict(f)
        way = "sparse" if model.prefers_sparse(f) else "dense"
        row.update(model_dense_ms=d, model_sparse_ms=s, model_way=way,
                   model_way_ms=row["twilight_sparse_ms" if way == "sparse" else dense_col])
        row["model_way_vs_dense"] = row["model_way_ms"] / row["dense_ms"]
    print(f"fitted dispatch model -> {path}: {model.fit}")
    return dict(model.to_dict(), path=path)


def _cell(row: dict) -> str:
    """A row's context, marked when its requests share a cached prefix."""
    return f"{row['context']}" + (" shared" if row.get("shared_prefix") else "")


def _print_table(rows):
    print("       context batch | dense ms | tw sparse ms | tw dense-way ms | auto | ceiling")
    for r in rows:
        if "skipped" in r:
            print(f"{_cell(r):>14} {r['batch']:>5} | skipped: {r['skipped']}")
            continue
        auto = "-"
        if "twilight_auto_ms" in r:
            auto = "%.3f (%s)" % (r["twilight_auto_ms"], r["auto_way"])
        print(f"{_cell(r):>14} {r['batch']:>5} | {r['dense_ms']:8.3f} | "
              f"{r['twilight_sparse_ms']:12.3f} | {r['twilight_dense_way_ms']:15.3f} | "
              f"{auto} | {r['byte_ceiling']:.2f}")


if __name__ == "__main__":
    main()
