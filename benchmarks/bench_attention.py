"""Per-layer decode attention time on one GPU (the paper's Fig. 7 analog).

Llama-3.1-8B shapes (32 q heads, 8 KV heads, head_dim 128, bf16) at batch x context, for:
FlashInfer dense decode, Quest alone (selector quest, p = 1) at B0 = 1024 and 8192, and Twilight
(Quest B0 = 8192 -> top-p 0.95) with its stage breakdown (store, select, prune, attend). Every
method runs inside a CUDA graph (as SGLang's decode does); medians over many replays. The keys
follow the law of ``benchmarks/workload.py`` (a power-law tail plus page locality).

Usage: python benchmarks/bench_attention.py --out benchmarks/results/bench_attention_h100.json
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.*
from benchmarks.common import versions, write_result  # noqa: E402
from benchmarks.workload import PAGE, graph_ms, make_inputs  # noqa: E402,F401

from sglang_twilight import ops  # noqa: E402
from sglang_twilight.kernels import attend, estimate, launch, prune, select  # noqa: E402

HBM_BYTES_PER_S = 3.35e12  # H100 SXM datasheet peak


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
    sc = inp["side"]
    for name, budget, quest in (("quest-1024", 1024, True), ("quest-8192", 8192, True),
                                ("twilight", 8192, False)):
        ws = ops.DecodeWorkspace.allocate(bs, H, G, D, budget, PAGE, ctx, "cuda")
        # Twilight: per-request p on the device; Quest alone: no estimate, no top-p
        pr = None if quest else torch.full((bs,), args.top_p, dtype=torch.float32, device="cuda")
        out = torch.empty_like(inp["q"])

        def step():
            return ops.twilight_decode(inp["q"], inp["k"], inp["v"], sc, inp["r2t"], inp["rpi"],
                                       inp["seq"], pr, budget=budget, page_size=PAGE, sm_scale=sm,
                                       min_budget=1, max_budget=0 if quest else args.max_budget,
                                       quest_only=quest, backend="triton", workspace=ws, out=out)

        step()
        counts = ws.cand_counts if quest else ws.kept_counts  # Quest alone attends candidates
        kept_tokens = float(counts[:bs].float().mean())
        ms, c = timed(step, args.l2)
        err = float((out.float() - dense_out.float()).norm() / dense_out.float().norm())
        rows.append(dict(base, method=name, ms=ms, kept_tokens=kept_tokens, budget=budget,
                         top_p=1.0 if quest else args.top_p,
                         rel_err_vs_dense=err, **cold(c)))
        if name != "twilight":
            continue
        # stage breakdown, each stage in its own graph, same inputs
        C = ws.capacity
        loc = inp["slots"][:, -1].contiguous()
        stages = {}
        stages["store"] = graph_ms(lambda: ops.store_sidecar(inp["k"], loc, sc, PAGE, backend="triton"))
        sel = lambda: select.quest_select_pages_triton(
            inp["q"], inp["kmax"], inp["kmin"], inp["kbs"], inp["r2t"], inp["rpi"], inp["seq"], C,
            PAGE, max_pages=ws.max_pages, scores=ws.page_scores[:bs], cand_pages=ws.cand_pages[:bs],
            cand_counts=ws.cand_counts[:bs])
        stages["select"], c_sel = timed(sel, args.l2)
        stages["select.scores"] = graph_ms(lambda: select.quest_page_scores_triton(
            inp["q"], inp["kmax"], inp["kmin"], inp["kbs"], inp["r2t"], inp["rpi"], inp["seq"],
            PAGE, ws.max_pages, out=ws.page_scores[:bs]))
        cand, cnt = ws.cand_pages[:bs], ws.cand_counts[:bs]
        prune_stage = lambda: prune.twilight_prune_triton(
            inp["q"], inp["kq"], inp["ks"], inp["kz"], cand, cnt, pr, sm, 1, args.max_budget,
            scores=ws.scores[:bs], kept_slots=ws.kept_slots[:bs], kept_counts=ws.kept_counts[:bs],
            lo=ws.head_lo[: bs * H * G], tot=ws.head_tot[: bs * H * G], page_size=PAGE,
            scratch=ws.topp_scratch, mx=ws.head_max[: bs * H * G], marks=ws.union_marks[:bs],
            parts=ws.score_parts[:bs])
        stages["prune"], c_prune = timed(prune_stage, args.l2)
        # the estimate as the prune runs it (with the partials the top-p kernel reads)
        stages["prune.estimate"] = graph_ms(lambda: estimate.int4_scores_triton(
            inp["q"], inp["kq"], inp["ks"], inp["kz"], cand, cnt, sm, out=ws.scores[:bs],
            page_size=PAGE, parts=ws.score_parts[:bs] if launch.get("topp_from_parts") else None))
        kept, kcnt = ws.kept_slots[:bs], ws.kept_counts[:bs]
        attend_stage = lambda: attend.sparse_decode_attention_triton(
            inp["q"], inp["k"], inp["v"], kept, kcnt, sm, out=out,
            splits=attend.attend_splits(bs * H, ws.num_sms), mid_o=ws.mid_o, mid_lse=ws.mid_lse)
        stages["attend"] = graph_ms(attend_stage)
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


def write_results(args, rows, stage_rows, H, G, D):
    """The results file: the run (card, versions, commit, command), shapes, key law, timing
    method, the methods' rows and Twilight's stage rows."""
    write_result(args.out, dict(
        versions=dict(versions(), cuda=torch.version.cuda),
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
    ))

if __name__ == "__main__":
    main()
