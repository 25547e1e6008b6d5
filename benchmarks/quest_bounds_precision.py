"""How Quest's page selection changes with 8-bit page bounds instead of exact (bf16) ones.

The Quest bounds (per page, KV head and channel: max and min of K) are most of the bytes the
select stage reads (``select.bytes`` in ``bench_attention.py``'s JSON), so the sidecar stores
them in 8 bits. This script measures what that does to the selection:

* ``bf16``: the exact bounds (the keys are bf16);
* ``fp8-e4m3``: each bound rounded outward to float8 e4m3 (max up, min down), so the page score
  stays an upper bound of q.k (a value beyond e4m3's +-448 cannot be bounded: counted);
* ``int8-page``: one fp32 scale per (page, KV head), s = max |bound| / 127, codes ceil(max / s)
  and floor(min / s) (``store.quantize_bounds_ref``, what the sidecar stores).

On the keys of ``benchmarks/workload.py`` (the kernel benchmarks' key law and shapes), or a
real model's (``--model``), per budget B0: the exact attention mass (softmax of q.k over every
token, fp32) that the candidate pages hold, per (request, q head), and the overlap of each
variant's page set with bf16's. Runs on CPU or GPU.

Usage: python benchmarks/quest_bounds_precision.py --batch 2 --context 32768 --out q8.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.*
from benchmarks.common import write_result  # noqa: E402
from benchmarks.workload import PAGE, make_inputs  # noqa: E402

from sglang_twilight.kernels import select, store  # noqa: E402

E4M3_MAX = 448.0


def _e4m3_step(r: torch.Tensor, up: bool) -> torch.Tensor:
    """The e4m3 value next to ``r`` (float8_e4m3fn) towards +inf (``up``) or -inf."""
    b = r.view(torch.uint8).to(torch.int16)
    neg = (b & 0x80) != 0
    mag = b & 0x7F
    away = neg != up  # towards larger magnitude: up for positives, down for negatives
    mag = torch.where(away, mag + 1, mag - 1)
    zero_cross = (mag < 0)  # from +-0 towards the other sign: the smallest subnormal there
    sign = torch.where(zero_cross, torch.where(torch.tensor(up), 0, 0x80), b & 0x80)
    mag = torch.where(zero_cross, 1, mag)
    return (sign | mag).to(torch.uint8).view(torch.float8_e4m3fn)


def fp8_outward(x: torch.Tensor, up: bool):
    """x fp32 -> (e4m3 values as fp32, each >= x (up) or <= x; count beyond +-448)."""
    over = int((x.abs() > E4M3_MAX).sum())
    r = x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    bad = (r.float() < x) if up else (r.float() > x)
    r = torch.where(bad & (x.abs() < E4M3_MAX), _e4m3_step(r, up), r)
    return r.float(), over


def int8_page(kmax: torch.Tensor, kmin: torch.Tensor):
    """fp32 bounds [pages, H, D] -> the sidecar's int8 codes with one scale per (page, head)
    (``store.quantize_bounds_ref``), dequantized."""
    hi, lo, scale = store.quantize_bounds_ref(kmax, kmin)
    return store.dequantize_bounds_ref(hi, scale), store.dequantize_bounds_ref(lo, scale)


def selected_pages(q, kmax, kmin, inp, budget):
    """bool [R, H, NP]: the pages Quest keeps (sink, last, best others up to budget / PAGE)."""
    pt, n_pages = select.page_table_ref(inp["r2t"], inp["rpi"], inp["seq"], PAGE)
    scores = select.quest_page_scores_ref(q, kmax, kmin, None, pt, n_pages)
    NP = pt.shape[1]
    j = torch.arange(NP, device=q.device)[None, None, :]
    key = torch.where((j == 0) | (j == (n_pages.long() - 1)[:, None, None]), float("inf"), scores)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(NP, device=q.device).expand_as(order).contiguous())
    return (rank < budget // PAGE) & (j < n_pages.long()[:, None, None])


def model_inputs(model_path: str, n_tokens: int, text_files):
    """A real model's keys in ``make_inputs``' layout: one forward of ``n_tokens`` tokens of the
    given text files through the (Llama-architecture) model, its post-RoPE keys of every layer
    as one "request" per layer (slots of layer l: l * n .. l * n + n - 1) and the post-RoPE query
    of the last token of each layer as that request's decode query."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.llama import modeling_llama

    tok = AutoTokenizer.from_pretrained(model_path)
    text = "\n\n".join(open(f, encoding="utf-8", errors="replace").read() for f in text_files)
    ids = tok(text, return_tensors="pt").input_ids[:, : n_tokens // PAGE * PAGE]
    n = ids.shape[1]
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    seen = []
    rope = modeling_llama.apply_rotary_pos_emb

    def record(q, k, *a, **kw):
        qe, ke = rope(q, k, *a, **kw)
        seen.append((qe[0, :, -1].clone(), ke[0].transpose(0, 1).clone()))  # [Hq, D], [n, H, D]
        return qe, ke

    modeling_llama.apply_rotary_pos_emb = record
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        modeling_llama.apply_rotary_pos_emb = rope
    L = len(seen)
    q = torch.stack([x[0] for x in seen]).to(torch.bfloat16)  # [L, Hq, D]
    k = torch.cat([x[1] for x in seen]).to(torch.bfloat16)  # [L * n, H, D]
    slots = torch.arange(L * n).view(L, n)
    return dict(q=q, k=k, slots=slots, r2t=slots.to(torch.int32),
                rpi=torch.arange(L, dtype=torch.int32),
                seq=torch.full((L,), n, dtype=torch.int32)), L, n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--budgets", default="1024,8192")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=None,
                    help="a Llama-architecture checkpoint: its keys instead of the synthetic "
                         "ones (CPU; one 'request' per layer, --context tokens of --text)")
    ap.add_argument("--text", default="README.md,docs/KERNELS.md,docs/SGLANG_SURFACE.md,"
                                      "docs/OPS.md,kernels/topp.py,kernels/select.py",
                    help="comma list of text files fed to --model")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.model:
        inp, R, ctx = model_inputs(args.model, args.context, args.text.split(","))
        H, D = inp["k"].shape[1:]
        G = inp["q"].shape[1] // H
    else:
        H, G, D = 8, 4, 128
        inp = make_inputs(args.batch, args.context, H, G, D, torch.bfloat16, args.device)
        R, ctx = args.batch, args.context
    q = inp["q"]
    # exact attention probabilities over every token, per (request, q head), fp32
    k = inp["k"][inp["slots"].reshape(-1).long()].view(R, ctx, H, D).float()
    qg = q.float().view(R, H, G, D)
    probs = torch.softmax(torch.einsum("rhgd,rthd->rhgt", qg, k) / math.sqrt(D), -1)
    page_mass = probs.view(R, H, G, ctx // PAGE, PAGE).sum(-1)  # [R, H, G, NP]
    # the exact bounds of every page (bf16 keys: what bf16 bounds would store)
    pages = torch.arange(inp["k"].shape[0] // PAGE, device=q.device)
    kmax, kmin = store.page_bounds_ref(inp["k"], pages, torch.full_like(pages, PAGE - 1), PAGE)
    e4_max, over_max = fp8_outward(kmax, up=True)
    e4_min, over_min = fp8_outward(kmin, up=False)
    i8_max, i8_min = int8_page(kmax, kmin)
    variants = {"bf16": (kmax, kmin), "fp8-e4m3": (e4_max, e4_min), "int8-page": (i8_max, i8_min)}
    for name, (hi, lo) in variants.items():  # every variant bounds bf16's from outside (up to
        tol = 1e-6 * torch.maximum(kmax.abs(), kmin.abs())  # one fp32 rounding)
        assert bool((hi >= kmax - tol).all() and (lo <= kmin + tol).all()), name
    rows = []
    for budget in map(int, args.budgets.split(",")):
        ref = None
        for name, (hi, lo) in variants.items():
            sel = selected_pages(q, hi, lo, inp, budget)  # [R, H, NP]
            mass = (page_mass * sel[:, :, None, :]).sum(-1).flatten()  # per (request, q head)
            if ref is None:
                ref = sel
            inter = (sel & ref).sum(-1).float()
            union = (sel | ref).sum(-1).float()
            rows.append(dict(
                variant=name, budget=budget, batch=R, context=ctx,
                mass_mean=round(float(mass.mean()), 5), mass_min=round(float(mass.min()), 5),
                mass_p05=round(float(mass.quantile(0.05)), 5),
                pages_jaccard_vs_bf16_mean=round(float((inter / union).mean()), 4),
                pages_jaccard_vs_bf16_min=round(float((inter / union).min()), 4),
                bound_bytes_per_page_head={"bf16": 4 * D, "fp8-e4m3": 2 * D,
                                           "int8-page": 2 * D + 4}[name]))
            print(json.dumps(rows[-1]), flush=True)
    res = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               model=args.model, text=args.text if args.model else None,
               keys=("post-RoPE keys of every layer of the model, one 'request' a layer"
                     if args.model else
                     "the key law of benchmarks/workload.py (make_inputs), Llama-3.1-8B shapes"),
               bounds_beyond_e4m3=over_max + over_min, rows=rows)
    if args.out:
        write_result(args.out, res)


if __name__ == "__main__":
    main()
