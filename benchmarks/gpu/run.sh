#!/usr/bin/env bash
# One device call for the H100 machine: set up the GPU bundle, install this tree, run steps in order.
#
# CPU side, once per session (repo root; both folders are ignored through .git/info/exclude):
#   bash ../shared/gpu-bundle/build.sh .gpubundle
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl pytest pluggy iniconfig
# Device call (carry [".gpubundle", ".whl", ".abtrees"] as needed; logs and results under $OUT):
#   bash benchmarks/device/run.sh <commit> "<step>;<step>;..."
# Steps: ktests (GPU kernel + CUDA-graph tests), serve (serving tests through SGLang, dummy
# Llama-8B, about 7 minutes), full (the full benchmark), prof (profile_step.py at 32k), groups
# (row-group sweep at batch 16 and 8), ab:<tree>,<tree>,... (benchmarks/device/ab_trees.sh), or any
# shell command. <commit> is recorded in every results file (TWILIGHT_COMMIT).
#
# The device's `pip` belongs to another Python than `python3` (seen 2026-11): always
# `python3 -m pip`, or the servers started by the tests cannot import the package.
C=${1:?commit}; STEPS=${2:?steps}
T0=$(date +%s); ts(){ echo "[run +$(( $(date +%s)-T0 ))s] $*"; }
OUT="${OUT:-/tmp/device_out}"; mkdir -p "$OUT"
# shellcheck disable=SC1091
source .gpubundle/devenv.sh .gpubundle || exit 1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "pip install -e . failed"; exit 1; }
export TWILIGHT_COMMIT=$C
ts "$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader), commit $C"
IFS=";" read -ra ALL <<< "$STEPS"
for s in "${ALL[@]}"; do
  ts "step: $s"
  case $s in
    ktests) (time python3 -m pytest -q -m gpu -rA tests/test_kernels.py tests/test_cuda_graph.py) \
              > "$OUT/gpu_kernel_tests.txt" 2>&1
            grep -E "passed|failed|FAILED" "$OUT/gpu_kernel_tests.txt" | tail -5 ;;
    serve) rm -rf /tmp/llama8b-dummy; cp -r .gpubundle/llama8b-dummy /tmp/llama8b-dummy
           (time TWILIGHT_TEST_MODEL=/tmp/llama8b-dummy python3 -m pytest -v -m gpu -rA -k "not tp2" \
              tests/test_serving_gpu.py) > "$OUT/serving_tests.txt" 2>&1
           grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/serving_tests.txt" | tail -12 ;;
    full) python3 benchmarks/bench_attention.py --contexts 32768,16384,8192 \
            --out "$OUT/bench_attention_h100.json" 2>&1 | grep -E "^done|skip|wrote" ;;
    prof) python3 benchmarks/profile_step.py --batches 8,16,32,64 --out "$OUT/profile_step_h100.json" \
            2>&1 | grep -v Warn | tail -30 ;;
    groups) python3 benchmarks/tune_kernels.py --batches 16,8 --only groups \
              --out "$OUT/tune_groups_h100.json" 2>&1 | tail -20 ;;
    ab:*) bash benchmarks/device/ab_trees.sh run ${s#ab:} ;;
    *) eval "$s" ;;
  esac
done
ts done
