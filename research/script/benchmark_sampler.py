r"""Benchmarks our sampler against transformers' `generate` on the same weights.

Two workloads, both timing the two sides in one process:

- synthetic (default): one left-padded batch of random prompts, exactly
  --max_generation_steps tokens per row; prefill, decode and end-to-end
  throughput, compile time, peak memory (`gsm8k_jax/benchmarks/synthetic.py`).
- gsm8k: the GSM8K test set's prompts and answer lengths through continuous
  batching (ours) and static batches (transformers); wall time, tokens/s,
  achieved memory bandwidth against the device's peak, compile count
  (`gsm8k_jax/benchmarks/workload.py`).

    python research/script/benchmark_sampler.py                   # hf-tiny, CPU
    python research/script/benchmark_sampler.py --workload gsm8k  # gemma3-tiny
    python research/script/benchmark_sampler.py --workload gsm8k --config gemma3-1b \
        --dtype bfloat16 --answer_lengths reference --skip_reference   # GPU
    python research/script/benchmark_sampler.py --workload gsm8k --config gemma3-1b \
        --dtype bfloat16 --answer_lengths reference --skip_reference \
        --batch_size 1 --invariance_batch_size 64     # batch invariance on a device
"""

from __future__ import annotations

import json

from absl import app, flags

from gsm8k_jax.benchmarks.models import DTYPES
from gsm8k_jax.benchmarks.synthetic import (
    BenchmarkConfig,
    format_table,
    run_benchmark,
)
from gsm8k_jax.benchmarks.workload import (
    TRAINED_MODEL,
    WorkloadConfig,
    format_workload,
    run_workload,
)
from gsm8k_jax.kernel_choice import fix_gpu_kernels
from gsm8k_jax.models.gemma3.config import CONFIGS

_WORKLOAD = flags.DEFINE_enum(
    "workload", "synthetic", ["synthetic", "gsm8k"], "What to generate."
)
_CONFIG = flags.DEFINE_enum(
    "config",
    None,
    ["hf-tiny", TRAINED_MODEL, *CONFIGS],
    "Model: 'hf-tiny' (small random HF config), 'gemma3-tiny' (the shipped"
    " trained weights; gsm8k only) or a named Gemma 3 size (random weights)."
    " Default: hf-tiny (synthetic), gemma3-tiny (gsm8k).",
)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Rows (slots) per batch. Default: 8 (synthetic), 32 (gsm8k)."
)
_STEPS = flags.DEFINE_integer(
    "max_generation_steps",
    None,
    "Tokens per row (synthetic, default 128) or at most (gsm8k, default 768).",
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Activation/param dtype.")
_SKIP_REFERENCE = flags.DEFINE_bool(
    "skip_reference",
    False,
    "Only time ours; random-init our model directly (big configs).",
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of weights and prompts.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Where to write the results.")
# synthetic only
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 128, "Padded prompt width.")
_REPEATS = flags.DEFINE_integer(
    "repeats", 3, "Steady-state repeats (the best is used)."
)
_ROW_TILE = flags.DEFINE_integer(
    "row_tile",
    None,
    "Decode tile (slots per decode program); default: the platform's. Results"
    " are batch-invariant for one row tile, so a tile matched to a small batch"
    " computes no empty rows.",
)
# gsm8k only
_NUM_EXAMPLES = flags.DEFINE_integer(
    "num_examples", None, "First N test problems (default: all 1,319)."
)
_INVARIANCE_BATCH_SIZE = flags.DEFINE_integer(
    "invariance_batch_size",
    None,
    "gsm8k workload: also generate at this batch size and report the fraction"
    " of rows bitwise identical to the --batch_size run (tokens and logprob).",
)
_ROWS_REFERENCE = flags.DEFINE_string(
    "rows_reference_json",
    None,
    "gsm8k workload: the --output_json of the same workload run by another"
    " process (e.g. at another --batch_size); report the fraction of rows"
    " bitwise identical to its (each process compiles its own programs).",
)
_ANSWER_LENGTHS = flags.DEFINE_string(
    "answer_lengths",
    "model",
    "'model' (own eos; gemma3-tiny), 'reference' (gold solutions' token counts)"
    " or a rollouts .jsonl of an earlier evaluation (its num_tokens).",
)
_PEAK_BANDWIDTH = flags.DEFINE_float(
    "peak_bandwidth_gbps",
    None,
    "The device's peak memory bandwidth; default: spec sheet, or measured (CPU).",
)


def main(argv):
    del argv
    fix_gpu_kernels()  # As the eval scripts run: the same kernels every time.
    if _WORKLOAD.value == "gsm8k":
        if _ROW_TILE.value is not None:
            raise app.UsageError("--row_tile applies to --workload=synthetic.")
        cfg = WorkloadConfig(
            model=_CONFIG.value or TRAINED_MODEL,
            num_examples=_NUM_EXAMPLES.value,
            batch_size=_BATCH_SIZE.value or 32,
            max_generation_steps=_STEPS.value or 768,
            answer_lengths=_ANSWER_LENGTHS.value,
            dtype=_DTYPE.value,
            skip_reference=_SKIP_REFERENCE.value,
            peak_bandwidth_gbps=_PEAK_BANDWIDTH.value,
            seed=_SEED.value,
            invariance_batch_size=_INVARIANCE_BATCH_SIZE.value,
            rows_reference_json=_ROWS_REFERENCE.value,
        )
        result, table = run_workload(cfg), format_workload
    else:
        if _CONFIG.value == TRAINED_MODEL:
            raise app.UsageError(f"--config={TRAINED_MODEL} needs --workload=gsm8k.")
        cfg = BenchmarkConfig(
            model=_CONFIG.value or "hf-tiny",
            batch_size=_BATCH_SIZE.value or 8,
            prompt_len=_PROMPT_LEN.value,
            max_generation_steps=_STEPS.value or 128,
            dtype=_DTYPE.value,
            repeats=_REPEATS.value,
            skip_reference=_SKIP_REFERENCE.value,
            seed=_SEED.value,
            row_tile=_ROW_TILE.value,
        )
        result, table = run_benchmark(cfg), format_table
    print(table(result))
    if _OUTPUT_JSON.value:
        with open(_OUTPUT_JSON.value, "w") as f:
            json.dump(result, f, indent=2, default=float)
        print(f"Wrote {_OUTPUT_JSON.value}")


if __name__ == "__main__":
    app.run(main)
