"""Token choice: top-k / top-p thresholds from the top candidates equal a full
sort's, rows that need a full sort do not change the others, and the chosen
token's log-probability is its log-softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsm8k_jax.sampling.token_choice import (
    ARGMAX_CHUNK,
    CANDIDATES,
    _filter_top_k_top_p,
    choose_tokens,
    chunk_maxima,
    first_argmax,
)

VOCAB = 2048


def reference_keep(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """[B, V] bool: the tokens top-k and top-p keep, from a float64 full sort."""
    keep = np.ones_like(logits, bool)
    for row, x in enumerate(logits.astype(np.float64)):
        order = np.argsort(-x)
        if top_k > 0:
            keep[row, order[top_k:]] = False
        if top_p < 1:
            probs = np.exp(x[order] - x.max())
            probs /= probs.sum()
            outside = (np.cumsum(probs) - probs) >= top_p
            keep[row, order[outside]] = False
    return keep


def random_logits(rows: int, scale: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(rows, VOCAB)) * scale).astype(
        np.float32
    )


@pytest.mark.parametrize(
    "top_k, top_p, scale",
    [
        (10, 1.0, 3.0),  # top-k within the candidates
        (0, 0.5, 3.0),  # a peaked nucleus: within the candidates
        (0, 0.9, 0.1),  # a flat nucleus: needs the full sort
        (CANDIDATES + 300, 1.0, 1.0),  # top-k beyond the candidates
        (40, 0.95, 0.1),  # both: top-k bounds a wide nucleus
    ],
)
def test_thresholds_equal_a_full_sort(top_k, top_p, scale):
    logits = random_logits(8, scale, seed=top_k)
    kept = _filter_top_k_top_p(
        jnp.asarray(logits), jnp.int32(top_k), jnp.float32(top_p)
    )
    np.testing.assert_array_equal(
        np.isfinite(np.asarray(kept)), reference_keep(logits, top_k, top_p)
    )


def test_a_row_needing_the_full_sort_does_not_change_the_others():
    peaked, flat = random_logits(1, 3.0, 0), random_logits(1, 0.1, 1)
    top_k, top_p = jnp.int32(0), jnp.float32(0.9)
    alone = _filter_top_k_top_p(jnp.asarray(np.repeat(peaked, 4, 0)), top_k, top_p)
    mixed = _filter_top_k_top_p(
        jnp.asarray(np.concatenate([peaked, flat, flat, flat])), top_k, top_p
    )
    np.testing.assert_array_equal(np.asarray(alone[0]), np.asarray(mixed[0]))
    assert np.isfinite(np.asarray(mixed[1])).sum() > CANDIDATES  # the full sort ran


def test_greedy_choice_and_its_log_probability():
    logits = jnp.asarray(random_logits(4, 3.0, 2))
    keys = jax.vmap(jax.random.key)(jnp.arange(4))
    chosen, logprob = choose_tokens(
        logits, keys, jnp.float32(0), jnp.int32(0), jnp.float32(1)
    )
    np.testing.assert_array_equal(chosen, np.argmax(np.asarray(logits), axis=-1))
    expected = jax.nn.log_softmax(logits)[jnp.arange(4), chosen]
    np.testing.assert_allclose(logprob, expected, atol=1e-5)


@pytest.mark.parametrize("vocab", [4 * ARGMAX_CHUNK, 4 * ARGMAX_CHUNK + 3])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_chunked_max_and_argmax_are_numpys_ties_included(vocab, dtype):
    rng = np.random.default_rng(vocab)
    # Few distinct values, so maxima tie within a chunk and across chunks.
    logits = rng.integers(0, 6, size=(64, vocab)).astype(np.float32)
    logits[0, :] = 1.0  # every token ties: the first wins
    logits[1, [ARGMAX_CHUNK - 1, ARGMAX_CHUNK]] = 9.0  # a tie across a chunk edge
    logits[2, -1] = 9.0  # the maximum is the last token
    logits = jnp.asarray(logits, dtype)
    maxima = chunk_maxima(logits)
    assert (maxima is None) == bool(vocab % ARGMAX_CHUNK)
    expected = np.asarray(logits, np.float32)
    np.testing.assert_array_equal(
        first_argmax(logits, maxima), np.argmax(expected, axis=-1)
    )
    if maxima is not None:
        np.testing.assert_array_equal(jnp.max(maxima, axis=-1), expected.max(axis=-1))


def test_sampled_tokens_stay_inside_the_filtered_set():
    logits = jnp.asarray(random_logits(4, 1.0, 3))
    keys = jax.vmap(jax.random.key)(jnp.arange(4))
    keep = reference_keep(np.asarray(logits), 5, 1.0)
    for draw in range(8):
        chosen, logprob = choose_tokens(
            logits,
            jax.vmap(jax.random.fold_in)(keys, jnp.full((4,), draw)),
            jnp.float32(1.5),
            jnp.int32(5),
            jnp.float32(1),
        )
        assert keep[np.arange(4), np.asarray(chosen)].all()
        expected = jax.nn.log_softmax(logits)[jnp.arange(4), chosen]
        np.testing.assert_allclose(logprob, expected, atol=1e-5)
