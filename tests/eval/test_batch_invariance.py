"""Whole evaluations on the bundled model are bitwise batch invariant, in the
default dtype (bfloat16) and in float32.

64 test problems of mixed prompt lengths (two prompt buckets), 128 new
tokens: prompt + generation is longer than the model's 64-token window.
Every row's response, token count and summed log-probability must be the
same bits at batch sizes 1, 2, 7, 32 and 64 and in shuffled order; after
kill -9 and resume, and on 8 devices, the rollouts file must be the
batch-size-1 run's, byte for byte.
"""

import dataclasses
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from eval.test_eval_scripts import kill_after

from gsm8k_jax.eval import runner, tasks
from gsm8k_jax.eval.data import load_gsm8k
from gsm8k_jax.eval.prompts import format_prompt
from gsm8k_jax.eval.results import RunFiles
from gsm8k_jax.eval.runner import EvalConfig, evaluate
from gsm8k_jax.models.registry import load_pretrained
from gsm8k_jax.sampling.batching import num_chunks
from gsm8k_jax.sampling.sampler import Sampler, SamplingParams

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "research" / "script" / "eval_gsm8k_base.py"
NUM_EXAMPLES, STEPS = 64, 128
ROW_KEYS = ("response", "logprob", "num_tokens", "finish_reason")
DTYPES = ["bfloat16", "float32"]


def rows_by_id(rollouts):
    return {r["id"]: tuple(r[k] for k in ROW_KEYS) for r in rollouts}


@pytest.fixture(scope="module", params=DTYPES)
def reference_run(request, tmp_path_factory):
    """(dtype, sampler, examples, folder of the batch-size-1 run)."""
    model, tokenizer, _ = load_pretrained("gemma3-tiny", dtype=request.param)
    sampler = Sampler(model, tokenizer)
    examples = load_gsm8k()[:NUM_EXAMPLES]
    out_dir = tmp_path_factory.mktemp("bs1")
    run_in_process(sampler, examples, 1, out_dir)
    return request.param, sampler, examples, out_dir


@pytest.fixture(scope="module")
def reference(reference_run):
    """(dtype, sampler, examples, batch-size-1 rows)."""
    dtype, sampler, examples, out_dir = reference_run
    return (
        dtype,
        sampler,
        examples,
        rows_by_id(RunFiles(out_dir, "bs1").read_rollouts()),
    )


@pytest.fixture(scope="module")
def reference_file(reference_run):
    """The batch-size-1 run's rollouts file, as text."""
    return Path(RunFiles(reference_run[3], "bs1").rollouts_path).read_text()


def run_in_process(sampler, examples, batch_size, out_dir, row_tile=None):
    """`evaluate`, as the scripts call it with --batch_size=batch_size."""
    config = EvalConfig(
        batch_size=batch_size,
        sampling=SamplingParams(max_generation_steps=STEPS, eos_ids=(1, 106)),
        row_tile=row_tile,
    )
    files = RunFiles(out_dir, f"bs{batch_size}")
    files.prepare({"batch_size": batch_size}, resume=False, overwrite=True)
    evaluate(sampler, examples, config, files, run_info={}, show_progress=False)
    return rows_by_id(files.read_rollouts())


def test_workload_is_demanding(reference):
    _, sampler, examples, rows = reference
    prompts = [format_prompt(e.question, sampler.tokenizer) for e in examples]
    lengths = [len(sampler.encode(p)) for p in prompts]
    # Prompts of several prefill chunks, prefilled in groups of mixed lengths.
    assert len({num_chunks(n, sampler.prefill_chunk) for n in lengths}) >= 2
    window = sampler.model.config.sliding_window
    assert sum(n + rows[e.id][2] > window for n, e in zip(lengths, examples)) >= 32
    assert len({row[0] for row in rows.values()}) > NUM_EXAMPLES // 2
    # As the README says of the bundled model: most answers end in \boxed{N}
    # and stop on their own.
    stopped = [row[0] for row in rows.values() if row[3] == "eos"]
    assert len(stopped) >= NUM_EXAMPLES * 3 // 4
    assert all(re.search(r"\\boxed\{[^}]+\}\.?\s*$", text) for text in stopped)


