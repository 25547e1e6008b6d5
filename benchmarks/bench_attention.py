"""Per-layer decode attention time on one GPU (the paper's Fig. 7 analog).

Llama-3.1-8B shapes (32 q heads, 8 KV heads, head_dim 128, bf16) at batch x context, for:
FlashInfer dense decode, Quest alone (selector quest, p = 1) at B0 = 1024 and 8192, and Twilight
(Quest B0 = 8192 -> top-p 0.95) with its stage breakdown (store, select, prune, attend). Every
method runs inside a CUDA graph (as SGLang's decode does); medians over many replays.

Keys: ``k_t = noise_t + c_t * qhat`` with ``c_t = a * u_page(t) + b * Exp(1)``: the exponential
term gives the softmax a power-law tail, as in real decode attention (a few hundred to a few
thousand tokens of 32k carry 95% of the mass, varying by head), and the per-page term gives the
locality Quest relies on. Every q head of a group shares the direction ``qhat`` (plus noise).

Usage: python benchmarks/bench_attention.py --out benchmarks/results/bench_attention.json
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch
import triton
import triton.testing

from sglang_twilight import ops
from sglang_twilight.kernels import attend as _attend
from sglang_twilight.kernels import int4 as _int4
from sglang_twilight.kernels import quest as _quest
from sglang_twilight.kernels import topp as _topp

PAGE = 16
HBM_BYTES_PER_S = 3.35e12  # H100 SXM datasheet peak


def make_inputs(bs, ctx, H, G, D, dtype, device, tail=1.3, page_locality=1.0, seed=0):
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    pages_per = ctx // PAGE
    total_pages = bs * pages_per + 1
    S = total_pages * PAGE
    perm = torch.randperm(total_pages - 1, generator=gen, device=device) + 1
    phys = perm.view(bs, pages_per)
    slots = (phys[:, :, None] * PAGE + torch.arange(PAGE, device=device)).reshape(bs, ctx)
    req_to_token = slots.to(torch.int32).contiguous()
    rpi = torch.arange(bs, dtype=torch.int32, device=device)
    seq_lens = torch.full((bs,), ctx, dtype=torch.int32, device=device)
    qhat = torch.randn(bs, H, 1, D, generator=gen, device=device)
    qhat = qhat / qhat.norm(dim=-1, keepdim=True)
    q = (qhat * math.sqrt(D) + 0.5 * torch.randn(bs, H, G, D, generator=gen, device=device))
    q = q.reshape(bs, H * G, D).to(dtype)
    k = torch.empty(S, H, D, dtype=dtype, device=device)
    v = torch.randn(S, H, D, generator=gen, device=device).to(dtype)
    for b in range(bs):  # per request to bound the temporary memory
        s = slots[b].long()
        noise = torch.randn(ctx, H, D, generator=gen, device=device)
        u = torch.randn(ctx // PAGE, H, generator=gen, device=device).repeat_interleave(PAGE, 0)
        c = page_locality * u + tail * torch.empty(ctx, H, device=device).exponential_(generator=gen)
        k[s] = (noise + c[..., None] * qhat[b, :, 0][None]).to(dtype)
    kq = _int4.code_buffer(S, H, D, device)
    ks, kz = _int4.scale_zero_buffers(S, H, device)
    kmax, kmin, kbs = _int4.bounds_buffers(total_pages, H, D, device)
    ops.store_sidecar(k, slots.reshape(-1), kq, ks, kz, kmax, kmin, kbs, PAGE,
                      backend="triton" if device != "cpu" else "torch")
    return dict(q=q, k=k, v=v, kq=kq, ks=ks, kz=kz, kmax=kmax, kmin=kmin, kbs=kbs,
                r2t=req_to_token,
                rpi=rpi, seq=seq_lens, slots=slots)


def graph_ms(fn, reps=200):
    """Median ms of fn replayed in a CUDA graph (launch costs as in SGLang's graph decode)."""
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=reps, return_mode="median")


