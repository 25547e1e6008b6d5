"""Where a prune stage that does not return stops: the benchmark's inputs at one batch x context,
the candidates chosen, then the prune of every request in one call (as ``bench_attention.py``
times it alone), each kernel launch blocking (CUDA_LAUNCH_BLOCKING=1, set before torch loads) and
a Python stack dumped after ``--timeout`` seconds, so that the stack names the kernel. Prints the
estimate's and top-p's launch shapes first, then each step as it finishes.

Usage (GPU): python benchmarks/probe_prune_alone.py --batch 64 --context 8192
(the 8k x 64 case of bench_attention.py never returned at 450313e; docs/KERNELS.md).
"""

from __future__ import annotations

import argparse
import faulthandler
import math
import os
import sys
import time

os.environ.setdefault("CUDA_LAUNCH_BLOCKING", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import PAGE, make_inputs  # noqa: E402

from sglang_twilight import ops  # noqa: E402
from sglang_twilight.kernels._launch import next_pow2  # noqa: E402
from sglang_twilight.kernels import quest as _quest  # noqa: E402
from sglang_twilight.kernels import topp as _topp  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--budget", type=int, default=8192)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--timeout", type=int, default=90, help="seconds before the stack is dumped")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    faulthandler.dump_traceback_later(args.timeout, exit=True)
    bs, ctx, H, G, D = args.batch, args.context, 8, 4, 128
    dev = args.device
    t0 = time.time()
    log = lambda msg: print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)
    inp = make_inputs(bs, ctx, H, G, D, torch.bfloat16, dev)
    ws = ops.DecodeWorkspace.allocate(bs, H, G, D, args.budget, PAGE, ctx, dev)
    rows = bs * H
    log(f"estimate shape {_topp._estimate_config(rows)}, top-p shape "
        f"{_topp._topp_launch(next_pow2(ws.capacity), rows * G)}")
    cand, cnt = _quest.quest_select_pages_triton(
        inp["q"], inp["kmax"], inp["kmin"], inp["kbs"], inp["r2t"], inp["rpi"], inp["seq"],
        ws.capacity, PAGE, max_pages=ws.max_pages, scores=ws.page_scores[:bs],
        cand_pages=ws.cand_pages[:bs], cand_counts=ws.cand_counts[:bs])
    log(f"select done, mean candidates {cnt.float().mean().item():.0f}")
    sm = 1 / math.sqrt(D)
    pr = torch.full((bs,), args.top_p, dtype=torch.float32, device=dev)
    parts = ws.score_parts[:bs]
    scores = _topp.int4_scores_triton(inp["q"], inp["kq"], inp["ks"], inp["kz"], cand, cnt, sm,
                                      out=ws.scores[:bs], page_size=PAGE, parts=parts)
    log("estimate done")
    n = bs * H * G
    kept, kcnt = _topp.prune_from_scores_triton(
        scores, cand, cnt, pr, 1, 0, kept_slots=ws.kept_slots[:bs], kept_counts=ws.kept_counts[:bs],
        lo=ws.head_lo[:n], tot=ws.head_tot[:n], page_size=PAGE, scratch=ws.topp_scratch,
        mx=ws.head_max[:n], marks=ws.union_marks[:bs], step_heads=n, parts=parts,
        parts_span=_topp.estimate_span(rows))
    log(f"top-p, overflow and union done: mean kept {kcnt.float().mean().item():.1f}")
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
