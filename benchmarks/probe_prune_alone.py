"""Where a prune stage that does not return stops, and on which heads; or a sweep showing that
none stops.

A driver (the default) runs children, each a fresh process with a time limit:
1. the benchmark's inputs (``--seeds``, each ``--contexts`` entry) at one batch, the candidates
   chosen, then the prune of every request in one call (as ``bench_attention.py`` times it
   alone), once per ``--variants`` entry (``default``; ``after_step``: the grouped decode step
   runs first on the same workspace, as in the benchmark; ``est_narrow``: the estimate's narrow
   launch shape; ``topp_narrow``: the top-p kernel's narrow shape; ``raise0``: no optimistic 4x
   floor); with ``--check`` each child also compares its kept sets with the torch reference.
   Each kernel launch blocks (CUDA_LAUNCH_BLOCKING=1, set before torch loads) and a child that
   does not finish dumps its Python stack, so the stack names the kernel;
2. for the first case that hangs after the estimate, the top-p, overflow and union kernels run
   again on halves of the requests (the estimate of all of them first, so the scores and
   partials are the same bits), halving the one that hangs down to one request, whose scores,
   partials, counts and p are saved (``--dump``) for a replay in the CPU interpreter.

Usage (GPU): python benchmarks/probe_prune_alone.py --batch 64 --context 8192 --out-dir $OUT
found the 8k x 64 hang (request 37 of the benchmark's inputs; docs/KERNELS.md);
``--contexts 8192,16384,32768 --seeds 1,2,3 --variants default --check`` sweeps for others.
"""

from __future__ import annotations

import argparse
import faulthandler
import math
import os
import subprocess
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

COMPILE_S = 300  # a child's limit until the prune starts (inputs, Triton compiles)
VARIANTS = ("default", "after_step", "est_narrow", "topp_narrow", "raise0")


def _apply_variant(name: str):
    if name == "est_narrow":
        _topp.ESTIMATE_WIDE_ROWS = 1 << 30
    elif name == "topp_narrow":
        _topp.TOPP_WIDE_HEADS = 1 << 30
    elif name == "raise0":
        _topp.TOPP_CONFIG_WIDE = dict(_topp.TOPP_CONFIG_WIDE, RAISE=0)
    elif name not in VARIANTS:
        raise ValueError(f"--variant must be one of {VARIANTS}, got {name!r}")


