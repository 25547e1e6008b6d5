"""Per-kernel GPU time of one Twilight decode step (one layer), from the CUDA profiler.

Same inputs as ``bench_attention.py`` (Llama-3.1-8B layer shapes, its key law); the step runs
eagerly under ``torch.profiler`` and every kernel's device time is averaged over the steps, so
the stage totals of ``bench_attention.py`` can be split into kernels (the graph replay time is
printed beside them). By default the step runs in one row group, so that kernels do not overlap
and each one's time is its own (``--groups 0``: the default rule, the launch table's
``decode_groups``).

Usage: python benchmarks/profile_step.py --batches 8,64 --context 32768 --out prof.json
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.*
from benchmarks.common import int_list, write_result  # noqa: E402
from benchmarks.workload import PAGE, graph_ms, make_inputs, row_groups  # noqa: E402

from sglang_twilight import ops  # noqa: E402
from sglang_twilight.kernels import topp  # noqa: E402


def profile_case(bs, ctx, steps, top_p, budget, groups, H=8, G=4, D=128, dtype=torch.bfloat16):
    """``groups``: row groups while profiling (the launch table's ``decode_groups``; 1: the
    kernels run one after the other, so each one's device time is its own, not shared with
    another group's)."""
    inp = make_inputs(bs, ctx, H, G, D, dtype, "cuda")
    try:
        graph_default = _profile(inp, bs, ctx, 0, top_p, budget, H, G, D)["graph_ms"]
        with row_groups(groups):
            r = _profile(inp, bs, ctx, steps, top_p, budget, H, G, D)
    finally:
        inp.clear()
        torch.cuda.empty_cache()
    return dict(r, graph_ms_default_groups=graph_default, groups=groups or "default")


def _profile(inp, bs, ctx, steps, top_p, budget, H, G, D):
    """Graph replay time of the step on ``inp`` in a workspace of the current row groups, and
    with ``steps`` > 0 the per-kernel profile."""
    sm = 1 / math.sqrt(D)
    ws = ops.DecodeWorkspace.allocate(bs, H, G, D, budget, PAGE, ctx, "cuda")
    pr = torch.full((bs,), top_p, dtype=torch.float32, device="cuda")
    out = torch.empty_like(inp["q"])
    sc = inp["side"]
    loc = inp["slots"][:, -1].contiguous()

    def step():
        ops.store_sidecar(inp["k"], loc, sc, PAGE, backend="triton")
        ops.twilight_decode(inp["q"], inp["k"], inp["v"], sc, inp["r2t"], inp["rpi"], inp["seq"],
                            pr, budget=budget, page_size=PAGE, sm_scale=sm, min_budget=1,
                            max_budget=0, backend="triton", workspace=ws, out=out)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    graph = graph_ms(step)
    if not steps:
        return dict(graph_ms=graph)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    per = defaultdict(float)
    calls = defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            calls[ev.name] += 1
    kernels = sorted(((n, t / steps, calls[n] // steps) for n, t in per.items()), key=lambda x: -x[1])
    kept = float(ws.kept_counts[:bs].float().mean())
    # entries per q head above the top-p kernel's droppable floor: a head with more than its
    # register block (MID) tries floors 2-16x higher (the highest under which the row's mass is
    # still droppable), and one still over MID is searched by _topp_overflow_kernel
    C = ws.scores.shape[-1]
    cnt = ws.cand_counts[:bs].float()[:, :, None, None]
    valid = torch.arange(C, device="cuda") < cnt
    probs = torch.softmax(torch.where(valid, ws.scores[:bs], float("-inf")), -1)
    floor = (1 - top_p) / cnt * 0.999
    surv = (valid & (probs >= floor)).sum(-1).flatten()
    raised = floor.expand(probs.shape[:-1] + (1,)).clone()
    for k in (1, 2, 3, 4):
        fk = floor * 2 ** k
        ok = torch.where(valid & (probs < fk), probs, 0.0).sum(-1, keepdim=True) <= (1 - top_p) * 0.999
        raised = torch.where(ok, fk, raised)
    surv_raised = (valid & (probs >= raised)).sum(-1).flatten()
    mid = topp._topp_launch(1 << (C - 1).bit_length())["MID"]
    return dict(batch=bs, context=ctx, graph_ms=graph, kept_tokens=kept,
                above_floor=dict(mean=float(surv.float().mean()), max=int(surv.max()),
                                 heads=surv.numel(), heads_over_block=int((surv > mid).sum()),
                                 heads_over_block_raised=int(((surv > mid)
                                                              & (surv_raised > mid)).sum()),
                                 block=mid),
                kernels=[dict(name=n, us=round(u, 2), calls=c) for n, u, c in kernels])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int_list, default="8,64")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--budget", type=int, default=8192)
    ap.add_argument("--groups", type=int, default=1,
                    help="row groups while profiling (0: the default rule)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = []
    for bs in args.batches:
        r = profile_case(bs, args.context, args.steps, args.top_p, args.budget, args.groups)
        res.append(r)
        print(f"batch {bs} x {args.context}: graph {r['graph_ms']:.4f} ms ({r['groups']} groups; "
              f"{r['graph_ms_default_groups']:.4f} with the default), kept {r['kept_tokens']:.0f}"
              f", above the floor {r['above_floor']}")
        for k in r["kernels"]:
            print(f"  {k['us']:9.2f} us  x{k['calls']}  {k['name'][:90]}")
    if args.out:
        write_result(args.out, dict(cases=res))


if __name__ == "__main__":
    main()
