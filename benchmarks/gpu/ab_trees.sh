#!/usr/bin/env bash
# A/B of several builds in one device call: bench_attention.py at 32k on each tree in turn, same
# card, same inputs (the way every "same call" comparison in docs/KERNELS.md was made).
#
# CPU side: bash benchmarks/device/ab_trees.sh prepare <commit-or-dir>...
#   exports each commit (git archive) or copies each directory holding a variant tree into
#   .abtrees/<name>, only what the benchmark needs (add /.abtrees/ to .git/info/exclude).
# Device side (from benchmarks/device/run.sh "ab:<name>,<name>"), or directly:
#   bash benchmarks/device/ab_trees.sh run <name>,<name>...   -> $OUT/bench_<name>.json
# Knobs: AB_BATCHES (8,16,32,64), AB_CONTEXTS (32768), COMMIT_PREFIX (prepended to the name
# recorded as the commit).
set -o pipefail
PATHS="sglang_twilight kernels srt_patches pyproject.toml README.md benchmarks/bench_attention.py benchmarks/profile_step.py"
case "${1:?prepare|run}" in
  prepare)
    shift
    for t in "$@"; do
      name=$t; [ -d "$t" ] && name=$(basename "$t")
      rm -rf ".abtrees/$name"; mkdir -p ".abtrees/$name"
      # shellcheck disable=SC2086
      if [ -d "$t" ]; then (cd "$t" && tar -cf - $PATHS) | tar -x -C ".abtrees/$name"
      else git archive "$t" $PATHS | tar -x -C ".abtrees/$name"
      fi
      find ".abtrees/$name" -name __pycache__ -prune -exec rm -rf {} +
      echo "prepared .abtrees/$name"
    done ;;
  run)
    OUT="${OUT:-/tmp/device_out}"; mkdir -p "$OUT"
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
    done
    python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 ;;
esac