def child(args):
    """One prune in this process: all requests, or the prune's last three kernels on requests
    [a, b) of the estimate of all (``--requests a:b``)."""
    faulthandler.dump_traceback_later(COMPILE_S, exit=True)  # re-armed before the prune
    _apply_variant(args.variant)
    bs, ctx, H, G, D = args.batch, args.context, 8, 4, 128
    dev = args.device
    t0 = time.time()
    log = lambda msg: print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)
    inp = make_inputs(bs, ctx, H, G, D, torch.bfloat16, dev, seed=args.seed)
    ws = ops.DecodeWorkspace.allocate(bs, H, G, D, args.budget, PAGE, ctx, dev)
    rows = bs * H
    n = bs * H * G
    log(f"variant {args.variant}: estimate shape {_topp._estimate_config(rows)}, top-p shape "
        f"{_topp._topp_launch(next_pow2(ws.capacity), n)}")
    sm = 1 / math.sqrt(D)
    pr = torch.full((bs,), args.top_p, dtype=torch.float32, device=dev)
    if args.variant == "after_step":
        sc = (inp["kq"], inp["ks"], inp["kz"], inp["kmax"], inp["kmin"], inp["kbs"])
        ops.twilight_decode(inp["q"], inp["k"], inp["v"], *sc, inp["r2t"], inp["rpi"], inp["seq"],
                            pr, budget=args.budget, page_size=PAGE, sm_scale=sm, min_budget=1,
                            max_budget=0, backend="triton", workspace=ws)
        if dev == "cuda":
            torch.cuda.synchronize()
        log("grouped step done")
    cand, cnt = _quest.quest_select_pages_triton(
        inp["q"], inp["kmax"], inp["kmin"], inp["kbs"], inp["r2t"], inp["rpi"], inp["seq"],
        ws.capacity, PAGE, max_pages=ws.max_pages, scores=ws.page_scores[:bs],
        cand_pages=ws.cand_pages[:bs], cand_counts=ws.cand_counts[:bs])
    log(f"select done, mean candidates {cnt.float().mean().item():.0f}")
    parts = ws.score_parts[:bs]
    scores = _topp.int4_scores_triton(inp["q"], inp["kq"], inp["ks"], inp["kz"], cand, cnt, sm,
                                      out=ws.scores[:bs], page_size=PAGE, parts=parts)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    sync()
    log("estimate done")
    a, b = (int(x) for x in args.requests.split(":")) if args.requests else (0, bs)
    if args.dump:
        torch.save(dict(scores=scores[a:b].cpu(), parts=parts[a:b].cpu(), counts=cnt[a:b].cpu(),
                        cand=cand[a:b].cpu(), p=pr[a:b].cpu(), span=_topp.estimate_span(rows),
                        step_heads=n, batch=bs, context=ctx, requests=(a, b)), args.dump)
        log(f"requests {a}:{b} saved to {args.dump}")
    m = (b - a) * H * G

    def prune(lo_r, hi_r, p):  # top-p, overflow and union on requests [lo_r, hi_r)
        k = (hi_r - lo_r) * H * G
        return _topp.prune_from_scores_triton(
            scores[lo_r:hi_r], cand[lo_r:hi_r], cnt[lo_r:hi_r], p, 1, 0,
            kept_slots=ws.kept_slots[lo_r:hi_r], kept_counts=ws.kept_counts[lo_r:hi_r],
            lo=ws.head_lo[:k], tot=ws.head_tot[:k], page_size=PAGE, scratch=ws.topp_scratch,
            mx=ws.head_max[:k], marks=ws.union_marks[lo_r:hi_r], step_heads=n,
            parts=parts[lo_r:hi_r], parts_span=_topp.estimate_span(rows))

    # the prune's kernels compiled first, on one request with p = 1 (the top-p kernel only
    # stores, the union keeps every candidate): the time limit below is the prune's own
    prune(a, a + 1, torch.ones_like(pr[a:a + 1]))
    sync()
    faulthandler.dump_traceback_later(args.timeout, exit=True)
    log(f"requests {a}:{b}: prune launched")
    kept, kcnt = prune(a, b, pr[a:b])
    sync()
    lo = ws.head_lo[:m]
    log(f"requests {a}:{b}: top-p, overflow and union done: mean kept "
        f"{kcnt.float().mean().item():.1f}, heads flagged to the overflow kernel "
        f"{int((lo < 0).sum())}")
    faulthandler.cancel_dump_traceback_later()
    if args.check:  # the kept sets against the torch reference on the same scores
        slots = (cand[a:b].long()[..., None] * PAGE + torch.arange(PAGE, device=dev)).flatten(2)
        live = torch.arange(scores.shape[-1], device=dev) < cnt[a:b].long()[..., None, None]
        rk, rn = _topp.prune_from_scores_ref(torch.where(live, scores[a:b], float("-inf")), slots,
                                             cnt[a:b], pr[a:b], 1, 0)
        n_rows, d_rows, d_max = _topp.kept_set_differences(kept, kcnt, rk, rn)
        log(f"check: {d_rows} of {n_rows} (request, KV head) rows differ from the reference, "
            f"at most {d_max} entries")


