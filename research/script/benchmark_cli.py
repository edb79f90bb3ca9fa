r"""Times the evaluation as a user runs it: our eval script against a plain
transformers GSM8K loop, each a whole process, same model folder and prompts
(`gsm8k_jax/benchmarks/eval_cli.py`).

    python research/script/benchmark_cli.py                        # hf-small
    python research/script/benchmark_cli.py --config gemma3-270m --num_examples 32 \
        --max_generation_steps 48
"""

from __future__ import annotations

import json

from absl import app, flags

from gsm8k_jax.benchmarks.eval_cli import (
    CliBenchmarkConfig,
    format_cli_benchmark,
    run_cli_benchmark,
)
from gsm8k_jax.benchmarks.models import DTYPES
from gsm8k_jax.models.gemma3.config import CONFIGS

_CONFIG = flags.DEFINE_enum(
    "config", "hf-small", ["hf-small", *CONFIGS], "Random-weight model config."
)
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 64, "First N test problems.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Batch size of both sides.")
_STEPS = flags.DEFINE_integer("max_generation_steps", 64, "New tokens per answer.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Model dtype.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Where to write the results.")


def main(argv):
    del argv
    result = run_cli_benchmark(
        CliBenchmarkConfig(
            model=_CONFIG.value,
            num_examples=_NUM_EXAMPLES.value,
            batch_size=_BATCH_SIZE.value,
            max_generation_steps=_STEPS.value,
            dtype=_DTYPE.value,
        )
    )
    print(format_cli_benchmark(result))
    if _OUTPUT_JSON.value:
        with open(_OUTPUT_JSON.value, "w") as f:
            json.dump(result, f, indent=2)
        print(f"Wrote {_OUTPUT_JSON.value}")


if __name__ == "__main__":
    app.run(main)
