"""Launch-shape sweep of the decode kernels on one GPU: which block sizes, pipelining depths and
warp counts are fastest at Llama-3.1-8B layer shapes (the inputs and key law of
``benchmarks/workload.py``). Every variant is timed in a CUDA graph (median), alone and in the
whole step, and checked against the variant in use. The table it tunes is
``sglang_twilight.kernels.launch`` (each variant runs inside ``launch.override``); rerun it on a
new card and move the winners into that table with their numbers.

Usage: python benchmarks/tune_kernels.py --batches 8,64 --context 32768 --out tune.json
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.*
from benchmarks.common import int_list, write_result  # noqa: E402
from benchmarks.workload import PAGE, graph_ms, make_inputs, row_groups  # noqa: E402

from sglang_twilight import ops  # noqa: E402
from sglang_twilight.kernels import attend, estimate, launch, prune, select, union  # noqa: E402
from sglang_twilight.kernels.launch import next_pow2, override  # noqa: E402

ESTIMATE = [dict(BLOCK_N=b, ITERS=i, STAGES=s, num_warps=w) for b, i, s, w in [
    (128, 1, 1, 4), (64, 4, 3, 2), (128, 4, 3, 4), (64, 2, 3, 2), (64, 8, 3, 2), (64, 4, 4, 2),
    (128, 4, 3, 2), (32, 4, 3, 1), (64, 4, 3, 1), (64, 8, 4, 2), (32, 8, 3, 2), (128, 2, 3, 2),
    (64, 8, 3, 4), (64, 4, 3, 4), (64, 8, 5, 2), (64, 8, 6, 2), (32, 16, 6, 2), (64, 4, 5, 1),
    (32, 8, 5, 1), (64, 8, 8, 2), (64, 16, 8, 2), (64, 4, 6, 1), (128, 4, 5, 2)]]
PAGE_SCORES = [dict(BLOCK_P=b, ITERS=i, STAGES=s, num_warps=w) for b, i, s, w in [
    (64, 1, 1, 4), (32, 4, 2, 4), (32, 1, 1, 4), (32, 4, 3, 2), (16, 8, 3, 2), (32, 8, 3, 2),
    (16, 4, 2, 1), (32, 2, 2, 4), (32, 4, 3, 4), (32, 4, 4, 4), (16, 4, 3, 2), (64, 2, 2, 8),
    (64, 2, 2, 4), (64, 4, 3, 4), (128, 1, 1, 8), (32, 8, 4, 4),
    # more bytes in flight, for bounds read from HBM rather than L2 (the whole step's case)
    (32, 4, 4, 2), (32, 4, 6, 2), (32, 8, 4, 2), (32, 8, 6, 2), (16, 8, 6, 2), (64, 4, 4, 4),
    (32, 2, 4, 2), (16, 16, 8, 1)]]
TOPP = [dict(CHUNK=c, SMALL=s, MID=m, STAGES=st, num_warps=w, REFLOOR=rf)
        for c, s, m, st, w, rf in [
            (1024, 2048, 4096, 3, 8, True), (1024, 2048, 4096, 3, 8, False),
            (1024, 1024, 4096, 3, 8, True), (2048, 2048, 4096, 3, 8, True),
            (512, 2048, 4096, 3, 4, True), (1024, 2048, 4096, 3, 4, True),
            (1024, 2048, 4096, 1, 8, True), (2048, 2048, 4096, 3, 16, True),
            # deeper pipelining of the row passes (more chunks in flight)
            (1024, 2048, 4096, 4, 8, True), (1024, 2048, 4096, 5, 8, True),
            (1024, 2048, 4096, 6, 8, True), (512, 2048, 4096, 6, 8, True),
            (512, 2048, 4096, 8, 8, True), (2048, 2048, 4096, 4, 8, True)]]
UNION = [4, 8, 16]
OVERFLOW = [4, 8, 16]
ATTEND = [dict(splits=sp, BLOCK_N=b, num_warps=w, num_stages=2)
          for sp in (1, 2, 4, 8, 16) for b in (32, 64) for w in (2, 4)]
SELECT = [1, 2, 4, 8]
GROUPS = [1, 2, 3, 4]
# (topp=96: five programs an SM of the wide top-p shape's 4 warps, where its cap of 128 fits four)
MAXNREG = [dict(topp=96), dict(topp=80), dict(topp=72), dict(topp=64), dict(union=64),
           dict(union=80), dict(overflow=64), dict(topp=80, union=64, overflow=64),
           dict(topp=64, union=64, overflow=64)]


def sweep(bs, ctx, rows, only=None, H=8, G=4, D=128):
    inp = make_inputs(bs, ctx, H, G, D, torch.bfloat16, "cuda")
    sm = 1 / math.sqrt(D)
    ws = ops.DecodeWorkspace.allocate(bs, H, G, D, 8192, PAGE, ctx, "cuda")
    pr = torch.full((bs,), 0.95, dtype=torch.float32, device="cuda")
    base = dict(batch=bs, context=ctx)
    want = lambda *kinds: not only or any(k in only for k in kinds)

    def log(kind, cfg, ms, **kw):
        rows.append(dict(base, kernel=kind, config=cfg, ms=ms, **kw))
        print(f"{bs}x{ctx} {kind:11s} {ms * 1e3:8.2f} us  {cfg} {kw or ''}", flush=True)

    out = torch.empty_like(inp["q"])

    def decode(workspace, p):
        """The whole step (select, prune, attend) in ``workspace`` (its row groups); ``p`` None:
        Quest alone."""
        return ops.twilight_decode(
            inp["q"], inp["k"], inp["v"], inp["side"], inp["r2t"], inp["rpi"], inp["seq"], p,
            budget=8192, page_size=PAGE, sm_scale=sm, min_budget=1, max_budget=0,
            quest_only=p is None, backend="triton", workspace=workspace, out=out)

    # the whole step: a stage replayed alone may find its inputs still in L2 (the bounds of
    # batch 8 x 32k are 34 MB), the step reads from HBM what a real decode step would
    step = lambda: decode(ws, pr)

    # select: page scores, then the top-K kernel
    ps = lambda: select.quest_page_scores_triton(inp["q"], inp["kmax"], inp["kmin"], inp["kbs"],
                                                 inp["r2t"], inp["rpi"], inp["seq"], PAGE,
                                                 ws.max_pages, out=ws.page_scores[:bs])
    ref = ps().clone()
    for cfg in PAGE_SCORES if want("page_scores") else []:
        with override(page_scores=cfg):
            ms = graph_ms(ps)
            err = float((ps()[..., : ws.max_pages] - ref[..., : ws.max_pages]).abs().max())
            log("page_scores", cfg, ms, max_abs_diff=err, step_ms=graph_ms(step))
    if want("layout"):
        # Quest bounds page-major ([pages, H, D]), head-major ([H, pages, D] viewed as [pages,
        # H, D]) or a page's max and min codes side by side ([pages, H, 2, D]: one 256-byte run,
        # what the sidecar allocates): same values, other strides; alone and in the whole step
        # (bounds from HBM)
        hm = lambda t: t.transpose(0, 1).contiguous().transpose(0, 1)
        il = torch.stack([inp["kmax"], inp["kmin"]], 2)
        saved = inp["kmax"], inp["kmin"], inp["kbs"]
        for name, kx, kn, kb in (("page-major", inp["kmax"].contiguous(), inp["kmin"].contiguous(),
                                  inp["kbs"]),
                                 ("head-major", hm(inp["kmax"]), hm(inp["kmin"]), hm(inp["kbs"])),
                                 ("interleaved", il[:, :, 0], il[:, :, 1], inp["kbs"])):
            f = lambda: select.quest_page_scores_triton(inp["q"], kx, kn, kb, inp["r2t"],
                                                        inp["rpi"], inp["seq"], PAGE, ws.max_pages,
                                                        out=ws.page_scores[:bs])
            ms = graph_ms(f)
            err = float((f()[..., : ws.max_pages] - ref[..., : ws.max_pages]).abs().max())
            inp["kmax"], inp["kmin"], inp["kbs"] = kx, kn, kb
            log("page_scores_layout", dict(layout=name), ms, max_abs_diff=err,
                step_ms=graph_ms(step))
            inp["kmax"], inp["kmin"], inp["kbs"] = saved
            del kx, kn, kb
        del il, saved
    sel = lambda: select.quest_select_pages_triton(
        inp["q"], inp["kmax"], inp["kmin"], inp["kbs"], inp["r2t"], inp["rpi"], inp["seq"], 8192,
        PAGE, max_pages=ws.max_pages, scores=ws.page_scores[:bs], cand_pages=ws.cand_pages[:bs],
        cand_counts=ws.cand_counts[:bs])
    np_pad = next_pow2(ws.max_pages)
    for w in SELECT if want("select") else []:
        with override(select=dict(by_pages={np_pad: w})):
            log("select", dict(num_warps=w), graph_ms(sel))
    cand, cnt = sel()
    # estimate
    est = lambda: estimate.int4_scores_triton(inp["q"], inp["kq"], inp["ks"], inp["kz"], cand,
                                              cnt, sm, out=ws.scores[:bs], page_size=PAGE)
    ref = est().clone()
    valid = torch.isfinite(ref)
    if want("estimate"):
        log("estimate_default",
            dict(rows=bs * H, wide=bs * H >= launch.get("estimate_wide_rows")),
            graph_ms(est), step_ms=graph_ms(step))
        # partials for the sweep's smallest programs (the step reads them)
        span = min(c["BLOCK_N"] * c["ITERS"] for c in ESTIMATE)
        ws.score_parts = torch.empty(bs, H, G, 2, next_pow2(-(-ws.capacity // span)),
                                     dtype=torch.float32, device="cuda")
    for cfg in ESTIMATE if want("estimate") else []:
        # one launch shape at every batch: the narrow entry, the wide one never taken
        with override(estimate=cfg, estimate_wide_rows=1 << 30):
            ms = graph_ms(est)
            err = float((est()[valid] - ref[valid]).abs().max())
            log("estimate", cfg, ms, max_abs_diff=err, step_ms=graph_ms(step))
    # the two unpack paths at the default launch shape (the sweep above times the shapes with
    # the default path)
    for unpack in ("convert", "asm") if want("unpack") else []:
        with override(estimate_unpack=unpack):
            log("estimate_unpack", dict(launch.get("estimate"), unpack=unpack), graph_ms(est),
                max_abs_diff=float((est()[valid] - ref[valid]).abs().max()))
    if want("layout"):
        # the sidecar's int4 codes and interleaved scale/zero stored slot-major ([S, H, ...])
        # or head-major ([H, S, ...] viewed as [S, H, ...], what the sidecar allocates): same
        # values, other strides; a page of one head is one contiguous run head-major
        kq_s = inp["kq"].contiguous()
        sz_s = torch.stack([inp["ks"], inp["kz"]], -1).contiguous()
        kq_h = inp["kq"].transpose(0, 1).contiguous().transpose(0, 1)
        sz_h = torch.stack([inp["ks"], inp["kz"]], 0).permute(2, 1, 0).contiguous()
        sz_h = sz_h.permute(1, 0, 2)
        for name, kq, ks, kz in (("slot-major", kq_s, sz_s[..., 0], sz_s[..., 1]),
                                 ("head-major", kq_h, sz_h[..., 0], sz_h[..., 1])):
            f = lambda: estimate.int4_scores_triton(inp["q"], kq, ks, kz, cand, cnt, sm,
                                                    out=ws.scores[:bs], page_size=PAGE)
            ms = graph_ms(f)
            log("estimate_layout", dict(layout=name), ms,
                max_abs_diff=float((f()[valid] - ref[valid]).abs().max()))
        del kq_s, sz_s, kq_h, sz_h
    est_ms = graph_ms(est)
    # top-p and union: timed with the estimate in front
    prune_stage = lambda: prune.twilight_prune_triton(
        inp["q"], inp["kq"], inp["ks"], inp["kz"], cand, cnt, pr, sm, 1, 0,
        scores=ws.scores[:bs], kept_slots=ws.kept_slots[:bs], kept_counts=ws.kept_counts[:bs],
        lo=ws.head_lo[: bs * H * G], tot=ws.head_tot[: bs * H * G], page_size=PAGE,
        scratch=ws.topp_scratch, mx=ws.head_max[: bs * H * G], marks=ws.union_marks[:bs],
        parts=ws.score_parts[:bs])
    k0, n0 = [t.clone() for t in prune_stage()]

    def log_prune(kind, cfg):
        """Time the prune with the variant in place, and the whole step (select, prune, attend;
        default row groups); check its kept sets against the default's."""
        ms = graph_ms(prune_stage)
        k1, n1 = prune_stage()
        differing = union.kept_set_differences(k0, n0, k1, n1)[1]
        log(kind, cfg, ms, minus_estimate_ms=ms - est_ms, rows_differing=differing,
            step_ms=graph_ms(step))

    # the top-p shapes, the one launch shape used at every batch (the wide entry never taken;
    # "refloor": only the first two, the default with and without the raised floor)
    for cfg in TOPP if want("topp") else TOPP[:2] if want("refloor") else []:
        with override(topp=cfg, topp_wide_heads=1 << 30):
            log_prune("topp+union", cfg)
    # the optimistic raised floor: compacted above 2**RAISE times the droppable floor, checked in
    # the same pass (both launch shapes)
    for r in (0, 1, 2, 3) if want("raise") else []:
        with override(topp=dict(RAISE=r)):
            log_prune("topp_raise", dict(RAISE=r))
    # the wide top-p launch shape at this batch or not
    for wide in (False, True) if want("topp_wide") else []:
        with override(topp_wide_heads=0 if wide else 1 << 30):
            cfg = dict(launch.get("topp"), **(launch.get("topp_wide") if wide else {}))
            log_prune("topp_wide", dict(cfg, wide=wide))
    # warps of the 8192-candidate union and overflow kernels
    for kind, entry, choices in (("union", "union_warps", UNION),
                                 ("overflow", "overflow_warps", OVERFLOW)):
        for w in choices if want(kind) else []:
            with override(**{entry: {8192: w}}):
                log_prune(kind, dict(num_warps=w))
    # the overflow kernel's grid: a program per KV head (looking at its G q heads) or per q head
    for per_kv in (False, True) if want("overflow_grid") else []:
        with override(overflow_per_kv=per_kv):
            log_prune("overflow_grid", dict(per_kv=per_kv))
    # the top-p kernel's max and sum: from the estimate's partials or from a pass over the row
    # (the estimate alone timed with and without writing them)
    for from_parts in (False, True) if want("parts") else []:
        with override(topp_from_parts=from_parts):
            pa = ws.score_parts[:bs] if from_parts else None
            log("estimate_parts", dict(from_parts=from_parts), graph_ms(
                lambda: estimate.int4_scores_triton(inp["q"], inp["kq"], inp["ks"], inp["kz"],
                                                    cand, cnt, sm, out=ws.scores[:bs],
                                                    page_size=PAGE, parts=pa)))
            log_prune("topp_parts", dict(from_parts=from_parts))
    # register caps of the prune kernels (how many programs share an SM)
    for cfg in [{}] + MAXNREG if want("maxnreg") else []:
        with override(maxnreg=cfg):
            log_prune("maxnreg", launch.get("maxnreg"))
    # attend over the kept slots: split count and launch shape of the split kernel
    mid_o = torch.empty(bs * H * 16 * G, D, dtype=torch.float32, device="cuda")
    mid_lse = torch.empty(bs * H * 16 * G, dtype=torch.float32, device="cuda")
    att = lambda sp: attend.sparse_decode_attention_triton(inp["q"], inp["k"], inp["v"], k0, n0,
                                                           sm, out=out, splits=sp, mid_o=mid_o,
                                                           mid_lse=mid_lse)
    sp0 = attend.attend_splits(bs * H, ws.num_sms)
    ref = att(sp0).float().clone()
    if want("attend"):
        log("attend_default", dict(launch.get("attend"), splits=sp0), graph_ms(lambda: att(sp0)))
    for cfg in ATTEND if want("attend") else []:
        with override(attend={k: v for k, v in cfg.items() if k != "splits"}):
            ms = graph_ms(lambda: att(cfg["splits"]))
            log("attend", cfg, ms,
                max_abs_diff=float((att(cfg["splits"]).float() - ref).abs().max()))
    # Quest alone: attend over every candidate, by split count (default launch shape)
    qk, qn = union.expand_candidates_triton(cand, cnt, PAGE, ws.kept_slots[:bs])
    qk, qn = qk.clone(), qn.clone()
    qatt = lambda sp: attend.sparse_decode_attention_triton(inp["q"], inp["k"], inp["v"], qk, qn,
                                                            sm, out=out, splits=sp, mid_o=mid_o,
                                                            mid_lse=mid_lse)
    sp0 = attend.attend_splits(bs * H, ws.num_sms, keep_all=True)
    ref = qatt(sp0).float().clone()
    for sp in (1, 2, 4, 8, 16) if want("attend") else []:
        log("attend_keep_all", dict(splits=sp, default=sp == sp0), graph_ms(lambda: qatt(sp)),
            max_abs_diff=float((qatt(sp).float() - ref).abs().max()))
    # the whole step (select, prune, attend) with its requests in 1-4 row groups, one stream
    # each, for Twilight and for Quest alone
    ref = {}
    for n in GROUPS if want("groups") and bs > 1 else []:
        with row_groups(n):
            gws = ops.DecodeWorkspace.allocate(bs, H, G, D, 8192, PAGE, ctx, "cuda")
            for name, p in (("step_groups", pr), ("step_groups_quest", None)):
                step = lambda: decode(gws, p)
                ms = graph_ms(step)
                o, kc = step()
                torch.cuda.synchronize()
                ref.setdefault(name, (o.float().clone(), kc.clone()))
                used = ops.side_streams(gws.streams, torch.cuda.current_stream(), n - 1)
                log(name, dict(groups=n, streams=len(used) + 1), ms,
                    max_abs_diff=float((o.float() - ref[name][0]).abs().max()),
                    counts_equal=bool(torch.equal(kc, ref[name][1])))
    inp.clear()
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int_list, default="8,64")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--only", default="",
                    help="comma list: page_scores,select,estimate,unpack,layout,topp,union,"
                         "overflow,maxnreg,attend,groups,refloor,topp_wide,overflow_grid,parts,"
                         "raise")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    only = [x for x in args.only.split(",") if x]
    for bs in args.batches:
        sweep(bs, args.context, rows, only)
    if args.out:
        write_result(args.out, dict(table=launch.rows(), rows=rows))


if __name__ == "__main__":
    main()