def run_child(args, extra, log):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--batch", str(args.batch),
           "--context", str(args.context), "--device", args.device, "--budget",
           str(args.budget), "--top-p", str(args.top_p), "--timeout", str(args.timeout)] + extra
    log("$ " + " ".join(cmd[2:]))
    # output to a file, polled: a child whose stack was dumped but that does not exit (a kernel
    # still running on the device) is killed 15 s later
    t0 = time.time()
    with open(os.path.join(args.out_dir, ".child.log"), "w+") as fo:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=subprocess.STDOUT, text=True)
        dumped = None
        while proc.poll() is None:
            time.sleep(1)
            fo.seek(0)
            if dumped is None and "Timeout (" in fo.read():
                dumped = time.time()
            if (dumped and time.time() - dumped > 15) or time.time() - t0 > COMPILE_S + 30:
                proc.kill()
                proc.wait()
        rc = proc.returncode
        fo.seek(0)
        out = fo.read()
    lines = [ln for ln in out.splitlines() if "Warn" not in ln]
    for ln in lines[-25:]:
        log("    " + ln)
    done = rc == 0 and any("union done" in ln for ln in lines)
    after_estimate = any("estimate done" in ln for ln in lines)
    log(f"  -> {'finished' if done else 'DID NOT FINISH'} (rc {rc})")
    return done, after_estimate


def driver(args):
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"probe_prune_b{args.batch}.txt")
    check = ["--check"] if args.check else []
    f = open(path, "w")

    def log(msg):
        print(msg, flush=True)
        f.write(msg + "\n")
        f.flush()

    card = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    contexts = [int(c) for c in (args.contexts or str(args.context)).split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    log(f"{card}, batch {args.batch} x contexts {contexts}, seeds {seeds}, "
        f"commit {os.environ.get('TWILIGHT_COMMIT', '?')}")
    results = {}
    t_end = time.time() + args.time_budget
    for ctx in contexts:
        for seed in seeds:
            for v in args.variants.split(","):
                key = (ctx, seed, v)
                if time.time() > t_end:
                    log(f"time budget spent: {key} not run")
                    continue
                case = ["--context", str(ctx), "--seed", str(seed)]
                results[key] = run_child(args, case + ["--variant", v] + check, log)
    hung = [k for k, (done, after_est) in results.items() if not done and after_est]
    if hung:  # bisect on requests: the estimate of all, then a slice pruned
        ctx, seed, v = hung[0]
        var = ["--context", str(ctx), "--seed", str(seed), "--variant", v]
        lo, hi = 0, args.batch
        while hi - lo > 1 and time.time() < t_end:
            mid = (lo + hi) // 2
            first, _ = run_child(args, var + ["--requests", f"{lo}:{mid}"], log)
            if not first:
                hi = mid
                continue
            second, _ = run_child(args, var + ["--requests", f"{mid}:{hi}"], log)
            if second:
                log(f"requests {lo}:{mid} and {mid}:{hi} finish alone, {lo}:{hi} does not")
                break
            lo = mid
        log(f"bisection ({hung[0]}) left requests {lo}:{hi}")
        if hi - lo == 1 and time.time() < t_end:
            dump = os.path.join(args.out_dir, f"hang_case_{ctx // 1024}k{args.batch}.pt")
            run_child(args, var + ["--requests", f"{lo}:{hi}", "--dump", dump], log)
    log("summary: " + ", ".join(f"{c} seed {sd} {v} {'ok' if d else 'HANG'}"
                                for (c, sd, v), (d, _) in results.items()))
    f.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--budget", type=int, default=8192)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--timeout", type=int, default=20,
                    help="seconds a child's prune may take (after its compiles)")
    ap.add_argument("--time-budget", type=int, default=480,
                    help="seconds after which the driver starts no more children")
    ap.add_argument("--contexts", default="", help="several contexts in turn (default: --context)")
    ap.add_argument("--seeds", default="0", help="the benchmark inputs' seeds, in turn")
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out-dir", default=".")
    ap.add_argument("--device", default="cuda",
                    help="cpu: the Triton interpreter (TRITON_INTERPRET=1)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--requests", default="", help=argparse.SUPPRESS)
    ap.add_argument("--dump", default="", help=argparse.SUPPRESS)
    ap.add_argument("--check", action="store_true",
                    help="compare each child's kept sets with the torch reference")
    args = ap.parse_args()
    if args.child:
        child(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
