"""The on-device generation program: prefill, then a lax.while_loop decode.

Pure function of (model state, prompt batch, settings): everything that may
change between calls is an argument, so no value survives as a stale jit
constant. Shapes (batch, prompt bucket, generation budget) are the only
compile-time keys.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gsm8k_jax.models.gemma3.cache import KVCache
from gsm8k_jax.sampling.token_choice import choose_tokens


class DecodeSettings(NamedTuple):
    """Traced per-call settings."""

    eos_ids: jax.Array  # [E] int32, padded with -1
    temperature: jax.Array  # scalar float32; 0 = greedy
    top_k: jax.Array  # scalar int32; 0 = off
    top_p: jax.Array  # scalar float32; 1 = off


class DecodeOutput(NamedTuple):
    tokens: jax.Array  # [B, max_steps] int32; pad after a row's eos
    num_tokens: jax.Array  # [B] int32, generated tokens including the eos
    hit_eos: jax.Array  # [B] bool: finished on an eos id (else: length)
    logprob: jax.Array  # [B] float32, sum of log p(chosen token)


class _LoopState(NamedTuple):
    step: jax.Array
    cache: KVCache
    logits: jax.Array  # [B, V] for the token about to be chosen
    positions: jax.Array  # [B] position of that token
    done: jax.Array  # [B]
    out: DecodeOutput


def prompt_positions(valid: jax.Array) -> jax.Array:
    """Positions from the validity mask: cumsum(valid) - 1, pads clamped to 0."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


def generate(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens: jax.Array,  # [B, T] left-padded prompts
    valid: jax.Array,  # [B, T] bool
    row_keys: jax.Array,  # [B] PRNG keys, one per (example, sample)
    settings: DecodeSettings,
    *,
    max_steps: int,
    pad_id: int,
) -> DecodeOutput:
    model = nnx.merge(graphdef, state)
    batch, prompt_len = tokens.shape
    positions = prompt_positions(valid)
    cache = KVCache.empty(model.config, batch, prompt_len + max_steps, model.dtype)
    hidden, cache = model(tokens, positions, valid, cache, 0)
    # Left padding puts every row's last prompt token in the last slot.
    logits = model.logits(hidden[:, -1])

    def cond(s: _LoopState):
        return (s.step < max_steps) & ~jnp.all(s.done)

    def body(s: _LoopState) -> _LoopState:
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, s.step)
        chosen = choose_tokens(
            s.logits, step_keys, settings.temperature, settings.top_k, settings.top_p
        )
        logprob = jnp.take_along_axis(
            jax.nn.log_softmax(s.logits, axis=-1), chosen[:, None], axis=-1
        )[:, 0]
        live = ~s.done
        is_eos = jnp.any(chosen[:, None] == settings.eos_ids[None, :], axis=-1)
        out = DecodeOutput(
            tokens=s.out.tokens.at[:, s.step].set(jnp.where(live, chosen, pad_id)),
            num_tokens=s.out.num_tokens + live,
            hit_eos=s.out.hit_eos | (live & is_eos),
            logprob=s.out.logprob + jnp.where(live, logprob, 0.0),
        )
        hidden, cache = model(
            chosen[:, None],
            s.positions[:, None],
            jnp.ones((batch, 1), bool),
            s.cache,
            prompt_len + s.step,
        )
        return _LoopState(
            step=s.step + 1,
            cache=cache,
            logits=model.logits(hidden[:, 0]),
            positions=s.positions + 1,
            done=s.done | is_eos,
            out=out,
        )

    init = _LoopState(
        step=jnp.int32(0),
        cache=cache,
        logits=logits,
        positions=positions[:, -1] + 1,
        done=jnp.zeros((batch,), bool),
        out=DecodeOutput(
            tokens=jnp.full((batch, max_steps), pad_id, jnp.int32),
            num_tokens=jnp.zeros((batch,), jnp.int32),
            hit_eos=jnp.zeros((batch,), bool),
            logprob=jnp.zeros((batch,), jnp.float32),
        ),
    )
    return jax.lax.while_loop(cond, body, init).out
