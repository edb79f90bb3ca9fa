"""The KV cache: sliding-window layers keep a ring buffer of about one
window, and prefilling through it in chunks, then decoding, gives the
logits of a cache-free forward pass."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gsm8k_jax.models.gemma3.cache import KVCache, SlotRows, ring_slots
from gsm8k_jax.models.gemma3.config import AttentionType, gemma3_tiny
from gsm8k_jax.models.gemma3.model import Gemma3

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
    assert cache.window.length < cache.full.length  # a ring
    # A cache shorter than the window keeps the window: its keys sit in the
    # same slots as in a longer cache.
    short = KVCache.empty(CONFIG, 3, WINDOW - 2, jnp.bfloat16)
    assert short.window.length == WINDOW > short.full.length
    chunked = KVCache.empty(CONFIG, 3, 40, jnp.bfloat16, chunk=4)
    assert chunked.window.length == ring_slots(WINDOW, 4) == 8


@pytest.mark.parametrize("window", [1, 5, 6, 8, 64, 512])
@pytest.mark.parametrize("chunk", [1, 3, 4, 32])
def test_a_chunk_never_wraps_around_the_ring(window, chunk):
    ring = ring_slots(window, chunk)
    assert window <= ring < window + chunk and ring % chunk == 0
    for start in range(0, 4 * ring, chunk):
        assert start % ring + chunk <= ring


def prefill_in_chunks(model, prompts, width, chunk, cache, slots):
    """Writes left-padded prompts ([ids] each) chunk by chunk into rows
    `slots` of the cache (each at its own cursors), as the sampler's prefill
    does. Returns (the last token's hidden state per prompt, cache)."""
    pads = np.array([width - len(p) for p in prompts])
    tokens = np.zeros((len(prompts), width), np.int32)
    for row, p in enumerate(prompts):
        tokens[row, pads[row] :] = p
    columns = np.arange(width)[None, :]
    valid, positions = columns >= pads[:, None], np.maximum(columns - pads[:, None], 0)
    for start in range(0, width, chunk):
        taken = cache.take_rows(
            jnp.asarray(slots), fresh=jnp.full(len(slots), start == 0)
        )
        part = slice(start, start + chunk)
        hidden, taken = model(
            jnp.asarray(tokens[:, part]),
            jnp.asarray(positions[:, part]),
            jnp.asarray(valid[:, part]),
            taken,
            jnp.full((len(prompts),), start),
        )
        cache = cache.put_rows(taken)
    return hidden[:, -1], cache


def test_chunked_prefill_and_decoding_through_the_ring_match_a_forward_pass(model):
    """Left-padded prompts prefilled 4 tokens per call into a ring of 8
    slots (a window of 6: a chunk overwrites keys its first queries still
    see), then decoded a token at a time for several windows; rows at
    different positions, compared with each sequence's own forward pass
    without padding or cache."""
    rng = np.random.RandomState(0)
    chunk, width, steps = 4, 12, 3 * WINDOW
    prompt_lengths = [5, 12, 1]
    sequences = [
        rng.randint(3, CONFIG.vocab_size, size=n + steps) for n in prompt_lengths
    ]
    expected = []
    for seq in sequences:
        hidden, _ = model(
            jnp.asarray(seq)[None],
            jnp.arange(len(seq))[None],
            jnp.ones((1, len(seq)), bool),
        )
        expected.append(model.logits(hidden[0]))

    # Rows land in slots 2, 0, 1 of a cache with a spare slot left empty.
    slots = [2, 0, 1]
    cache = KVCache.empty(CONFIG, 4, width + steps, jnp.float32, chunk=chunk)
    assert cache.window.length < cache.full.length  # a ring
    prompts = [seq[:n] for seq, n in zip(sequences, prompt_lengths)]
    hidden, cache = prefill_in_chunks(model, prompts, width, chunk, cache, slots)
    got = [[logits] for logits in model.logits(hidden)]
    for step in range(steps - 1):
        row_tokens = (
            jnp.zeros((4, 1), jnp.int32)
            .at[jnp.asarray(slots), 0]
            .set(
                jnp.asarray(
                    [seq[n + step] for seq, n in zip(sequences, prompt_lengths)]
                )
            )
        )
        row_positions = (
            jnp.zeros((4, 1), jnp.int32)
            .at[jnp.asarray(slots), 0]
            .set(jnp.asarray(prompt_lengths) + step)
        )
        hidden, cache = model(
            row_tokens,
            row_positions,
            jnp.zeros((4, 1), bool).at[jnp.asarray(slots)].set(True),
            cache,
            jnp.full((4,), width + step),
        )
        for row, slot in enumerate(slots):
            got[row].append(model.logits(hidden[slot, 0]))
    for row, n in enumerate(prompt_lengths):
        np.testing.assert_allclose(
            jnp.stack(got[row]), expected[row][n - 1 : -1], atol=1e-4, rtol=1e-4
        )


def test_ring_cache_refuses_chunks_it_was_not_made_for(model):
    cache = KVCache.empty(CONFIG, 1, 20, jnp.float32)  # a ring of 6 slots
    with pytest.raises(ValueError, match=r"KVCache.empty\(\.\.\., chunk=4\)"):
        model(
            jnp.zeros((1, 4), jnp.int32),
            jnp.zeros((1, 4), jnp.int32),
            jnp.ones((1, 4), bool),
            cache,
        )


def test_a_fresh_row_forgets_the_previous_occupant():
    """take_rows empties the tables of fresh rows (nothing of a slot's last
    sequence can leak into the next), and put_rows puts its tables back in
    their rows, dropping out-of-range ones."""
    cache = KVCache.empty(CONFIG, 3, 20, jnp.float32)
    cache = cache.replace(
        full=cache.full.replace(valid=jnp.ones_like(cache.full.valid)),
        window=cache.window.replace(valid=jnp.ones_like(cache.window.valid)),
    )
    rows, fresh = jnp.asarray([1, 2, 3]), jnp.asarray([True, False, True])
    taken = cache.take_rows(rows, fresh=fresh)  # row 3: out of range
    for table in (taken.full, taken.window):
        assert table.valid.any(axis=1).tolist() == [False, True, False]
    cache = cache.put_rows(taken)
    for table in (cache.full, cache.window):
        assert table.valid.any(axis=1).tolist() == [True, False, True]


def test_a_view_of_some_rows_reads_and_writes_them_in_place():
    keys = jnp.arange(4 * 6, dtype=jnp.float32).reshape(4, 6, 1, 1)
    rows = SlotRows(jnp.asarray([2, 0, 4]))  # row 4: out of range
    np.testing.assert_array_equal(
        rows.take(keys, 3, 2)[:2, :, 0, 0], [[15, 16], [3, 4]]
    )
    written = rows.put(keys, -jnp.ones((3, 2, 1, 1)), jnp.asarray([1, 4, 0]))
    expected = np.asarray(keys).copy()
    expected[2, 1:3] = expected[0, 4:6] = -1
    np.testing.assert_array_equal(written, expected)
