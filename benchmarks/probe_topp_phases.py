"""Where the top-p kernel's time goes: per-program phase times from ``%globaltimer`` stamps.

A copy of ``kernels/topp.py`` is instrumented: each program of ``_topp_head_kernel`` stores the
GPU's global timer at its start, after the max/sum pass, after the compaction (and the raised
floor, when taken) and before its last stores. On the inputs of ``bench_attention.py`` (its key
law, Quest B0 = 8192 candidates, top-p 0.95) the kernel runs once after warm-up; per batch the
JSON has the mean time of each phase, the mean and max time of a program, the kernel's span,
when programs started (quantiles: the waves), and how many programs were resident on average
(programs x mean time / span / SMs). The stamps add a few instructions, so absolute times are a
little above the kernel's own; compare phases, not the total.

Usage: python benchmarks/probe_topp_phases.py --batches 8,64 --out topp_phases.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import PAGE, make_inputs, write_rows  # noqa: E402

from sglang_twilight import ops  # noqa: E402
from sglang_twilight.kernels import quest as Q  # noqa: E402
from sglang_twilight.kernels import topp as T0  # noqa: E402

# (line the stamp goes before, name of the phase that ends there)
MARKS = [("c = tl.arange(0, CHUNK)", None),
         ("s_floor = _topp_floor(", "max/sum (pass or partials)"),
         ("tl.debug_barrier()  # this program's stores", "compaction (+ raised floor)"),
         ("tl.store(lo_ptr + pid, lo)", "search + marks")]
STAMP = "tl.store(tptr + tl.program_id(0) * 8 + {i}, tl.extra.cuda.globaltimer())"


# ablations of the compaction (``_compact_above``), to see what its time is made of: each drops
# one part, so the kept sets are wrong; only the phase times mean anything
ABLATIONS = {
    "no-stores": [("            tl.store(buf + pos, st + c, mask=sm)\n", ""),
                  ("            tl.store(buf + SCRATCH + pos, s.to(tl.int32, bitcast=True), "
                   "mask=sm)\n", "")],
    "no-scan": [("pos = n_surv + tl.cumsum(surv.to(tl.int32), 0) - 1", "pos = n_surv + c")],
    "no-sum": [("n_surv += tl.sum(surv.to(tl.int32), 0)", "n_surv += CHUNK // 5")],
}


def instrumented_topp(ablation=None):
    """kernels/topp.py with the stamps in _topp_head_kernel (an extra first argument ``tptr``),
    loaded as a module of the kernels package so its relative imports resolve; ``ablation``: a
    name in ABLATIONS."""
    src = open(T0.__file__).read()
    for old, new in ABLATIONS.get(ablation, []):
        if old not in src:
            raise SystemExit(f"probe_topp_phases: ablation {ablation}: '{old}' is not in topp.py")
        src = src.replace(old, new)
    a = src.index("def _topp_head_kernel(")
    b = src.index("@triton.jit", a)
    body = src[a:b].replace("def _topp_head_kernel(\n", "def _topp_head_kernel(\n        tptr,\n", 1)
    for i, (line, _) in enumerate(MARKS):  # every place the line is (one per branch)
        body, n = re.subn(r"\n( *)" + re.escape(line),
                          lambda m: "\n" + m.group(1) + STAMP.format(i=i) + m.group(0), body)
        if not n:
            raise SystemExit(f"probe_topp_phases: '{line}' is no longer in _topp_head_kernel")
    path = os.path.join(os.path.dirname(T0.__file__), f"_topp_probe_tmp{abs(hash(ablation))}.py")
    with open(path, "w") as f:
        f.write(src[:a] + body + src[b:])
    try:
        name = os.path.basename(path)[:-3]
        spec = importlib.util.spec_from_file_location(T0.__package__ + "." + name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    finally:
        os.unlink(path)
    return mod


def probe(T, bs, ctx, H=8, G=4, D=128):
    inp = make_inputs(bs, ctx, H, G, D, torch.bfloat16, "cuda")
    sm = 1 / math.sqrt(D)
    ws = ops.DecodeWorkspace.allocate(bs, H, G, D, 8192, PAGE, ctx, "cuda")
    pr = torch.full((bs,), 0.95, dtype=torch.float32, device="cuda")
    cand, cnt = Q.quest_select_pages_triton(
        inp["q"], inp["kmax"], inp["kmin"], inp["kbs"], inp["r2t"], inp["rpi"], inp["seq"],
        ws.capacity, PAGE, max_pages=ws.max_pages, cand_pages=ws.cand_pages[:bs],
        cand_counts=ws.cand_counts[:bs])
    parts = ws.score_parts[:bs] if T.TOPP_FROM_PARTS else None  # the max/sum as the step has it
    scores = T.int4_scores_triton(inp["q"], inp["kq"], inp["ks"], inp["kz"], cand, cnt, sm,
                                  out=ws.scores[:bs], page_size=PAGE, parts=parts)
    pa = parts if parts is not None else scores
    C = scores.shape[-1]
    c_pad = 1 << (C - 1).bit_length()
    n = bs * H * G
    lo, tot, mx = ws.head_lo[:n], ws.head_tot[:n], ws.head_max[:n]
    marks = ws.union_marks[:bs]
    stamps = torch.zeros(n * 8, dtype=torch.int64, device="cuda")

    def launch():
        ws.topp_scratch.zero_()  # an ablation may leave it unwritten: indices stay in range
        T._topp_head_kernel[(n,)](
            stamps, scores, cnt, pr, lo, tot, mx, ws.topp_scratch, marks, pa, scores.stride(0),
            scores.stride(1), scores.stride(2), marks.stride(0), marks.stride(1), pa.stride(0),
            pa.stride(1), pa.stride(2), H=H, G=G, SCRATCH=T.topp_scratch_width(C),
            PARTS=parts is not None, NP=pa.shape[-1] if parts is not None else 1,
            SPAN=T.estimate_span(bs * H), **T._topp_launch(c_pad))
        marks.zero_()

    for _ in range(3):
        launch()
    torch.cuda.synchronize()
    stamps.zero_()
    launch()
    torch.cuda.synchronize()
    t = stamps.view(n, 8)[:, : len(MARKS)].double() / 1e3  # us
    t0 = t[:, 0].min()
    dur = t[:, -1] - t[:, 0]
    span = float(t[:, -1].max() - t0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    starts = t[:, 0] - t0
    res = dict(batch=bs, context=ctx, programs=n, config=T._topp_launch(c_pad),
               phases_us={name: round(float((t[:, i] - t[:, i - 1]).mean()), 2)
                          for i, (_, name) in enumerate(MARKS) if name},
               program_us_mean=round(float(dur.mean()), 2), program_us_max=round(float(dur.max()), 2),
               span_us=round(span, 2),
               start_quantiles_us=[round(float(starts.quantile(q)), 2) for q in (0, .25, .5, .75, 1)],
               resident_per_sm=round(float(n * dur.mean() / span / sms), 2))
    res.update(search_steps(scores.view(n, C), cnt.repeat_interleave(G), pr.repeat_interleave(H * G),
                            T._topp_launch(c_pad)["RAISE"]))
    inp.clear()
    torch.cuda.empty_cache()
    return res


def search_steps(s, count, p, raise_floor):
    """How many steps the kernel's threshold search takes per head (``quest.threshold_search_ref``,
    its steps replayed in torch, over the entries it compacts: above 2**RAISE times the
    droppable floor where that is safe, else above the floor), and how many entries it
    searches."""
    idx = torch.arange(s.shape[1], device=s.device)[None, :]
    s = torch.where(idx < count[:, None], s, float("-inf"))
    m = s.amax(1, keepdim=True)
    e = torch.exp(s - m)
    tot = e.sum(1, keepdim=True)
    floor = T0.topp_floor_ref(m, tot, p[:, None], count[:, None].float())
    raised = floor + raise_floor * math.log(2)
    under = torch.where(s < raised, e, 0.0).sum(1, keepdim=True)
    safe = under <= (1.0 - p[:, None]) * tot * 0.999
    present = s >= torch.where(safe, raised, floor)
    key = torch.where(present, e.view(torch.int32), -1).long()
    total = (tot - torch.where(safe, under, 0.0))[:, 0]
    _, steps = Q.threshold_search_ref(key, e, present, p * tot[:, 0], total, value_space=True)
    n_above = present.sum(1).float()
    return dict(search_steps_mean=round(float(steps.float().mean()), 2),
                search_steps_max=int(steps.max()),
                entries_searched_mean=round(float(n_above.mean()), 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="8,64")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--variants", default="",
                    help="';'-separated variants of the kernel, each a ','-list of TOPP_CONFIG "
                         "entries and maxnreg, e.g. 'num_warps=4,CHUNK=512;maxnreg=80'; "
                         "an empty one is the default")
    ap.add_argument("--ablations", default="",
                    help="comma list of ABLATIONS to time besides the kernel itself "
                         "(its compaction phase only means anything)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    T = instrumented_topp()
    rows = []
    for name in [a for a in args.ablations.split(",") if a]:
        TA = instrumented_topp(name)
        for bs in map(int, args.batches.split(",")):
            rows.append(dict(probe(TA, bs, args.context), ablation=name))
            print(json.dumps(rows[-1]), flush=True)
    variants = [dict(x.split("=") for x in v.split(",") if x) for v in args.variants.split(";")]
    default, maxnreg = dict(T.TOPP_CONFIG), dict(T.MAXNREG)
    for bs in map(int, args.batches.split(",")):
        for v in variants:  # TOPP_CONFIG entries, and maxnreg (the top-p kernel's cap)
            v = {k: (v[k] == "True" if v[k] in ("True", "False") else int(v[k])) for k in v}
            T.MAXNREG = dict(maxnreg, topp=v.pop("maxnreg", maxnreg.get("topp")))
            T.TOPP_CONFIG = dict(default, **v)
            rows.append(dict(probe(T, bs, args.context), maxnreg=T.MAXNREG["topp"]))
            print(json.dumps(rows[-1]), flush=True)
    T.TOPP_CONFIG, T.MAXNREG = default, maxnreg
    if args.out:
        write_rows(args.out, rows)


if __name__ == "__main__":
    main()
