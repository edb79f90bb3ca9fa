"""Byte counts of decoding, checked against direct counts, and peak bandwidth."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from gsm8k_jax.benchmarks import roofline
from gsm8k_jax.models.gemma3.config import AttentionType, gemma3_tiny
from gsm8k_jax.models.gemma3.model import Gemma3

CONFIG = dataclasses.replace(gemma3_tiny(), sliding_window=5)


def test_weight_bytes_counts_every_parameter_once():
    c = CONFIG
    model = Gemma3(c, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    per_layer = (
        2 * c.num_heads * c.embed_dim * c.head_dim  # q and output projections
        + 2 * c.num_kv_heads * c.embed_dim * c.head_dim  # k and v
        + 3 * c.embed_dim * c.hidden_dim  # gate, up, down
        + 4 * c.embed_dim  # four norms
        + 2 * c.head_dim  # q and k norms
    )
    count = c.vocab_size * c.embed_dim + c.num_layers * per_layer + c.embed_dim
    assert roofline.weight_bytes(model) == 2 * count


def test_matmul_flops_count_every_weight_matrix():
    """2 FLOPs per weight per token for the layers' matrices, and per row for
    the vocabulary projection, counted from the model's own parameters."""
    model = Gemma3(CONFIG, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    embedding = model.embedder.input_embedding[...].size
    matrices = [
        x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)) if x.ndim >= 2
    ]
    layer_weights = sum(matrices) - embedding
    assert roofline.matmul_flops(CONFIG, tokens=7, logit_rows=3) == 2 * (
        7 * layer_weights + 3 * embedding
    )


@pytest.mark.parametrize("dtype,itemsize", [(jnp.bfloat16, 2), (jnp.float32, 4)])
def test_kv_bytes_follow_each_token_and_window(dtype, itemsize):
    prompts, generated = [3, 9, 1], [4, 0, 12]
    expected = 0
    for p, n in zip(prompts, generated):
        for t in range(n):  # the step feeding token t sees positions 0..p+t
            for kind in CONFIG.layer_types:
                keys = p + t + 1
                if kind == AttentionType.LOCAL_SLIDING:
                    keys = min(keys, CONFIG.sliding_window)
                expected += keys * 2 * CONFIG.num_kv_heads * CONFIG.head_dim * itemsize
    assert roofline.kv_bytes_read(CONFIG, prompts, generated, dtype) == expected


def test_peak_bandwidth_from_spec_sheet_or_measured():
    h200 = types.SimpleNamespace(device_kind="NVIDIA H200")
    assert roofline.peak_bandwidth_gbps(h200) == (4800.0, "spec sheet (NVIDIA H200)")
    pcie = types.SimpleNamespace(device_kind="NVIDIA H100 PCIe")
    assert roofline.peak_bandwidth_gbps(pcie)[0] == 2000.0
    measured, source = roofline.peak_bandwidth_gbps()  # this machine's CPU
    assert measured > 0 and source.startswith("measured")