@functools.cache
def _l2_flush_buffer() -> torch.Tensor:
    """fp32 ones of twice the L2's size (at least 1 MiB), made once per process."""
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return torch.ones(max(2 * l2, 1 << 20) // 4, dtype=torch.float32, device="cuda")


def graph_ms_l2_cold(fn, reps=200):
    """Median ms of fn with the L2 cache holding none of its data: a graph replays (read of a
    buffer twice the L2's size, fn) back to back, less the same graph without fn. ``graph_ms``
    replays fn back to back, so whatever of its inputs fits the L2 (50 MB on the H100: the
    Quest bounds of batch 8 x 32k are 34 MB) is read from there; in a model every layer reads
    its own, so a layer's attention starts cold. The flush reads rather than writes, so that no
    dirty lines are written back while fn runs."""
    buf = _l2_flush_buffer()
    flush = lambda: buf.sum()
    both = graph_ms(lambda: (flush(), fn()), reps)
    return both - graph_ms(flush, reps)


def timed(fn, l2: str) -> tuple[float, float | None]:
    """(ms as ``graph_ms`` measures it, ms with the L2 cold or None) for ``--l2``."""
    return graph_ms(fn), (graph_ms_l2_cold(fn) if l2 == "both" else None)


def flashinfer_dense(inp, H, G, D, dtype, sm):
    import flashinfer

    bs, ctx = inp["slots"].shape
    ws = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
    pages = (inp["slots"][:, ::PAGE] // PAGE).to(torch.int32)
    indptr = torch.arange(bs + 1, dtype=torch.int32, device="cuda") * pages.shape[1]
    last = torch.full((bs,), PAGE, dtype=torch.int32, device="cuda")
    w.plan(indptr, pages.reshape(-1), last, H * G, H, D, PAGE, q_data_type=dtype,
           kv_data_type=dtype, sm_scale=sm)
    kc = inp["k"].view(-1, PAGE, H, D)
    vc = inp["v"].view(-1, PAGE, H, D)
    out = torch.empty_like(inp["q"])
    return lambda: w.run(inp["q"], (kc, vc), out=out), out


def flat_rows(kept, kcnt, H):
    """Kept slots as one row per (request, KV head) over the KV buffer viewed [slots * H, 1, D]
    (token t, head h -> t * H + h): (indptr int32 [rows + 1], indices int32). Host-sized."""
    indptr = torch.zeros(kcnt.numel() + 1, dtype=torch.int32, device=kept.device)
    indptr[1:] = torch.cumsum(kcnt.reshape(-1), 0)
    h = torch.arange(H, device=kept.device)[None, :, None]
    valid = torch.arange(kept.shape[-1], device=kept.device)[None, None, :] < kcnt[:, :, None]
    return indptr, (kept.long() * H + h)[valid].to(torch.int32)


def flashinfer_sparse_attend(inp, kept, kcnt, H, G, D, dtype, sm):
    """Eager-only candidate for the attend stage: FlashInfer over (request, KV head) rows with
    page_size=1 views. Its plan() needs the counts on the host, so it cannot sit in a graph."""
    import flashinfer

    bs = inp["q"].shape[0]
    ws = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
    indptr, indices = flat_rows(kept, kcnt, H)
    last = torch.ones(bs * H, dtype=torch.int32, device="cuda")
    w.plan(indptr, indices, last, G, 1, D, 1, q_data_type=dtype, kv_data_type=dtype, sm_scale=sm)
    kc = inp["k"].view(-1, 1, 1, D)
    vc = inp["v"].view(-1, 1, 1, D)
    qv = inp["q"].view(bs * H, G, D)
    out = torch.empty_like(qv)
    fn = lambda: w.run(qv, (kc, vc), out=out)
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, rep=200, return_mode="median"), out.view(bs, H * G, D)


def sglang_triton_attend(inp, kept, kcnt, H, G, D, dtype, sm):
    """Graph-safe candidate: SGLang's Triton decode kernel over (request, KV head) rows."""
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd

    bs = inp["q"].shape[0]
    rows = bs * H
    indptr, indices = flat_rows(kept, kcnt, H)
    splits = 8
    logits = torch.empty(rows, G, splits, D, dtype=torch.float32, device="cuda")
    lse = torch.empty(rows, G, splits, dtype=torch.float32, device="cuda")
    nsplit = torch.full((rows,), splits, dtype=torch.int32, device="cuda")
    qv = inp["q"].view(rows, G, D)
    out = torch.empty_like(qv)
    kc = inp["k"].view(-1, 1, D)
    vc = inp["v"].view(-1, 1, D)
    fn = lambda: decode_attention_fwd(qv, kc, vc, out, indptr, indices, logits, lse, nsplit, splits,
                                      sm, 1.0, 1.0)
    return graph_ms(fn), out.view(bs, H * G, D)


def run_case(bs, ctx, H, G, D, dtype, args, rows, stage_rows):
    sm = 1 / math.sqrt(D)
    inp = make_inputs(bs, ctx, H, G, D, dtype, "cuda", tail=args.tail,
                      page_locality=args.page_locality)
    dense_fn, dense_out = flashinfer_dense(inp, H, G, D, dtype, sm)
    base = dict(batch=bs, context=ctx)
    cold = lambda c: {} if c is None else dict(ms_l2_cold=c)
    ms, c = timed(dense_fn, args.l2)
    rows.append(dict(base, method="flashinfer", ms=ms, **cold(c)))
    sc = (inp["kq"], inp["ks"], inp["kz"], inp["kmax"], inp["kmin"], inp["kbs"])
    for name, budget, p in (("quest-1024", 1024, 1.0), ("quest-8192", 8192, 1.0),
                            ("twilight", 8192, args.top_p)):
        ws = ops.DecodeWorkspace.allocate(bs, H, G, D, budget, PAGE, ctx, "cuda")
        # Quest alone: a static p = 1 skips the estimate; Twilight: per-request p on the device
        pr = p if p >= 1.0 else torch.full((bs,), p, dtype=torch.float32, device="cuda")
        out = torch.empty_like(inp["q"])

        def step():
            return ops.twilight_decode(inp["q"], inp["k"], inp["v"], *sc, inp["r2t"], inp["rpi"],
                                       inp["seq"], pr, budget=budget, page_size=PAGE, sm_scale=sm,
                                       min_budget=1, max_budget=args.max_budget if p < 1 else 0,
                                       backend="triton", workspace=ws, out=out)

        step()
        counts = ws.kept_counts if p < 1.0 else ws.cand_counts  # Quest alone attends candidates
        kept_tokens = float(counts[:bs].float().mean())
        ms, c = timed(step, args.l2)
        err = float((out.float() - dense_out.float()).norm() / dense_out.float().norm())
        rows.append(dict(base, method=name, ms=ms, kept_tokens=kept_tokens, budget=budget, top_p=p,
                         rel_err_vs_dense=err, **cold(c)))
        if name != "twilight":
            continue
        # stage breakdown, each stage in its own graph, same inputs
        C = ws.capacity
        loc = inp["slots"][:, -1].contiguous()
        stages = {}
        stages["store"] = graph_ms(lambda: ops.store_sidecar(inp["k"], loc, *sc, PAGE, backend="triton"))
        sel = lambda: _quest.quest_select_pages_triton(
            inp["q"], inp["kmax"], inp["kmin"], inp["kbs"], inp["r2t"], inp["rpi"], inp["seq"], C,
            PAGE, max_pages=ws.max_pages, scores=ws.page_scores[:bs], cand_pages=ws.cand_pages[:bs],
            cand_counts=ws.cand_counts[:bs])
        stages["select"], c_sel = timed(sel, args.l2)
        stages["select.scores"] = graph_ms(lambda: _quest.quest_page_scores_triton(
            inp["q"], inp["kmax"], inp["kmin"], inp["kbs"], inp["r2t"], inp["rpi"], inp["seq"],
            PAGE, ws.max_pages, out=ws.page_scores[:bs]))
        cand, cnt = ws.cand_pages[:bs], ws.cand_counts[:bs]
        prune = lambda: _topp.twilight_prune_triton(
            inp["q"], inp["kq"], inp["ks"], inp["kz"], cand, cnt, pr, sm, 1, args.max_budget,
            scores=ws.scores[:bs], kept_slots=ws.kept_slots[:bs], kept_counts=ws.kept_counts[:bs],
            lo=ws.head_lo[: bs * H * G], tot=ws.head_tot[: bs * H * G], page_size=PAGE,
            scratch=ws.topp_scratch, mx=ws.head_max[: bs * H * G], marks=ws.union_marks[:bs],
            parts=ws.score_parts[:bs])
        stages["prune"], c_prune = timed(prune, args.l2)
        # the estimate as the prune runs it (with the partials the top-p kernel reads)
        stages["prune.estimate"] = graph_ms(lambda: _topp.int4_scores_triton(
            inp["q"], inp["kq"], inp["ks"], inp["kz"], cand, cnt, sm, out=ws.scores[:bs],
            page_size=PAGE, parts=ws.score_parts[:bs] if _topp.TOPP_FROM_PARTS else None))
        kept, kcnt = ws.kept_slots[:bs], ws.kept_counts[:bs]
        attend = lambda: _attend.sparse_decode_attention_triton(
            inp["q"], inp["k"], inp["v"], kept, kcnt, sm, out=out,
            splits=_attend.attend_splits(bs * H, ws.num_sms), mid_o=ws.mid_o, mid_lse=ws.mid_lse)
        stages["attend"] = graph_ms(attend)
        ref_attend = ops.sparse_decode_attention(inp["q"], inp["k"], inp["v"], kept, kcnt, sm,
                                                 backend="triton").float()
        try:
            fi_ms, fi_out = flashinfer_sparse_attend(inp, kept, kcnt, H, G, D, dtype, sm)
            stages["attend.flashinfer_eager"] = fi_ms
            stages["attend.flashinfer_eager.max_abs_diff"] = float((fi_out.float() - ref_attend).abs().max())
        except Exception as e:  # noqa: BLE001 - record, keep benchmarking
            stages["attend.flashinfer_eager.error"] = repr(e)[:300]
        try:
            sg_ms, sg_out = sglang_triton_attend(inp, kept, kcnt, H, G, D, dtype, sm)
            stages["attend.sglang_triton_graph"] = sg_ms
            stages["attend.sglang_triton_graph.max_abs_diff"] = float((sg_out.float() - ref_attend).abs().max())
        except Exception as e:  # noqa: BLE001
            stages["attend.sglang_triton_graph.error"] = repr(e)[:300]
        # bytes the select and prune stages must read (the bandwidth bound)
        n_pages = ctx // PAGE
        bound_bytes = 2 * D * inp["kmax"].element_size() + inp["kbs"].element_size()  # + scale
        sel_bytes = bs * H * n_pages * bound_bytes + bs * n_pages * 4
        cand_total = float(cnt.sum())
        # int4 codes, fp16 scale and zero per candidate token, an int32 id per candidate page
        # (the prune reads page lists, not a slot per token)
        cand_pages = float(((cnt + PAGE - 1) // PAGE).sum())
        prune_bytes = cand_total * (D // 2 + 2 + 2) + cand_pages * 4
        stages["select.bytes"] = sel_bytes
        stages["prune.bytes"] = prune_bytes
        bound_ms = (sel_bytes + prune_bytes) / HBM_BYTES_PER_S * 1e3
        stages["select+prune.bandwidth_bound_ms"] = bound_ms
        stages["select+prune.fraction_of_bound"] = bound_ms / (stages["select"] + stages["prune"])
        if c_sel is not None:  # the same, each stage starting with a cold L2
            stages["select.l2_cold"], stages["prune.l2_cold"] = c_sel, c_prune
            stages["select+prune.fraction_of_bound.l2_cold"] = bound_ms / (c_sel + c_prune)
        stage_rows.append(dict(base, method="twilight", **stages))
        print(json.dumps(stage_rows[-1]), flush=True)
    inp.clear()  # free this case's KV before the next one
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,8,16,32,64")
    ap.add_argument("--contexts", default="8192,16384,32768")
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-budget", type=int, default=0, help="Twilight max kept tokens (0 = no cap)")
    ap.add_argument("--tail", type=float, default=1.3, help="key heavy-tail scale (peakedness)")
    ap.add_argument("--page-locality", type=float, default=1.0, help="per-page logit spread")
    ap.add_argument("--l2", choices=("warm", "both"), default="warm",
                    help="both: also time every method, and the select and prune stages, with the "
                         "L2 cache flushed before each replay (ms_l2_cold, *.l2_cold)")
    ap.add_argument("--out", default="benchmarks/results/bench_attention.json")
    args = ap.parse_args()
    H, G, D, dtype = 8, 4, 128, torch.bfloat16
    rows, stage_rows = [], []
    free = torch.cuda.mem_get_info()[0]
    save = lambda: write_results(args, rows, stage_rows, H, G, D)
    for ctx in map(int, args.contexts.split(",")):
        for bs in map(int, args.batches.split(",")):
            need = bs * ctx * H * D * 2 * 2 * 1.3 + (1 << 30)
            if need > free * 0.8:
                print(f"skip batch {bs} x {ctx}: needs {need / 2**30:.1f} GiB", flush=True)
                continue
            t = time.time()
            run_case(bs, ctx, H, G, D, dtype, args, rows, stage_rows)
            print(f"done {bs}x{ctx} in {time.time() - t:.1f}s: " + ", ".join(
                f"{r['method']}={r['ms']:.4f}ms" for r in rows if r["batch"] == bs and r["context"] == ctx),
                flush=True)
            save()  # after every case, so a cut-off run still leaves its rows
    save()
    print("wrote", args.out)


def source_commit() -> str:
    """The commit measured: ``$TWILIGHT_COMMIT`` when set (the device copy of the tree may carry
    stale or no git metadata; a run there once recorded an older HEAD), else ``git rev-parse``."""
    env = os.environ.get("TWILIGHT_COMMIT")
    if env:
        return env
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def write_cpu_study(path, setup: dict, results: dict) -> dict:
    """A study run on the CPU (``floor_study.py``, ``search_study.py``): its results with the
    card, versions, commit, command and setup, printed and, with ``path``, written as JSON."""
    out = dict(card="cpu", versions=dict(torch=torch.__version__, python=platform.python_version()),
               commit=source_commit(), command="python " + " ".join(sys.argv), setup=setup,
               **results)
    print(json.dumps(out, indent=1))
    if path:
        with open(path, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


def write_rows(path, rows):
    """A sweep's or probe's rows as JSON with the card, versions, commit and command."""
    with open(path, "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(),
                       versions=dict(torch=torch.__version__, triton=triton.__version__),
                       commit=source_commit(), command="python " + " ".join(sys.argv),
                       rows=rows), f, indent=1)


def write_results(args, rows, stage_rows, H, G, D):
    import flashinfer

    commit = source_commit()
    res = dict(
        card=torch.cuda.get_device_name(),
        versions=dict(torch=torch.__version__, triton=triton.__version__,
                      flashinfer=flashinfer.__version__, python=platform.python_version(),
                      cuda=torch.version.cuda),
        commit=commit,
        command="python " + " ".join(sys.argv),
        shapes=dict(num_q_heads=H * G, num_kv_heads=H, head_dim=D, dtype="bfloat16", page_size=PAGE),
        keys=("k_t = noise + c_t * qhat, c_t = %g * N(0,1) per page + %g * Exp(1) per token; "
              "q heads of a group share qhat" % (args.page_locality, args.tail)),
        timing="median of CUDA-graph replays (triton.testing.do_bench_cudagraph), back to back: "
               "inputs that fit the L2 cache stay there between replays" + (
                   "; ms_l2_cold and *.l2_cold: the same with the L2 flushed (a read of twice its "
                   "size) before each replay, the flush's own time taken out"
                   if args.l2 == "both" else ""),
        rows=rows,
        stages=stage_rows,
    )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
