"""Memory traffic of decoding, and the device's peak memory bandwidth.

Decoding is memory-bound: every step reads all weights once and, for each
sequence, the keys and values its new token attends to. Dividing those
bytes by the time taken gives the achieved bandwidth, and comparing it with
the device's peak shows how much headroom is left (the "model bandwidth
utilisation" of LLM serving benchmarks).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gsm8k_jax.models.gemma3.config import AttentionType, Gemma3Config

# Spec-sheet HBM bandwidth (GB/s) by substring of `jax.Device.device_kind`,
# most specific first.
PEAK_BANDWIDTH_GBPS = (
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100", 1555.0),
    ("L4", 300.0),
    ("TPU v6 lite", 1640.0),
    ("TPU v5 lite", 819.0),
    ("TPU v5", 2765.0),
    ("TPU v4", 1228.0),
)

# The streaming-read probe for devices without a spec entry (CPUs): large
# enough to defeat caches, small enough for a laptop.
PROBE_BYTES = 256 * 2**20
PROBE_REPEATS = 5


def weight_bytes(model: nnx.Module) -> int:
    """Bytes of all parameters: what one decode step reads at least once."""
    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def matmul_flops(config: Gemma3Config, tokens: int, logit_rows: int) -> int:
    """FLOPs of the weight matmuls of running `tokens` tokens through the
    layers and projecting `logit_rows` hidden states onto the vocabulary.

    On a compute-bound device (a CPU) this is most of a step's cost, and
    comparing two implementations' totals bounds their speed ratio.
    """
    c = config
    attention = (2 * c.num_heads + 2 * c.num_kv_heads) * c.embed_dim * c.head_dim
    per_layer = attention + 3 * c.embed_dim * c.hidden_dim
    return 2 * (
        tokens * c.num_layers * per_layer + logit_rows * c.vocab_size * c.embed_dim
    )


def kv_bytes_read(
    config: Gemma3Config,
    prompt_lengths: Sequence[int],
    generated_lengths: Sequence[int],
    cache_dtype: jnp.dtype,
) -> int:
    """Bytes of keys and values the generated tokens attend to.

    The decode step that feeds token t of a sequence with prompt length p
    attends to p + t + 1 keys in global layers and to at most
    `sliding_window` in sliding ones, keys and values alike.
    """
    per_key = (
        2 * config.num_kv_heads * config.head_dim * jnp.dtype(cache_dtype).itemsize
    )
    num_global = sum(t == AttentionType.GLOBAL for t in config.layer_types)
    num_local = config.num_layers - num_global
    total = 0
    for p, n in zip(prompt_lengths, generated_lengths):
        keys = p + 1 + np.arange(n, dtype=np.int64)
        total += int(
            num_global * keys.sum()
            + num_local * np.minimum(keys, config.sliding_window).sum()
        )
    return total * per_key


def peak_bandwidth_gbps(device: jax.Device | None = None) -> tuple[float, str]:
    """(GB/s, source): the spec sheet's figure for known accelerators, else a
    streaming read measured now (a fair CPU peak: what one jitted reduction
    over a large array achieves)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, gbps in PEAK_BANDWIDTH_GBPS:
        if name in kind:
            return gbps, f"spec sheet ({kind})"
    return measure_read_bandwidth_gbps(device), f"measured streaming read ({kind})"


def measure_read_bandwidth_gbps(device: jax.Device | None = None) -> float:
    """Best of a few timed `sum` reductions over PROBE_BYTES of float32."""
    x = jax.device_put(
        jnp.ones((PROBE_BYTES // 4,), jnp.float32), device or jax.devices()[0]
    )
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()  # compile
    best = float("inf")
    for _ in range(PROBE_REPEATS):
        start = time.perf_counter()
        total(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return PROBE_BYTES / best / 1e9
