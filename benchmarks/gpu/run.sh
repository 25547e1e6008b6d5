#!/usr/bin/env bash
# Run the GPU checks and benchmarks on a machine with an NVIDIA GPU, from the repository root:
#
#   bash benchmarks/gpu/run.sh <label> "<step>;<step>;..."
#
# <label> is recorded as the commit in every results file (TWILIGHT_COMMIT): give the short hash
# of the tree when the copy on the GPU machine has no git metadata. Logs and results go to $OUT
# (default /tmp/twilight_gpu_out); CARD names the card in the result files (default: from
# nvidia-smi, e.g. h100 or h200: machines lent as one kind may come with the other card).
#
# Steps, run in the order given:
#   ktests    GPU kernel and CUDA-graph tests (tests/test_kernels.py, tests/test_cuda_graph.py),
#             about 4 minutes on an H100                      -> $OUT/gpu_kernel_tests.txt
#   serve     serving tests through SGLang on a Llama-3.1-8B-shaped model with dummy weights
#             (TWILIGHT_TEST_MODEL: its config folder), about 7 minutes -> $OUT/serving_tests.txt
#   full      the attention benchmark at 32k, 16k, 8k, about 3 minutes
#                                                             -> $OUT/bench_attention_$CARD.json
#   prof      the per-kernel profile at 32k                   -> $OUT/profile_step_$CARD.json
#   groups    the row-group sweep at batch 16 and 8           -> $OUT/tune_groups_$CARD.json
#   ab:A,B    benchmarks/gpu/ab_trees.sh run A,B (trees prepared beforehand)
#   step8b    decode-step grid of the 8B shape, plain and shared-prefix cells, and the dispatch
#             fit (written into this tree's sglang_twilight/dispatch_profiles.json, later steps
#             of the same run use it), about 8 minutes
#                                  -> $OUT/decode_step_llama8b_$CARD.json, dispatch_profiles.json
#   tpot8b:M  the 8B-shape TPOT benchmark of method M (dense, twilight), one wave per cell,
#             shared-prefix cell included, about 6 minutes each; the second run of a machine
#             merges into the first's file                 -> $OUT/tpot_llama8b_$CARD.json
#   load8b    the load test on the 8B shape                -> $OUT/load_test_llama8b_$CARD.json
#   stepsmol  SmolLM2 decode-step grid and its dispatch fit (SMOLLM2: its HF folder, default
#             /tmp/smollm2-hf)  -> $OUT/decode_step_smollm2_$CARD.json, dispatch_profiles.json
#   tpotsmol  the SmolLM2 TPOT benchmark                    -> $OUT/tpot_smollm2_$CARD.json
#   accsmol   the SmolLM2 accuracy evaluation, default p values, about 8 minutes
#                                                           -> $OUT/accuracy_smollm2_*.json/png
#   loadsmol  the load test on SmolLM2                     -> $OUT/load_test_smollm2_$CARD.json
#   anything else is run as a shell command.
# A machine whose calls are limited to 10 minutes runs one of the long steps per call.
#
# Environment: the tree is installed with `python3 -m pip install -e .` (on some images `pip`
# belongs to another Python than `python3`, and the servers the tests start then cannot import
# the package). A machine without network access can carry an offline copy of the pinned
# environment: when .gpubundle/devenv.sh exists it is sourced first, and wheels in .whl/ (e.g.
# pytest) are installed into /tmp/site.
C=${1:?label (the commit measured)}; STEPS=${2:?steps}
T0=$(date +%s); ts(){ echo "[run +$(( $(date +%s)-T0 ))s] $*"; }
OUT="${OUT:-/tmp/twilight_gpu_out}"; mkdir -p "$OUT"
CARD="${CARD:-$(python3 -c 'from benchmarks.common import card_slug, smi_card_name as n
print(card_slug(n()))')}"
if [ -f .gpubundle/devenv.sh ]; then
  # shellcheck disable=SC1091
  source .gpubundle/devenv.sh .gpubundle || exit 1
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "pip install -e . failed"; exit 1; }
export TWILIGHT_COMMIT=$C
SMOLLM2="${SMOLLM2:-/tmp/smollm2-hf}"
model8b() {  # the Llama-3.1-8B-shaped config folder (dummy weights) at /tmp/llama8b-dummy
  [ -d /tmp/llama8b-dummy ] \
    || cp -r "${TWILIGHT_TEST_MODEL:-.gpubundle/llama8b-dummy}" /tmp/llama8b-dummy
}
ts "$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader), commit $C"
IFS=";" read -ra ALL <<< "$STEPS"
for s in "${ALL[@]}"; do
  ts "step: $s"
  case $s in
    ktests) (time python3 -m pytest -q -m gpu -rA tests/test_kernels.py tests/test_cuda_graph.py) \
              > "$OUT/gpu_kernel_tests.txt" 2>&1
            grep -E "passed|failed|FAILED" "$OUT/gpu_kernel_tests.txt" | tail -5 ;;
    serve) model8b
           (time TWILIGHT_TEST_MODEL=/tmp/llama8b-dummy python3 -m pytest -v -m gpu -rA -k "not tp2" \
              tests/test_serving_gpu.py) > "$OUT/serving_tests.txt" 2>&1
           grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/serving_tests.txt" | tail -12 ;;
    full) python3 benchmarks/bench_attention.py --contexts 32768,16384,8192 \
            --out "$OUT/bench_attention_$CARD.json" 2>&1 | grep -E "^done|skip|wrote" ;;
    prof) python3 benchmarks/profile_step.py --batches 8,16,32,64 --out "$OUT/profile_step_$CARD.json" \
            2>&1 | grep -v Warn | tail -30 ;;
    groups) python3 benchmarks/tune_kernels.py --batches 16,8 --only groups \
              --out "$OUT/tune_groups_$CARD.json" 2>&1 | tail -20 ;;
    ab:*) bash benchmarks/gpu/ab_trees.sh run "${s#ab:}" ;;
    step8b) model8b
            python3 benchmarks/bench_decode_step.py --model-path /tmp/llama8b-dummy \
              --load-format dummy --cells 28672:12,8,4,2,1 16384:12,8,4,2,1 8192:24,16,8,4,1 \
              4096:32,16,8,1 2048:64,32,16,8,4,2,1 --shared-cells 16384:12,8,4,2 28672:12,4 \
              --twilight-max-budget 512 --mem-fraction-static 0.85 --fit \
              --profile 28672x12,2048x1 --steps 16 --warmup 3 \
              --out "$OUT/decode_step_llama8b_$CARD.json" 2>&1 | grep -E "^\[|fitted|wrote|  "
            cp sglang_twilight/dispatch_profiles.json "$OUT/" ;;
    tpot8b:*) model8b
              python3 benchmarks/bench_tpot.py --model llama8b --model-path /tmp/llama8b-dummy \
                --methods "${s#tpot8b:}" --merge --waves 1 --min-prompts 2 \
                --mem-fraction-static 0.88 --shared-prefix \
                --out "$OUT/tpot_llama8b_$CARD.json" 2>&1 | tail -30 ;;
    load8b) model8b
            python3 benchmarks/load_test.py --model llama8b-dummy \
              --out "$OUT/load_test_llama8b_$CARD.json" 2>&1 | tail -30 ;;
    stepsmol) python3 benchmarks/bench_decode_step.py --model-path "$SMOLLM2" \
                --cells 7680:128,64,16,4,1 4096:128,64,16,1 2048:128,64,16,4,1 \
                --shared-cells 7680:64,16 --fit --profile 7680x64 \
                --out "$OUT/decode_step_smollm2_$CARD.json" 2>&1 | grep -E "^\[|fitted|wrote|  "
              cp sglang_twilight/dispatch_profiles.json "$OUT/" ;;
    tpotsmol) python3 benchmarks/bench_tpot.py --model smollm2 --model-path "$SMOLLM2" \
                --shared-prefix --out "$OUT/tpot_smollm2_$CARD.json" 2>&1 | tail -30 ;;
    accsmol) python3 benchmarks/eval_accuracy.py --model-path "$SMOLLM2" --out-dir "$OUT" \
               2>&1 | tail -30 ;;
    loadsmol) python3 benchmarks/load_test.py --model smollm2 --model-path "$SMOLLM2" \
                --out "$OUT/load_test_smollm2_$CARD.json" 2>&1 | tail -30 ;;
    *) eval "$s" ;;
  esac
done
ts done
