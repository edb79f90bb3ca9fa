#!/usr/bin/env bash
# The GPU checks of docs/PERFORMANCE.md in one run, for a lent device with a
# time limit: gemma3-1b shapes (random weights), bfloat16, GSM8K prompts and
# gold-solution answer lengths (up to 768 tokens).
#
#   1. batch invariance: 256 problems at batch 128 (one GPU row tile) and
#      256 (two), fraction of rows bitwise identical; then the same at 256
#      in a second process, which compiles its own programs, against the
#      first's rows (the benchmark turns XLA's GPU autotuner off, as the
#      eval scripts do: gsm8k_jax/kernel_choice.py; with
#      XLA_FLAGS=--xla_gpu_autotune_level=4 the step shows whether
#      autotuned kernels would differ between two runs);
#   2. the full test set (1,319 problems) at batch 256: wall time, warm-up
#      (compilation), phase shares, achieved bandwidth against the peak;
#   3. against transformers' `generate` on the same device: 256 problems at
#      batch 256.
#
# Each step writes <name>.json and <name>.log under $OUT (default
# results/device_check) and is stopped after $STEP_TIMEOUT_S seconds (default
# 180), so one slow step cannot use up the lease; the script exits 1 if any
# step failed or was stopped. Runs with the python3 on
# PATH (or $PYTHON) and the packages already there (jax with its CUDA plugin, flax,
# transformers, torch): no install, nothing fetched. The lent machines' image
# holds jax 0.11.2 (CUDA 13) and transformers 5.17, not our pins (jax 0.10.2);
# jax-cuda13-pjrt 0.10.2 (124 MB) is over the 64 MiB a call carries, so the
# checks run on the image's jax. They need neither qwix, ml-collections,
# gcsfs nor lm-eval (checked on CPU by blocking those imports). SCALE=smoke
# ran green on CPU under the image's versions (Python 3.12, jax 0.11.2, flax
# 0.12.12, transformers 5.17.0, torch 2.11.0, safetensors 0.8.0, numpy
# 2.5.2; docs/PERFORMANCE.md), so the image's jax runs this code.
#
#   bash research/device_check.sh                 # on the GPU machine
#   SCALE=smoke PYTHON=.venv/bin/python bash research/device_check.sh
#                                    # the same steps, tiny, on CPU
#   STEPS="full_test_set vs_transformers" bash research/device_check.sh
#                                    # only the steps named
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-results/device_check}"
STEP_TIMEOUT_S="${STEP_TIMEOUT_S:-180}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"

if [[ "${SCALE:-device}" == smoke ]]; then
  # Tiny shapes and counts: checks that every step runs, on any machine.
  MODEL=(--config hf-tiny --dtype float32 --max_generation_steps 32)
  FEW=8 TILE=4 ALL=16 BATCH=8
else
  MODEL=(--config gemma3-1b --dtype bfloat16 --max_generation_steps 768)
  FEW=256 TILE=128 ALL="" BATCH=256
fi
GSM8K=(--workload gsm8k "${MODEL[@]}" --answer_lengths reference)

step() {
  local name=$1
  shift
  if [[ -n "${STEPS:-}" && " $STEPS " != *" $name "* ]]; then
    return
  fi
  echo "== $name: benchmark_sampler.py $*"
  timeout -k 15 "$STEP_TIMEOUT_S" "$PYTHON" research/script/benchmark_sampler.py "$@" \
    --output_json "$OUT/$name.json" >"$OUT/$name.log" 2>&1
  local status=$?
  grep -v -E '^(W|I)[0-9]{4} ' "$OUT/$name.log" | tail -n 30
  echo "== $name: exit $status"
  ((status == 0)) || failed=1
}
failed=0

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader ||
  echo "no nvidia-smi"; } 2>/dev/null
"$PYTHON" -c "import jax, flax, transformers; print('jax', jax.__version__, 'flax',
flax.__version__, 'transformers', transformers.__version__, jax.devices())"

step invariance "${GSM8K[@]}" --skip_reference --num_examples "$FEW" \
  --batch_size "$TILE" --invariance_batch_size $((2 * TILE))
step invariance_other_process "${GSM8K[@]}" --skip_reference \
  --num_examples "$FEW" --batch_size $((2 * TILE)) \
  --rows_reference_json "$OUT/invariance.json"
step full_test_set "${GSM8K[@]}" --skip_reference --batch_size "$BATCH" \
  ${ALL:+--num_examples "$ALL"}
step vs_transformers "${GSM8K[@]}" --num_examples "$FEW" --batch_size "$BATCH"
exit "$failed"
