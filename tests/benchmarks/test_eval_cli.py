"""The eval-CLI benchmark: both sides run as whole processes on one folder,
write the same responses in float32, and the second run of ours finds its
programs in the persistent compilation cache."""

import json

from hf_models import tiny_hf_kwargs

from gsm8k_jax.benchmarks.eval_cli import (
    CliBenchmarkConfig,
    format_cli_benchmark,
    run_cli_benchmark,
)


def test_ours_and_transformers_write_the_same_answers():
    result = run_cli_benchmark(
        CliBenchmarkConfig(
            model=tiny_hf_kwargs(vocab_size=4096, sliding_window=16),
            num_examples=4,
            batch_size=2,
            max_generation_steps=12,
        )
    )
    assert result["identical_responses"] == 1.0
    assert result["generated_tokens"] > 0
    assert result["compilation_cache_files"] > 0
    assert all(wall > 0 for wall in result["wall_s"].values())
    assert result["ratio_warm"] > 0 and result["ratio_cold"] > 0
    json.dumps(result)
    assert "warm compilation cache" in format_cli_benchmark(result)