@pytest.mark.parametrize("batch_size", [2, 7, 32, 64])
def test_any_batch_size_gives_the_same_bits(reference, batch_size, tmp_path):
    _, sampler, examples, expected = reference
    assert run_in_process(sampler, examples, batch_size, tmp_path) == expected


def test_a_smaller_row_tile_is_batch_invariant_too(reference, tmp_path):
    """--row_tile=8: batch sizes 1 and 16 give the same bits (a tile is
    fixed by the run, never by the batch); the evaluation refuses a sampler
    of another tile."""
    _, sampler, examples, _ = reference
    small = Sampler(sampler.model, sampler.tokenizer, row_tile=8)
    one = run_in_process(small, examples, 1, tmp_path / "bs1", row_tile=8)
    assert run_in_process(small, examples, 16, tmp_path / "bs16", row_tile=8) == one
    with pytest.raises(ValueError, match="row_tile=8"):
        run_in_process(sampler, examples, 1, tmp_path / "other", row_tile=8)


def test_repeated_problem_ids_are_refused(reference, tmp_path):
    """Results are kept by problem id (and an id picks a problem's random
    keys): two problems of one id are refused before anything runs."""
    _, sampler, examples, _ = reference
    twice = [examples[0], dataclasses.replace(examples[1], id=examples[0].id)]
    with pytest.raises(ValueError, match=rf"Problem ids \[{examples[0].id}\] repeat"):
        run_in_process(sampler, twice, 2, tmp_path)
    assert not Path(RunFiles(tmp_path, "bs2").rollouts_path).exists()


def test_shuffled_order_gives_the_same_bits(reference, tmp_path):
    _, sampler, examples, expected = reference
    shuffled = list(examples)
    random.Random(0).shuffle(shuffled)
    assert run_in_process(sampler, shuffled, 7, tmp_path) == expected


def test_generation_ends_where_a_stop_string_is_generated(
    reference, tmp_path, monkeypatch
):
    """A task's stop string ends a row's generation where the row generates
    it (lm-eval's tasks stop at `Question:`): the responses and finish
    reasons of generating on and cutting the text, from fewer tokens
    (tests/sampling/test_sampler.py checks the bits at any batch size)."""
    _, sampler, examples, _ = reference
    examples = examples[:16]
    # The bundled model's solutions hold "=" (`16 - 3 - 4 = 9`).
    boxed = dataclasses.replace(tasks.TASKS[tasks.BOXED], until=("=",))
    monkeypatch.setitem(tasks.TASKS, tasks.BOXED, boxed)
    stopped = run_in_process(sampler, examples, 8, tmp_path / "bs8")
    monkeypatch.setattr(runner, "stop_token_sequences", lambda stops, tokenizer: ())
    generated_on = run_in_process(sampler, examples, 8, tmp_path / "on")
    ended_early = 0
    for i, (response, _, num_tokens, finish) in stopped.items():
        assert (response, finish) == (generated_on[i][0], generated_on[i][3])
        assert num_tokens <= generated_on[i][2]
        ended_early += num_tokens < generated_on[i][2]
    assert ended_early >= len(examples) // 2


def _script(dtype, out_dir, batch_size):
    return [
        sys.executable,
        str(SCRIPT),
        f"--model.dtype={dtype}",
        f"--num_examples={NUM_EXAMPLES}",
        f"--max_generation_steps={STEPS}",
        f"--batch_size={batch_size}",
        f"--output_dir={out_dir}",
    ]


def _script_rollouts(out_dir, batch_size):
    return (out_dir / f"rollouts_gemma3-tiny_base_bs{batch_size}.jsonl").read_text()


def test_kill_and_resume_gives_the_same_bits(reference, reference_file, tmp_path):
    """kill -9 mid-run and a rerun: the batch-size-1 rollouts, byte for byte."""
    dtype = reference[0]
    command = _script(dtype, tmp_path, 2)
    finished = kill_after(command, tmp_path, "gemma3-tiny_base_bs2", 8)
    assert 8 <= finished < NUM_EXAMPLES, "the kill must land mid-run"
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    assert _script_rollouts(tmp_path, 2) == reference_file


def test_eight_devices_give_the_same_bits(reference, reference_file, tmp_path):
    dtype = reference[0]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        _script(dtype, tmp_path, 32),
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary_gemma3-tiny_base_bs32.json").read_text())
    assert len(summary["devices"]) == 8
    assert _script_rollouts(tmp_path, 32) == reference_file
