"""Smoke test of the sampler benchmark: it runs and reports sensible figures.

No timing is asserted (machines differ); only that every figure exists, is
positive, and that greedy tokens agree with transformers in float32.
"""

import json
import math

import pytest
from hf_models import tiny_hf_kwargs

from gsm8k_jax.benchmarks.synthetic import BenchmarkConfig, format_table, run_benchmark
from gsm8k_jax.sampling.batching import default_row_tile

MICRO = tiny_hf_kwargs()


@pytest.fixture(scope="module")
def result():
    cfg = BenchmarkConfig(
        model=MICRO,
        batch_size=2,
        prompt_len=20,
        max_generation_steps=4,
        repeats=1,
        row_tile=2,  # A tile matched to the batch (default: the platform's)
    )
    return run_benchmark(cfg)


def test_figures_are_positive_and_ratios_computed(result):
    for side in ("ours", "reference"):
        r = result[side]
        for key in (
            "generation_tokens_per_s",
            "prefill_tokens_per_s",
            "decode_tokens_per_s",
            "full_s",
            "prefill_s",
            "total_wall_s",
            "peak_memory_bytes",
        ):
            assert r[key] > 0 and math.isfinite(r[key]), (side, key, r[key])
    assert result["ours"]["compile_s"] is not None
    # Steady-state calls reuse what the first calls compiled.
    assert result["ours"]["num_compilations"] >= 1
    assert (
        result["ours"]["num_compilations"]
        == result["ours"]["num_compilations_after_warmup"]
    )
    assert result["our_padded_prompt"] == 32
    assert result["row_tile"] == 2 and "row_tile=2" in format_table(result)
    for key, ratio in result["ratios"].items():
        assert ratio > 0 and math.isfinite(ratio), key
    json.dumps(result)  # JSON-ready
    assert "tokens/s" in format_table(result)


def test_greedy_agrees_with_transformers_in_float32(result):
    assert result["agreement"]["dtype"] == "float32"
    assert result["agreement"]["identical_rows_fraction"] == 1.0
    assert result["agreement"]["mean_common_prefix_fraction"] == 1.0


def test_skip_reference_initialises_directly():
    cfg = BenchmarkConfig(
        model=MICRO,
        batch_size=2,
        prompt_len=8,
        max_generation_steps=2,
        repeats=1,
        skip_reference=True,
    )
    result = run_benchmark(cfg)
    assert result["reference"] is None and result["ratios"] is None
    assert result["row_tile"] == default_row_tile()
    assert result["ours"]["generation_tokens_per_s"] > 0
    assert "tokens/s" in format_table(result)
