"""Nsight Compute's view of one Twilight decode step: per kernel, its duration, DRAM and L2
traffic and throughput, achieved occupancy and what its warps stall on.

The step of ``bench_attention.py`` (Llama-3.1-8B layer shapes, its key law, Quest B0 = 8192 ->
top-p 0.95) runs in one row group, eagerly, a few times to compile and warm up; then one step
runs between ``cudaProfilerStart`` and ``cudaProfilerStop`` under ``ncu`` (this script starts
it on itself with ``--child``), which replays each kernel to collect its sections. The CSV it
prints is turned into one JSON row per kernel: the sections' metrics by their display names,
and the warp stall reasons (cycles a warp spends stalled on each, per issued instruction).
``--source REGEX``: a second pass over the kernels whose names match, with ncu's source
counters (warp stall samples and instructions executed per SASS instruction, or per line of
the kernel's source with ``--print-source cuda``); per kernel the JSON keeps the ``--top`` rows
with the most stall samples and the samples' share by SASS opcode (ncu's raw page when it
cannot be parsed). Needs ``ncu`` on the PATH (or ``--ncu``).

Usage: python benchmarks/ncu_step.py --batch 8 --context 32768 --out ncu_step.json
       python benchmarks/ncu_step.py --batch 8 --source "_estimate_kernel|_topp_head_kernel"
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import PAGE, make_inputs, source_commit  # noqa: E402

from sglang_twilight import ops  # noqa: E402

SECTIONS = ["SpeedOfLight", "MemoryWorkloadAnalysis", "Occupancy", "LaunchStats",
            "WarpStateStats", "SchedulerStats"]


def child(bs, ctx, top_p, budget, H=8, G=4, D=128):
    inp = make_inputs(bs, ctx, H, G, D, torch.bfloat16, "cuda")
    ops.DECODE_GROUPS = dict(min_requests=1, groups=1, keep_all_groups=1)  # no overlap
    ws = ops.DecodeWorkspace.allocate(bs, H, G, D, budget, PAGE, ctx, "cuda")
    pr = torch.full((bs,), top_p, dtype=torch.float32, device="cuda")
    out = torch.empty_like(inp["q"])
    sc = (inp["kq"], inp["ks"], inp["kz"], inp["kmax"], inp["kmin"], inp["kbs"])

    def step():
        ops.twilight_decode(inp["q"], inp["k"], inp["v"], *sc, inp["r2t"], inp["rpi"], inp["seq"],
                            pr, budget=budget, page_size=PAGE, sm_scale=1 / math.sqrt(D),
                            min_budget=1, max_budget=0, backend="triton", workspace=ws, out=out)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def _number(v):
    """A CSV cell as a float where it is one ("1,234.5" too), else as it is."""
    try:
        return float(v.replace(",", ""))
    except ValueError:
        return v


def parse(text):
    """ncu's CSV (details page, one line per kernel x metric) -> one dict per kernel launch."""
    start = text.find('"ID"')
    if start < 0:
        raise SystemExit("ncu_step: no CSV in ncu's output:\n" + text[-3000:])
    kernels = {}
    for row in csv.DictReader(io.StringIO(text[start:])):
        k = kernels.setdefault(row["ID"], dict(kernel=row["Kernel Name"].split("(")[0],
                                               grid=row["Grid Size"], block=row["Block Size"],
                                               metrics={}, stalls={}))
        name, unit, value = row["Metric Name"], row["Metric Unit"], _number(row["Metric Value"])
        if name.startswith("smsp__average_warps_issue_stalled_"):
            reason = name[len("smsp__average_warps_issue_stalled_"):].split("_per_issue")[0]
            k["stalls"][reason] = value
        else:
            k["metrics"][f"{row['Section Name']}: {name}" + (f" [{unit}]" if unit else "")] = value
    for k in kernels.values():  # the largest stall reasons first
        k["stalls"] = dict(sorted(k["stalls"].items(), key=lambda kv: -(kv[1] or 0)))
    return list(kernels.values())


