"""How many steps the threshold search takes: bisection against the interpolated search.

Every top-K (the Quest pages) and top-p (the kept tokens) in the kernels is one threshold search
(``quest._threshold_search``): each step is one fused block reduction, so at small batch a
kernel's time grows with its slowest program's step count. This study replays on the CPU, row by
row, both the bisection the kernels used before (midpoint of the keys still possible) and the
interpolated search they use now (``quest.threshold_search_ref``, the kernel's own steps in
torch), checks that both end on the same threshold as a sort, and counts their steps:

* on the keys of ``bench_attention.py`` (``make_inputs``; Quest B0 = 8192 of a 32k context):
  the top-K pages (``budget / 16`` of the request's pages, the first and last forced) and top-p
  at p = 0.95 / 0.9 / 0.5 over the entries above the droppable floor and above 4x it (what the
  top-p kernel compacts);
* on synthetic rows of 2048 entries that are hard for an interpolation (uniform, geometric,
  one spike over noise, four tied values, a power law, two levels): top-p at 0.95 and 0.5 of the
  mass and top-512.

Usage: python benchmarks/search_study.py --batch 8 --context 32768 --out search_study_cpu.json
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import PAGE, make_inputs, write_cpu_study  # noqa: E402

from sglang_twilight.kernels import quest as Q  # noqa: E402
from sglang_twilight.kernels import topp as T  # noqa: E402

BIG = 2**31 - 1


def bisection_ref(key, present, val, target):
    """The kernels' former search: the midpoint between the smallest and largest keys still
    possible, one end moved onto a present key a step -> (threshold, steps)."""
    lo = torch.where(present, key, BIG).amin(1)
    hi = torch.where(present, key, -(2**31)).amax(1)
    steps = torch.zeros_like(lo)
    while bool((lo < hi).any()):
        live = lo < hi
        mid = lo + (hi - lo + 2) // 2
        ge = present & (key >= mid[:, None])
        ok = torch.where(ge, val, 0).sum(1) >= target
        lo = torch.where(live & ok, torch.where(ge, key, BIG).amin(1), lo)
        hi = torch.where(live & ~ok, torch.where(present & ~ge, key, -(2**31)).amax(1), hi)
        steps += live.long()
    return lo, steps


def compare(key, present, val, target, total, value_space):
    t_ref = Q.threshold_sorted_ref(key, present, val, target)
    t_bis, n_bis = bisection_ref(key, present, val, target)
    t_new, n_new = Q.threshold_search_ref(key, val, present, target, total, value_space)
    assert torch.equal(t_bis, t_ref) and torch.equal(t_new, t_ref), "threshold differs"

    def st(n):
        return dict(mean=round(float(n.double().mean()), 2), max=int(n.max()))

    return dict(rows=int(key.shape[0]), entries_mean=round(float(present.sum(1).double().mean()), 1),
                bisection=st(n_bis), interpolated=st(n_new))


def topk_case(key, k, forced):
    """Top-k of each row (val 1), the ``forced`` columns at the largest key."""
    key = torch.where(forced[None], BIG, key.long())  # int64: the bisection's midpoints
    pres = torch.ones_like(key, dtype=torch.bool)
    n = key.shape[1]
    return compare(key, pres, torch.ones(key.shape, dtype=torch.int32), torch.full((key.shape[0],), k),
                   torch.full((key.shape[0],), n), False)


def topp_case(e, present, p):
    """Top-p over the weights e (non-negative), searched among the present ones; the search's
    start estimate is the present mass, as the kernel's (the row's sum less what it left under
    the floor)."""
    tot = e.sum(1)
    key = torch.where(present, e.view(torch.int32).long(), -1)
    return compare(key, present, e, p * tot, torch.where(present, e, 0).sum(1), True)


def synthetic(rows, width, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(rows, width, generator=g)
    return {
        "uniform": u,
        "geometric": (0.9 ** torch.arange(width).float())[None].repeat(rows, 1),
        "spike": torch.cat([torch.ones(rows, 1), u[:, 1:] * 1e-4], 1),
        "ties": torch.randint(1, 5, (rows, width), generator=g).float(),
        "power law": torch.rand(rows, width, generator=g) ** 8,
        "two levels": torch.where(u < 0.02, 1.0, 1e-3)
        * (1 + 1e-3 * torch.rand(rows, width, generator=g)),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--budget", type=int, default=8192)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    H, G, D = 8, 4, 128
    inp = make_inputs(args.batch, args.context, H, G, D, torch.bfloat16, "cpu")
    pt, n_pages = Q.page_table_ref(inp["r2t"], inp["rpi"], inp["seq"], PAGE)
    ps = Q.quest_page_scores_ref(inp["q"], inp["kmax"], inp["kmin"], inp["kbs"], pt, n_pages)
    NP = ps.shape[-1]
    j = torch.arange(NP)
    res = dict(topk_pages=topk_case(Q.f32_key_ref(ps.reshape(-1, NP)), args.budget // PAGE,
                                    (j == 0) | (j == NP - 1)), topp={}, synthetic={})
    cand, cnt = Q.quest_select_ref(inp["q"], inp["kmax"], inp["kmin"], inp["kbs"], inp["r2t"],
                                   inp["rpi"], inp["seq"], args.budget, PAGE)
    s = T.int4_scores_ref(inp["q"], inp["kq"], inp["ks"], inp["kz"], cand, cnt, 1 / math.sqrt(D))
    s = s.reshape(-1, s.shape[-1]).float()
    m = s.amax(1, keepdim=True)
    e = torch.exp(s - m)
    tot = e.sum(1, keepdim=True)
    for p in (0.95, 0.9, 0.5):
        f0 = T.topp_floor_ref(m, tot, p, s.shape[1])
        for name, fl in (("floor", f0), ("4x floor", f0 + 2 * math.log(2))):
            res["topp"][f"p={p} above {name}"] = topp_case(e, s >= fl, p)
    for name, v in synthetic(64, 2048, seed=1).items():
        res["synthetic"][name] = {
            f"top-p {p}": topp_case(v, torch.ones_like(v, dtype=torch.bool), p) for p in (0.95, 0.5)}
        res["synthetic"][name]["top-512"] = topk_case(Q.f32_key_ref(v), 512,
                                                      torch.zeros(2048, dtype=torch.bool))
    write_cpu_study(args.out, dict(batch=args.batch, context=args.context, budget=args.budget), res)


if __name__ == "__main__":
    main()
