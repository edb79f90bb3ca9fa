"""The GSM8K-shaped benchmark: real prompts, imposed or natural answer
lengths, the same tokens as transformers, and a sane byte count."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hf_models import tiny_hf_kwargs

from gsm8k_jax.benchmarks import invariance
from gsm8k_jax.benchmarks.workload import (
    WorkloadConfig,
    format_workload,
    gsm8k_prompts,
    run_workload,
)
from gsm8k_jax.eval.data import load_gsm8k
from gsm8k_jax.sampling.batching import default_prefill_chunk

ROOT = Path(__file__).resolve().parents[2]
# A random model small enough for CPU tests, with the GSM8K tokenizer's vocabulary.
MICRO = tiny_hf_kwargs(vocab_size=4096, sliding_window=16)


def test_trained_model_stops_on_its_own_and_matches_transformers():
    result = run_workload(
        WorkloadConfig(num_examples=6, batch_size=4, max_generation_steps=40)
    )
    ours, w = result["ours"], result["workload"]
    assert result["agreement"]["identical_rows_fraction"] == 1.0
    assert w["num_prompts"] == 6
    assert w["padded_prompt_tokens"] % default_prefill_chunk() == 0
    # One decode and one prefill program, whatever the prompts' lengths.
    assert ours["num_compilations"] == ours["num_compilations_after_warmup"] == 2
    # At least the longest answer's steps, at most one step per token.
    assert w["generated_tokens_max"] <= ours["decode_steps"] <= w["generated_tokens"]
    assert 0 < ours["slot_occupancy"] <= 1
    assert ours["tile_steps"] == ours["decode_steps"]  # 4 slots: one tile
    assert ours["prefilled_tokens"] >= w["padded_prompt_tokens"]
    assert 0 < ours["useful_bandwidth_gbps"] <= ours["achieved_bandwidth_gbps"]
    assert result["ratio_tokens_per_s"] > 0
    assert 0 < result["reference"]["matmul_gflop"] and 0 < ours["matmul_gflop"]
    json.dumps(result)
    assert "achieved bandwidth" in format_workload(result)
    assert "weight matmuls" in format_workload(result)


def test_reference_lengths_are_the_gold_solutions():
    result = run_workload(
        WorkloadConfig(
            model=MICRO,
            num_examples=5,
            batch_size=2,
            max_generation_steps=100,
            answer_lengths="reference",
        )
    )
    _, _, tokenizer = gsm8k_prompts(5)
    gold = [e.answer for e in load_gsm8k(num_examples=5)]
    expected = [
        min(len(tokenizer.encode(a, add_special_tokens=False)) + 1, 100) for a in gold
    ]
    assert result["workload"]["generated_tokens"] == sum(expected)
    assert result["agreement"]["identical_rows_fraction"] == 1.0
    # Static batches run each pair to its longer answer.
    pairs = [expected[i : i + 2] for i in range(0, 5, 2)]
    assert result["reference"]["decode_steps"] == sum(max(p) for p in pairs)


def test_lengths_replayed_from_a_rollouts_file(tmp_path):
    rollouts = tmp_path / "rollouts.jsonl"
    records = [
        {"id": 0, "sample_index": 0, "num_tokens": 7},
        {"id": 0, "sample_index": 1, "num_tokens": 99},
        {"id": 1, "sample_index": 0, "num_tokens": 3},
    ]
    rollouts.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = dict(model=MICRO, batch_size=2, max_generation_steps=50, skip_reference=True)
    result = run_workload(
        WorkloadConfig(num_examples=2, answer_lengths=str(rollouts), **cfg)
    )
    assert result["workload"]["generated_tokens"] == 10
    assert result["reference"] is None
    with pytest.raises(ValueError, match="no rollout for example ids"):
        run_workload(
            WorkloadConfig(num_examples=3, answer_lengths=str(rollouts), **cfg)
        )


def test_bad_settings_fail_early(tmp_path):
    with pytest.raises(ValueError, match="never stop on their own"):
        WorkloadConfig(model="gemma3-1b", answer_lengths="model")
    with pytest.raises(FileNotFoundError, match="rollouts"):
        WorkloadConfig(answer_lengths=str(tmp_path / "missing.jsonl"))
    small_vocab = dict(MICRO, vocab_size=512)
    with pytest.raises(ValueError, match="vocabulary"):
        run_workload(
            WorkloadConfig(
                model=small_vocab,
                num_examples=2,
                answer_lengths="reference",
                skip_reference=True,
            )
        )


def run_benchmark_script(*args):
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "research/script/benchmark_sampler.py"),
            "--workload=gsm8k",
            "--num_examples=3",
            "--max_generation_steps=8",
            *args,
        ],
        capture_output=True,
        text=True,
        check=True,
    )


def test_script_runs_the_gsm8k_workload_and_compares_rows_across_processes(tmp_path):
    """The device check's invariance across two processes, each compiling
    its own programs: here on CPU, in bfloat16."""
    first, second = tmp_path / "bs2.json", tmp_path / "bs3.json"
    proc = run_benchmark_script(
        "--batch_size=2", "--dtype=bfloat16", f"--output_json={first}"
    )
    assert "tokens/s" in proc.stdout
    result = json.loads(first.read_text())
    assert result["workload"]["num_prompts"] == 3 and len(result["row_digests"]) == 3
    proc = run_benchmark_script(
        "--batch_size=3",
        "--dtype=bfloat16",
        f"--rows_reference_json={first}",
        f"--output_json={second}",
    )
    assert (
        "rows bitwise identical to another process's, batch 2 vs 3 (programs"
        " compiled in each): tokens and logprob 1.0000"
    ) in proc.stdout, proc.stdout
    check = json.loads(second.read_text())["cross_process_invariance"]
    assert check["identical_tokens_and_logprob_fraction"] == 1.0
    # A row that differs counts; another workload is refused.
    settings = json.loads(second.read_text())["settings"]
    digests = json.loads(second.read_text())["row_digests"]
    changed = [digests[0], "0" * 16, digests[2]]
    assert invariance.cross_process(str(first), settings, changed)[
        "identical_tokens_and_logprob_fraction"
    ] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="differing: dtype"):
        invariance.cross_process(str(first), settings | {"dtype": "float32"}, digests)


def test_batch_invariance_check_counts_bitwise_identical_rows():
    """The device check (batch 1 against 64) on CPU, in bfloat16."""
    result = run_workload(
        WorkloadConfig(
            model=MICRO,
            num_examples=40,
            batch_size=1,
            invariance_batch_size=64,
            max_generation_steps=24,
            answer_lengths="reference",
            dtype="bfloat16",
            skip_reference=True,
        )
    )
    check = result["batch_invariance"]
    assert check["batch_sizes"] == [1, 64] and check["dtype"] == "bfloat16"
    assert check["identical_tokens_and_logprob_fraction"] == 1.0
    assert "rows bitwise identical, batch 1 vs 64" in format_workload(result)
