"""The KV cache: sliding-window layers keep a ring buffer of one window, and
decoding through it gives the logits of a cache-free forward pass."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gsm8k_jax.models.gemma3.cache import KVCache, _ring_layout
from gsm8k_jax.models.gemma3.config import AttentionType, gemma3_tiny
from gsm8k_jax.models.gemma3.model import Gemma3
from gsm8k_jax.sampling.decode import prompt_positions

WINDOW = 6
CONFIG = dataclasses.replace(gemma3_tiny(), sliding_window=WINDOW)


@pytest.fixture(scope="module")
def model():
    return Gemma3(CONFIG, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))


def test_sliding_layers_keep_one_window():
    cache = KVCache.empty(CONFIG, 3, 40, jnp.bfloat16)
    for kind, k, v in zip(CONFIG.layer_types, cache.k, cache.v):
        length = WINDOW if kind == AttentionType.LOCAL_SLIDING else 40
        assert k.shape == v.shape == (3, length, CONFIG.num_kv_heads, CONFIG.head_dim)
        assert k.dtype == jnp.bfloat16
    assert cache.is_ring
    short = KVCache.empty(CONFIG, 3, WINDOW - 2, jnp.bfloat16)
    assert not short.is_ring and {k.shape[1] for k in short.k} == {WINDOW - 2}


@pytest.mark.parametrize("tokens,length", [(3, 8), (8, 8), (11, 4), (17, 5)])
def test_ring_layout_keeps_the_latest_token_of_each_slot(tokens, length):
    latest = {}
    for cursor in range(tokens):  # Writing tokens one by one into the ring.
        latest[cursor % length] = cursor
    source, present = _ring_layout(tokens, length)
    for slot in range(length):
        assert present[slot] == (slot in latest)
        if present[slot]:
            assert source[slot] == latest[slot]


def test_decoding_through_the_ring_matches_a_full_forward_pass(model):
    """Left-padded prompts installed from a full-width prefill, then decoded a
    token at a time for several windows; rows at different positions."""
    rng = np.random.RandomState(0)
    prompt_lengths, width, steps = [5, 9, 1], 9, 3 * WINDOW
    total = width + steps
    tokens = rng.randint(3, CONFIG.vocab_size, size=(3, total))
    valid = np.ones((3, total), bool)
    for row, n in enumerate(prompt_lengths):
        valid[row, : width - n] = False
    positions = prompt_positions(jnp.asarray(valid))
    expected, _ = model(jnp.asarray(tokens), positions, jnp.asarray(valid))
    expected = model.logits(expected)  # [B, total, V], no cache at all

    fresh = KVCache.empty(CONFIG, 3, width, jnp.float32, ring=False)
    hidden, fresh = model(
        jnp.asarray(tokens[:, :width]), positions[:, :width], valid[:, :width], fresh
    )
    # Rows land in slots 2, 0, 1 of a cache with a spare slot left empty,
    # without their padding: row r decodes from cursor prompt_lengths[r].
    slots = jnp.asarray([2, 0, 1])
    cache = KVCache.empty(CONFIG, 4, total, jnp.float32)
    cache = cache.install_rows(slots, fresh)
    assert cache.is_ring
    cursors = jnp.zeros((4,), jnp.int32).at[slots].set(jnp.asarray(prompt_lengths))
    got = [model.logits(hidden[:, -1])]
    for step in range(width, total - 1):
        row_tokens = jnp.zeros((4, 1), jnp.int32).at[slots, 0].set(tokens[:, step])
        row_positions = (
            jnp.zeros((4, 1), jnp.int32).at[slots, 0].set(positions[:, step])
        )
        hidden, cache = model(
            row_tokens,
            row_positions,
            jnp.zeros((4, 1), bool).at[slots].set(True),
            cache,
            cursors + (step - width),
        )
        got.append(model.logits(hidden[slots, 0]))
    got = jnp.stack(got, axis=1)
    np.testing.assert_allclose(got, expected[:, width - 1 : -1], atol=1e-4, rtol=1e-4)


def test_ring_cache_refuses_many_tokens_at_once(model):
    cache = KVCache.empty(CONFIG, 1, 20, jnp.float32)
    with pytest.raises(ValueError, match="ring=False"):
        model(
            jnp.zeros((1, 2), jnp.int32),
            jnp.zeros((1, 2), jnp.int32),
            jnp.ones((1, 2), bool),
            cache,
        )


def test_installing_a_prompt_invalidates_the_previous_occupant():
    cache = KVCache.empty(CONFIG, 2, 20, jnp.float32)
    cache = cache.replace(
        full=cache.full.replace(valid=jnp.ones_like(cache.full.valid)),
        window=cache.window.replace(valid=jnp.ones_like(cache.window.valid)),
    )
    fresh = KVCache.empty(CONFIG, 1, 3, jnp.float32, ring=False)
    fresh = fresh.replace(
        full=fresh.full.replace(valid=jnp.ones((1, 3), bool)),
        window=fresh.window.replace(valid=jnp.ones((1, 3), bool)),
    )
    cache = cache.install_rows(jnp.asarray([1]), fresh)
    for table in (cache.full, cache.window):
        assert table.valid[0].all()  # the other row is untouched
        assert table.valid[1].tolist() == [True] * 3 + [False] * (table.length - 3)


def test_installing_drops_the_left_padding():
    """A prompt's first real token lands in slot 0, whatever its padding."""
    width, pad = 5, 2
    fresh = KVCache.empty(CONFIG, 1, width, jnp.float32, ring=False)
    keys = jnp.arange(width, dtype=jnp.float32)[None, :, None, None]
    valid = jnp.arange(width)[None] >= pad
    fresh = fresh.replace(
        k=tuple(jnp.broadcast_to(keys, k.shape) for k in fresh.k),
        full=fresh.full.replace(valid=valid, positions=jnp.arange(width)[None] - pad),
        window=fresh.window.replace(valid=valid),
    )
    cache = KVCache.empty(CONFIG, 1, 20, jnp.float32)
    cache = cache.install_rows(jnp.asarray([0]), fresh)
    real = width - pad
    assert cache.full.valid[0].tolist() == [True] * real + [False] * (20 - real)
    assert cache.full.positions[0, :real].tolist() == list(range(real))
    for k in cache.k:
        assert k[0, :real, 0, 0].tolist() == list(range(pad, width))
