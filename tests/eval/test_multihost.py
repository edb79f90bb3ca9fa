"""Multi-host evaluation: two jax.distributed processes (each with two CPU
devices and a data-parallel mesh) write the files one process writes."""

import json
import os
import socket
import subprocess
import sys

from eval.test_eval_scripts import (
    BASE_SCRIPT,
    REPO,
    TIMING_KEYS,
    read_outputs,
    run_script,
)

ARGS = [
    "--num_examples=10",
    "--batch_size=2",
    "--max_generation_steps=12",
    "--model.dtype=float32",
]
TAG = "gemma3-tiny_base_bs2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_merge_into_the_single_process_files(tmp_path):
    run_script(*ARGS, f"--output_dir={tmp_path / 'single'}")
    expected_rollouts, expected_summary = read_outputs(tmp_path / "single", TAG)

    address = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(BASE_SCRIPT),
                *ARGS,
                f"--output_dir={tmp_path / 'multi'}",
                "--distributed",
                f"--coordinator_address={address}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    rollouts, summary = read_outputs(tmp_path / "multi", TAG)
    # Identical answers; log-probs agree to float32 noise (other shapes per device).
    got, want = (
        [json.loads(line) for line in r.splitlines()]
        for r in (rollouts, expected_rollouts)
    )
    assert [r["id"] for r in got] == [r["id"] for r in want] == list(range(10))
    for a, b in zip(got, want):
        assert abs(a.pop("logprob") - b.pop("logprob")) < 1e-3
        assert a == b
    shard = json.loads(
        (tmp_path / "multi" / f"summary_{TAG}.shard1of2.json").read_text()
    )
    assert shard["total"] == 5 and len(shard["devices"]) == 2
    ignored = TIMING_KEYS | {"num_shards", "devices"}
    assert summary["num_shards"] == 2
    assert {k: v for k, v in summary.items() if k not in ignored} == {
        k: v for k, v in expected_summary.items() if k not in ignored
    }
