"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

All settings arrive as traced arrays, never as Python constants baked into a
trace, so changing them between calls takes effect without a stale jit
cache entry (and without recompiling).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _filter_top_k_top_p(
    logits: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> jax.Array:
    """Masks logits outside the top-k set and the top-p nucleus. [B, V] -> [B, V].

    top_k <= 0 disables top-k; top_p >= 1 disables top-p.
    """
    vocab = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)  # [B, V]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth_largest = jnp.take(sorted_desc, k - 1, axis=-1)[:, None]  # [B, 1]
    # Nucleus: keep the smallest prefix whose mass reaches top_p (always >= 1 token).
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    in_nucleus = mass_before < top_p
    nucleus_floor = jnp.min(
        jnp.where(in_nucleus, sorted_desc, jnp.inf), axis=-1, keepdims=True
    )
    threshold = jnp.maximum(kth_largest, nucleus_floor)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def choose_tokens(
    logits: jax.Array,  # [B, V] float32
    keys: jax.Array,  # [B] PRNG keys, one per row
    temperature: jax.Array,  # scalar; 0 means greedy
    top_k: jax.Array,  # scalar int
    top_p: jax.Array,  # scalar float
) -> jax.Array:
    """Returns [B] int32 token ids."""

    def sample(_):
        scaled = logits / jnp.maximum(temperature, 1e-6)
        filtered = _filter_top_k_top_p(scaled, top_k, top_p)
        return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)

    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sample, greedy, None)