def parse_source(text, top):
    """ncu's source page (``--page source --csv``), one table per kernel -> {kernel: {the warp
    stall samples in all, their share by SASS opcode (the ``top`` largest), and the ``top`` rows
    with the most samples, each {column: value}}}."""
    out, kernel, header, rows = {}, None, None, None
    for line in text.splitlines():
        if line.startswith("Kernel Name:") or line.startswith('"Kernel Name"'):
            kernel = re.findall(r"\w+", line.split(",", 1)[-1].split(":", 1)[-1])[0]
            header = None
            continue
        if line.startswith('"#"') or (line.startswith('"') and "Source" in line
                                      and "Warp Stall Sampling" in line):
            header = next(csv.reader([line]))
            rows = out.setdefault(kernel or f"kernel{len(out)}", [])
            continue
        if header and line.startswith('"'):
            vals = next(csv.reader([line]))
            if len(vals) == len(header):
                rows.append({k: _number(v) for k, v in zip(header, vals)})

    def samples(r):
        v = r.get("Warp Stall Sampling (All Samples)")
        return v if isinstance(v, float) else 0.0

    def opcode(r):  # SASS: the mnemonic's first part after any predicate ("@!P0  LDS R1, ..")
        words = str(r.get("Source", "")).split()
        words = words[1:] if words and words[0].startswith("@") else words
        return words[0].split(".")[0] if words else "?"

    res = {}
    for k, rows in out.items():
        total = sum(samples(r) for r in rows) or 1.0
        by_op = {}
        for r in rows:
            by_op[opcode(r)] = by_op.get(opcode(r), 0.0) + samples(r)
        res[k] = dict(samples=total,
                      share_by_opcode={o: round(v / total, 4) for o, v in
                                       sorted(by_op.items(), key=lambda kv: -kv[1])[:top]},
                      top=sorted(rows, key=lambda r: -samples(r))[:top])
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--budget", type=int, default=8192)
    ap.add_argument("--ncu", default=shutil.which("ncu") or "/usr/local/cuda/bin/ncu")
    ap.add_argument("--source", default=None, help="regex of kernel names for the source view")
    ap.add_argument("--print-source", default="sass", help="ncu's --print-source for --source")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.child:
        child(args.batch, args.context, args.top_p, args.budget)
        return
    stalls = "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio$"
    cmd = [args.ncu, "--profile-from-start", "off", "--csv", "--page", "details",
           "--print-units", "base", *sum((["--section", s] for s in SECTIONS), []),
           "--metrics", stalls, sys.executable, os.path.abspath(__file__), "--child",
           "--batch", str(args.batch), "--context", str(args.context),
           "--top-p", str(args.top_p), "--budget", str(args.budget)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"ncu_step: ncu failed ({run.returncode}):\n{run.stdout[-3000:]}\n"
                         f"{run.stderr[-3000:]}")
    rows = parse(run.stdout)
    source = None
    if args.source:
        cmd_src = [args.ncu, "--profile-from-start", "off", "--section", "SourceCounters",
                   "--import-source", "yes", "--kernel-name", f"regex:{args.source}",
                   "--page", "source", "--csv", "--print-source", args.print_source, *cmd[cmd.index(
                       sys.executable):]]
        run = subprocess.run(cmd_src, capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"ncu_step: ncu (source) failed ({run.returncode}):\n"
                             f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        source = parse_source(run.stdout, args.top)
        if not any(v["top"] for v in source.values()):
            source = dict(unparsed=run.stdout[:200000])
    version = subprocess.run([args.ncu, "--version"], capture_output=True, text=True).stdout
    out = dict(card=torch.cuda.get_device_name(),
               versions=dict(torch=torch.__version__, ncu=version.strip().splitlines()[-1]),
               commit=source_commit(), command="python " + " ".join(sys.argv),
               setup=dict(batch=args.batch, context=args.context, top_p=args.top_p,
                          budget=args.budget, groups=1), rows=rows)
    if source is not None:
        out["source"] = source
    for r in rows:
        m = r["metrics"]
        pick = {k.split(": ", 1)[1]: v for k, v in m.items()
                if any(s in k for s in ("Duration", "DRAM Throughput", "Achieved Occupancy",
                                        "Registers Per Thread"))}
        top = list(r["stalls"].items())[:3]
        print(f"{r['kernel'][:28]:28s} grid {r['grid']:>14s} {pick} stalls {top}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
