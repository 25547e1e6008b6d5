#!/usr/bin/env bash
# A/B of several trees on one GPU, one after the other in the same session: bench_attention.py
# on each tree in turn, same card, same inputs. Differences between builds are only trusted when
# measured this way (the grouped step's time moves by a few microseconds between processes).
#
# 1. On any machine with the git history, from the repository root:
#      bash benchmarks/gpu/ab_trees.sh prepare <commit-or-dir>...
#    exports each commit (git archive) or copies each directory into .abtrees/<name>, only what
#    the benchmark needs (add /.abtrees/ to .git/info/exclude).
# 2. On the GPU machine, from the repository root (or through benchmarks/gpu/run.sh "ab:A,B"):
#      bash benchmarks/gpu/ab_trees.sh run <name>,<name>...
#    installs each tree in turn (python3 -m pip install -e), runs the benchmark into
#    $OUT/bench_<name>.json (default /tmp/twilight_gpu_out) and prints each stage's times, and
#    saves the kept sets of the decode step's select + prune on the benchmark's inputs (batch 8
#    and 64 at 8k and 32k, p = 0.95) to $OUT/kept_<name>.pt; the current tree is installed again
#    at the end.
# 3. bash benchmarks/gpu/ab_trees.sh compare <name> <name>
#    prints, per case, how many (request, KV head) rows keep different sets in the two trees,
#    and the two benchmark runs' times side by side (each method, and Twilight's stages).
# Settings (environment): AB_BATCHES (8,16,32,64), AB_CONTEXTS (32768), COMMIT_PREFIX (put in
# front of the name recorded as the commit).
set -o pipefail
# what the benchmark needs of a tree; a path the commit lacks is skipped (older trees had fewer
# benchmark modules)
PATHS="sglang_twilight kernels srt_patches pyproject.toml README.md benchmarks/__init__.py
benchmarks/common.py benchmarks/workload.py benchmarks/bench_attention.py benchmarks/profile_step.py"
case "${1:?prepare|run|compare}" in
  prepare)
    shift
    for t in "$@"; do
      name=$t; [ -d "$t" ] && name=$(basename "$t")
      rm -rf ".abtrees/$name"; mkdir -p ".abtrees/$name"
      have=""
      for p in $PATHS; do
        if [ -d "$t" ]; then [ -e "$t/$p" ] && have="$have $p"
        else git cat-file -e "$t:$p" 2>/dev/null && have="$have $p"
        fi
      done
      # shellcheck disable=SC2086
      if [ -d "$t" ]; then (cd "$t" && tar -cf - $have) | tar -x -C ".abtrees/$name"
      else git archive "$t" $have | tar -x -C ".abtrees/$name"
      fi
      find ".abtrees/$name" -name __pycache__ -prune -exec rm -rf {} +
      echo "prepared .abtrees/$name:$have"
    done ;;
  run)
    OUT="${OUT:-/tmp/twilight_gpu_out}"; mkdir -p "$OUT"
    IFS="," read -ra TREES <<< "${2:?trees}"
    for t in "${TREES[@]}"; do
      python3 -m pip install -q --no-deps --no-build-isolation -e ".abtrees/$t" >/dev/null 2>&1 \
        || { echo "install .abtrees/$t failed"; continue; }
      (cd ".abtrees/$t" && TWILIGHT_COMMIT="${COMMIT_PREFIX:-}$t" python3 benchmarks/bench_attention.py \
        --contexts "${AB_CONTEXTS:-32768}" --batches "${AB_BATCHES:-8,16,32,64}" --out "$OUT/bench_$t.json" \
        2>&1 | grep -E '^done|skip')
      python3 - "$OUT/bench_$t.json" "$t" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for s in d["stages"]:
    print(sys.argv[2], s["batch"], s["context"], "select %.2f prune %.2f estimate %.2f attend %.2f us, "
          "%.1f%% of the bound" % (s["select"] * 1e3, s["prune"] * 1e3, s["prune.estimate"] * 1e3,
                                   s["attend"] * 1e3, 100 * s["select+prune.fraction_of_bound"]))
PY
      (cd ".abtrees/$t" && python3 - "$OUT/kept_$t.pt" <<'PY'
# kept sets of select + prune (page lists, as in the decode step) on the benchmark's inputs
import math, os, sys
import torch
sys.path.insert(0, "benchmarks")
from bench_attention import make_inputs  # every tree's bench_attention provides it
try:
    from sglang_twilight.kernels import prune as P, select as Q
except ImportError:  # trees from before the stage modules
    from sglang_twilight.kernels import quest as Q, topp as P
out = {}
for ctx in (8192, 32768):
    for bs in (8, 64):
        inp = make_inputs(bs, ctx, 8, 4, 128, torch.bfloat16, "cuda")
        pages, cnt = Q.quest_select_pages_triton(inp["q"], inp["kmax"], inp["kmin"], inp["kbs"],
                                                 inp["r2t"], inp["rpi"], inp["seq"], 8192, 16,
                                                 max_pages=ctx // 16)
        p = torch.full((bs,), 0.95, device="cuda")
        kept, kcnt = P.twilight_prune_triton(inp["q"], inp["kq"], inp["ks"], inp["kz"], pages,
                                             cnt, p, 1 / math.sqrt(128), 1, 0, page_size=16)
        out[(ctx, bs)] = (pages.cpu(), cnt.cpu(), kept.cpu(), kcnt.cpu())
        del inp
        torch.cuda.empty_cache()
torch.save(out, sys.argv[1])
print("kept sets saved:", sys.argv[1])
PY
      )
    done
    python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 ;;
  compare)
    OUT="${OUT:-/tmp/twilight_gpu_out}"
    python3 - "$OUT/kept_${2:?tree}.pt" "$OUT/kept_${3:?tree}.pt" <<'PY'
import sys
import torch
a, b = torch.load(sys.argv[1]), torch.load(sys.argv[2])
for case in sorted(a):
    pa, ca, ka, na = a[case]
    pb, cb, kb, nb = b[case]
    idx = torch.arange(ka.shape[-1])
    big = torch.iinfo(torch.int64).max
    rows = lambda k, n: torch.where(idx < n.long()[..., None], k.long(), big).sort(-1).values
    differ = (rows(ka, na) != rows(kb, nb)).any(-1)
    print(f"context {case[0]} batch {case[1]}: candidates equal {torch.equal(pa, pb) and torch.equal(ca, cb)}, "
          f"kept counts equal {torch.equal(na, nb)}, rows with other kept sets "
          f"{int(differ.sum())} of {differ.numel()}")
PY
    python3 - "$OUT/bench_$2.json" "$OUT/bench_$3.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
print("ms, first tree / second tree:")
ra = {(r["context"], r["batch"], r["method"]): r["ms"] for r in a["rows"]}
for r in b["rows"]:
    k = (r["context"], r["batch"], r["method"])
    if k in ra:
        print(f"  {k[0]:6d} x {k[1]:3d} {k[2]:11s} {ra[k]:.4f} / {r['ms']:.4f} ({r['ms'] / ra[k] - 1:+.1%})")
sa = {(s["context"], s["batch"]): s for s in a["stages"]}
for s in b["stages"]:
    o = sa.get((s["context"], s["batch"]))
    if o:
        print(f"  {s['context']:6d} x {s['batch']:3d} stages us: " + ", ".join(
            f"{n} {o[n] * 1e3:.1f} / {s[n] * 1e3:.1f}" for n in ("store", "select", "prune", "prune.estimate", "attend")))
PY
    ;;
esac
