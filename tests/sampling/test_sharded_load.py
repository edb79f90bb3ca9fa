"""Weights loaded straight into their shardings, LoRA attached or merged there,
and
checkpoints swept over device groups, on 8 CPU devices.

One subprocess (`sharded_load_run.py`, 8 forced host devices) measures
everything; the tests below each check one part of what it printed.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hf_models import make_tiny_hf_model
from jax.sharding import PartitionSpec

from gsm8k_jax.eval.sweep import device_groups
from gsm8k_jax.models.gemma3.sharding import check_model_parallelism
from gsm8k_jax.models.specs import TINY_MODEL_DIR

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """What sharded_load_run.py printed, on a random Gemma 3 with 16 query
    heads, 8 kv heads, MLP 128 and vocabulary 4096 (all divide by 8), and
    the tiny tokenizer (for GSM8K runs)."""
    model_dir = tmp_path_factory.mktemp("model")
    make_tiny_hf_model(
        model_dir,
        "gqa",
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=16,
        num_hidden_layers=2,
        vocab_size=4096,
    )
    for name in TOKENIZER_FILES:
        shutil.copy(TINY_MODEL_DIR / name, model_dir / name)
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(TESTS / "sampling" / "sharded_load_run.py"),
            str(model_dir),
            str(tmp_path_factory.mktemp("scratch")),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_no_device_holds_more_than_its_share_while_loading(measured):
    bound = measured["bound_bytes"]  # 1/8 of each 2-D tensor + the 1-D norms
    load = measured["sharded_load"]
    assert load["samples"] >= 2 * 7 + 2  # after every tensor placed
    assert max(load["peak"]) <= bound
    assert load["peak"] == [bound] * 8  # and every device got its share
    # The measurement catches today's load-then-shard: device 0 held it all.
    control = measured["load_then_shard"]["peak"]
    assert control[0] == measured["whole_model_bytes"] > 7 * bound


def test_lora_merges_in_place_on_the_mesh(measured):
    merge = measured["sharded_merge"]
    assert merge["samples"] == 2 * 6  # after every merged weight
    assert max(merge["peak"]) <= measured["merge_bound_bytes"]
    # Every merged weight is float32 and split as its base weight was, in a
    # float32 model and in a bfloat16 one.
    assert measured["merge_kept_shardings"]
    assert measured["bfloat16_merge_kept_shardings"]
    assert measured["merged_q_spec"] == str(PartitionSpec("model", None, None))
    # Attached (the default): the weights untouched, each factor split as
    # its weight's axes.
    assert measured["bfloat16_attached_beside_blocks"]


def test_sharded_loads_match_the_single_device_load(measured):
    parity = measured["parity"]
    for name, checks in parity.items():
        # Bit for bit the weights of one device, placed as shard_model places them.
        assert checks["weights_equal_single"], name
        assert checks["shardings_equal_load_then_shard"], name
        assert checks["split_weights"] == 1 + 2 * 6, name  # all but the norms
    # Data parallel, bfloat16 (the default dtype): logits, tokens and
    # log-probs bit for bit.
    dp = parity["bfloat16_data8_model1"]
    assert dp["logits_equal"] and dp["tokens_equal"] and dp["logprobs_equal"]
    # Tensor parallel splits reductions: float32 tokens the same, logits to
    # float32 noise.
    tp = parity["float32_data2_model4"]
    assert tp["tokens_equal"] and tp["logits_max_abs_diff"] < 1e-4


def test_sweep_over_device_groups_equals_single_runs(measured):
    sweep = measured["sweep"]
    assert sweep["rollouts"] == sweep["singles"]  # every row, every field
    responses = [tuple(r["response"] for r in run) for run in sweep["rollouts"]]
    assert len(set(responses)) == 3  # the checkpoints really differ
    # Two groups of 4 devices side by side, one of them taking a second run.
    groups = {(thread, tuple(devices)) for thread, devices in sweep["placed_on"]}
    assert {devices for _, devices in groups} == {(0, 1, 2, 3), (4, 5, 6, 7)}
    assert len({thread for thread, _ in groups}) == 2


@pytest.mark.parametrize(
    "per_checkpoint, mesh_model, message",
    [
        (3, 1, "--devices_per_checkpoint=3 must divide the 8 local devices"),
        (16, 1, "--devices_per_checkpoint=16 must divide the 8 local devices"),
        (2, 4, "--mesh_model=4 must divide the 2 devices of each checkpoint"),
    ],
)
def test_device_groups_refuse_what_does_not_divide(per_checkpoint, mesh_model, message):
    with pytest.raises(ValueError, match=message):
        device_groups(list(range(8)), per_checkpoint, mesh_model)


def test_device_groups_split_in_order():
    assert device_groups(list(range(8)), 4, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert device_groups(list(range(8)), 0, 1) == [list(range(8))]


def test_model_axis_must_divide_the_query_heads():
    check_model_parallelism(32, 8)
    with pytest.raises(
        ValueError,
        match=r"--mesh_model=3 does not divide the model's 4 query heads: use one"
        r" of \[1, 2, 4\]",
    ):
        check_model_parallelism(4, 3)


@pytest.mark.parametrize(
    "script, args, message",
    [
        (
            "compare_checkpoints.py",
            ["--lora_checkpoints=nowhere", "--devices_per_checkpoint=2"],
            "error: --devices_per_checkpoint=2 must divide the 1 local devices",
        ),
        (
            "eval_gsm8k_base.py",
            ["--mesh_model=3"],
            "error: --mesh_model=3 does not divide the model's 4 query heads",
        ),
    ],
)
def test_scripts_say_what_does_not_divide_in_one_line(tmp_path, script, args, message):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "research" / "script" / script),
            *args,
            f"--output_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 1
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())  # refused before anything was written
