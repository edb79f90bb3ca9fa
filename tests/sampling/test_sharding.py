"""Sharded sampling (data and tensor parallel) equals one device, on 8 CPU devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from gsm8k_jax.models.gemma3.sharding import DATA, MODEL, check_mesh, make_mesh
from gsm8k_jax.sampling.sampler import Sampler
from hf_models import make_tiny_hf_model

TESTS = Path(__file__).resolve().parents[1]


def test_sharded_runs_match_single_device(tmp_path):
    # GQA with 4 query heads and 2 kv heads: model=2 splits both, model=4
    # splits query heads and must replicate kv heads.
    make_tiny_hf_model(tmp_path, "gqa")
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    proc = subprocess.run(
        [sys.executable, str(TESTS / "sampling" / "sharded_run.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    single = results.pop("single")
    for name, result in results.items():
        for kind in ("greedy", "sampled"):
            assert result[kind] == single[kind], (name, kind)
        # The programs compiled ahead are the ones that run, on every mesh.
        assert result["compiled_after_compile"] == {}, name
        # And they are what one device compiles: the decode state is made
        # split over the mesh, where moving it there compiled a program for
        # each of its arrays (after making it whole on one device).
        assert result["compiled_by_compile"] == single["compiled_by_compile"], name
    assert single["compiled_after_compile"] == {}
    # Each device holds its share of the decode state's 16 slots (and of
    # its two kv heads where the model axis divides them).
    [[slots, length, kv_heads, head_dim]] = single["kv_shard_shapes"]
    assert (slots, kv_heads) == (16, 2)
    for name, (rows, heads) in {
        "data8": (2, 2),
        "data4_model2": (4, 1),
        "data2_model4": (8, 2),
    }.items():
        assert results[name]["kv_shard_shapes"] == [[rows, length, heads, head_dim]]
    # The MLP really is split over the model axis.
    assert results["data4_model2"]["gate_proj_spec"] == str(
        PartitionSpec(None, "model")
    )


def test_mesh_must_fit_the_devices():
    with pytest.raises(ValueError, match="needs 6 devices"):
        make_mesh(data=3, model=2)


def test_a_mesh_of_other_axes_is_refused():
    """jax.make_mesh's meshes have explicit axes by default, which the
    programs cannot run on: refused in one line before anything moves."""
    devices = jax.devices()[:1]
    for mesh, problem in (
        (jax.make_mesh((1, 1), (DATA, MODEL), devices=devices), "of type"),
        (Mesh(np.asarray(devices).reshape(1, 1), ("batch", MODEL)), "axes are"),
    ):
        with pytest.raises(ValueError, match=f"{problem}.*make_mesh\\(data, model\\)"):
            Sampler(None, None, mesh=mesh)
    check_mesh(make_mesh(1, 1))
