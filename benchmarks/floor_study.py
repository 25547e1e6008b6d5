"""How many estimate scores a top-p search must look at: the droppable floor and higher ones.

The top-p kernel compacts and searches only the scores above a floor under which no entry can
be kept: with e = exp(s - max), T = sum(e) over the C candidates and the kept set the fewest
largest entries holding p * T, every floor f whose entries below it hold at most (1 - p) * T is
safe (all of them together could be dropped). The kernel starts from f0 = (1 - p) * T / C
(safe whatever the row). This study measures, on the keys of ``bench_attention.py`` (Quest
B0 = 8192 candidates, their int4 estimate, torch references on the CPU), per q head:

* ``survivors_f0``: entries at or above f0 (what the kernel compacts now);
* ``multiples``: for f = k * f0 (k = 2, 4, 8, 16), the entries above it and the fraction of
  heads for which that floor is still safe (the kernel's raised floor tries these only for
  heads with more survivors than its register block, because checking costs a pass over the
  row);
* ``block_bound``: the highest floor that the estimate's per-block partials (max and sum of
  each block of ``span`` candidates) prove safe without a pass: sum over blocks of
  min(block mass, block size * f) <= (1 - p) * T;
* ``kept``: the entries top-p keeps (no floor can leave fewer).

Usage: python benchmarks/floor_study.py --batch 2 --context 32768 --out floor.json
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


def block_bound_floor(scores, span, p, margin=0.999):
    """The highest floor (in units of e = exp(s - max)) that the per-block partials prove safe,
    per q head: every partition of the blocks into 'all of it below f' and 'at most size * f
    below f' gives a safe f; the best one over the partitions by each block's mean."""
    R, H, G, C = scores.shape
    cnt = torch.full((R, H), C, dtype=torch.int32)
    parts = T.score_parts_ref(scores, cnt, span, C // span)
    pm, pt = parts[..., 0, :], parts[..., 1, :]
    m = pm.amax(-1, keepdim=True)
    mass = pt * torch.exp(pm - m)  # each block's mass in units of exp(s - max)
    budget = (1 - p) * mass.sum(-1) * margin
    size = torch.full_like(mass, span)
    mean = mass / size
    below = mean[..., None, :] <= mean[..., :, None]  # [.., partition j, block b]
    a = (mass[..., None, :] * below).sum(-1)
    n = (size[..., None, :] * ~below).sum(-1)
    f = torch.where(n > 0, (budget[..., None] - a) / n.clamp_min(1), torch.zeros_like(a))
    return torch.maximum(budget / C, f.amax(-1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--budget", type=int, default=8192)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--spans", default="512,128")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    H, G, D = 8, 4, 128
    p = args.top_p
    inp = make_inputs(args.batch, args.context, H, G, D, torch.bfloat16, "cpu")
    cand, cnt = Q.quest_select_ref(inp["q"], inp["kmax"], inp["kmin"], inp["kbs"], inp["r2t"],
                                   inp["rpi"], inp["seq"], args.budget, PAGE)
    s = T.int4_scores_ref(inp["q"], inp["kq"], inp["ks"], inp["kz"], cand, cnt, 1 / math.sqrt(D))
    C = s.shape[-1]
    e = torch.exp(s - s.amax(-1, keepdim=True)).double()
    tot = e.sum(-1)
    budget = (1 - p) * tot * 0.999
    f0 = budget / C
    kept = T.topp_mask_ref(torch.softmax(s, -1).reshape(-1, C), p).sum(-1).double()

    def stats(x):
        x = x.double().reshape(-1)
        return dict(mean=float(x.mean()), max=float(x.max()))

    res = dict(survivors_f0=stats((e >= f0[..., None]).sum(-1)), kept=stats(kept), multiples={},
               block_bound={})
    for k in (2, 4, 8, 16):
        f = f0 * k
        safe = torch.where(e < f[..., None], e, 0.0).sum(-1) <= budget
        res["multiples"][k] = dict(survivors=stats((e >= f[..., None]).sum(-1)),
                                   safe_fraction=float(safe.double().mean()))
    for span in map(int, args.spans.split(",")):
        f = block_bound_floor(s, span, p).double()
        res["block_bound"][span] = dict(survivors=stats((e >= f[..., None]).sum(-1)),
                                        floor_over_f0=stats(f / f0))
    write_cpu_study(args.out, dict(batch=args.batch, context=args.context, budget=args.budget,
                                   top_p=p, candidates=C,
                                   q_heads=int(e.shape[0] * e.shape[1] * e.shape[2])), res)


if __name__ == "__main__":
    main()
