"""What the prune's fp32 scores cost on their way through the HBM: the estimate (with its
softmax partials) timed writing its scores to the workspace, as the step does, and writing them
to one request's rows that every request shares (the tensor expanded over the batch, stride 0),
so that the written lines stay in the L2 (1 MB at Llama-8B shapes). The second's scores are
overwritten by each other and useless; only its time counts: the difference is what the
round trip's write half costs, the part a prune that kept its scores on chip would not pay
(docs/KERNELS.md, "For the next round"). Every request's programs write the same lines, so from
some batch on they contend for them and the shared rows get slower than the real ones: the
difference measures the write half only where it stays small (on the H100 up to batch 16).

Usage (GPU): python benchmarks/probe_scores_roundtrip.py --batches 8,16,32,64 --out F.json
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import PAGE, graph_ms, make_inputs, write_rows  # noqa: E402

from sglang_twilight import ops  # noqa: E402
from sglang_twilight.kernels import quest as _quest  # noqa: E402
from sglang_twilight.kernels import topp as _topp  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="8,16,32,64")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--budget", type=int, default=8192)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    H, G, D = 8, 4, 128
    rows = []
    for bs in map(int, args.batches.split(",")):
        inp = make_inputs(bs, args.context, H, G, D, torch.bfloat16, "cuda")
        ws = ops.DecodeWorkspace.allocate(bs, H, G, D, args.budget, PAGE, args.context, "cuda")
        cand, cnt = _quest.quest_select_pages_triton(
            inp["q"], inp["kmax"], inp["kmin"], inp["kbs"], inp["r2t"], inp["rpi"], inp["seq"],
            ws.capacity, PAGE, max_pages=ws.max_pages, scores=ws.page_scores[:bs],
            cand_pages=ws.cand_pages[:bs], cand_counts=ws.cand_counts[:bs])
        sm = 1 / math.sqrt(D)
        shared = ws.scores[:1].expand(bs, -1, -1, -1)  # every request writes the same rows

        def est(out):
            return lambda: _topp.int4_scores_triton(
                inp["q"], inp["kq"], inp["ks"], inp["kz"], cand, cnt, sm, out=out,
                page_size=PAGE, parts=ws.score_parts[:bs])

        real, alias = graph_ms(est(ws.scores[:bs])), graph_ms(est(shared))
        score_bytes = bs * H * G * ws.capacity * 4
        row = dict(batch=bs, context=args.context, estimate_ms=real,
                   estimate_scores_in_l2_ms=alias, score_bytes=score_bytes,
                   write_cost_ms=real - alias)
        print(row, flush=True)
        rows.append(row)
        inp.clear()
        del ws
        torch.cuda.empty_cache()
    if args.out:
        write_rows(args.out, rows)


if __name__ == "__main__":
    main()
