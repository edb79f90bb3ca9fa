"""The on-device programs of the sampler: prefill into slots, and decode.

The batch is a set of B slots (continuous batching). `prefill` runs a
group of new prompts and installs them into free slots; `decode` advances
every live slot one token at a time inside a `lax.while_loop` and returns
when a slot frees up (so the host can refill it) or when all are done.
Each slot keeps its own write cursor, position and generation step, so a
sequence's computation never depends on what shares the batch with it.

Both are pure functions of (model state, decode state, settings): whatever
may change between calls is an argument, never a stale jit constant.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
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


@flax.struct.dataclass
class DecodeState:
    """Everything about the B slots that lives on device between calls."""

    cache: KVCache  # S = prompt width + max_steps tokens per slot
    logits: jax.Array  # [B, V] float32: distribution of each slot's next token
    positions: jax.Array  # [B] RoPE position of the next token
    cursor: jax.Array  # [B] write cursor of the next token (see KVCache)
    keys: jax.Array  # [B] PRNG key of the sequence in the slot
    done: jax.Array  # [B] bool; empty slots are done
    tokens: jax.Array  # [B, max_steps] int32 generated ids, pad after the end
    num_tokens: jax.Array  # [B] int32 generated so far (including an eos)
    limit: jax.Array  # [B] int32 most tokens the sequence may generate
    hit_eos: jax.Array  # [B] bool: finished on an eos id (else: length)
    logprob: jax.Array  # [B] float32 sum of log p(chosen token)
    decode_steps: jax.Array  # scalar int32: decode iterations run so far

    @classmethod
    def empty(
        cls, model, batch: int, width: int, max_steps: int, pad_id: int
    ) -> "DecodeState":
        config = model.config
        return cls(
            cache=KVCache.empty(config, batch, width + max_steps, model.dtype),
            logits=jnp.zeros((batch, config.vocab_size), jnp.float32),
            positions=jnp.zeros((batch,), jnp.int32),
            cursor=jnp.zeros((batch,), jnp.int32),
            keys=jax.vmap(jax.random.key)(jnp.zeros((batch,), jnp.uint32)),
            done=jnp.ones((batch,), bool),
            tokens=jnp.full((batch, max_steps), pad_id, jnp.int32),
            num_tokens=jnp.zeros((batch,), jnp.int32),
            limit=jnp.zeros((batch,), jnp.int32),
            hit_eos=jnp.zeros((batch,), bool),
            logprob=jnp.zeros((batch,), jnp.float32),
            decode_steps=jnp.int32(0),
        )


def prompt_positions(valid: jax.Array) -> jax.Array:
    """Positions from the validity mask: cumsum(valid) - 1, pads clamped to 0."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


def prefill(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    state: DecodeState,
    tokens: jax.Array,  # [G, W] left-padded prompts
    valid: jax.Array,  # [G, W] bool
    slots: jax.Array,  # [G] target slots; an out-of-range slot drops the row
    keys: jax.Array,  # [G] PRNG keys of the new sequences
    limits: jax.Array,  # [G] most tokens each new sequence may generate
    *,
    pad_id: int,
) -> DecodeState:
    """Runs G prompts and installs them, with a fresh history, into `slots`."""
    model = nnx.merge(graphdef, params)
    group, width = tokens.shape
    positions = prompt_positions(valid)
    # Every prompt token at once: the fresh cache keeps all of them in every
    # layer; installing it into the slots keeps what each layer's table holds.
    fresh = KVCache.empty(model.config, group, width, model.dtype, ring=False)
    hidden, fresh = model(tokens, positions, valid, fresh, 0)
    # Left padding puts every prompt's last token in the last column.
    logits = model.logits(hidden[:, -1])

    set_rows = lambda full, new: full.at[slots].set(new, mode="drop")
    return state.replace(
        cache=state.cache.install_rows(slots, fresh),
        logits=set_rows(state.logits, logits),
        positions=set_rows(state.positions, positions[:, -1] + 1),
        cursor=set_rows(state.cursor, jnp.full((group,), width, jnp.int32)),
        keys=set_rows(state.keys, keys),
        done=set_rows(state.done, jnp.zeros((group,), bool)),
        tokens=set_rows(state.tokens, jnp.full((group, state.tokens.shape[1]), pad_id)),
        num_tokens=set_rows(state.num_tokens, jnp.zeros((group,), jnp.int32)),
        limit=set_rows(state.limit, limits.astype(jnp.int32)),
        hit_eos=set_rows(state.hit_eos, jnp.zeros((group,), bool)),
        logprob=set_rows(state.logprob, jnp.zeros((group,), jnp.float32)),
    )


def decode(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    state: DecodeState,
    settings: DecodeSettings,
    return_when_a_slot_frees: jax.Array,  # bool scalar: prompts are waiting
    *,
    pad_id: int,
) -> DecodeState:
    """Generates until every slot is done, or, if asked, until one finishes."""
    model = nnx.merge(graphdef, params)
    rows = jnp.arange(state.tokens.shape[0])

    def cond(carry):
        s, freed = carry
        return ~jnp.all(s.done) & ~(return_when_a_slot_frees & freed)

    def body(carry):
        s, freed = carry
        step = s.num_tokens  # [B] per-slot generation step
        step_keys = jax.vmap(jax.random.fold_in)(s.keys, step)
        chosen = choose_tokens(
            s.logits, step_keys, settings.temperature, settings.top_k, settings.top_p
        )
        logprob = jnp.take_along_axis(
            jax.nn.log_softmax(s.logits, axis=-1), chosen[:, None], axis=-1
        )[:, 0]
        live = ~s.done
        is_eos = jnp.any(chosen[:, None] == settings.eos_ids[None, :], axis=-1)
        finished = live & (is_eos | (step + 1 >= s.limit))
        hidden, cache = model(
            chosen[:, None], s.positions[:, None], live[:, None], s.cache, s.cursor
        )
        s = s.replace(
            cache=cache,
            logits=model.logits(hidden[:, 0]),
            positions=s.positions + live,
            cursor=s.cursor + live,
            done=s.done | finished,
            tokens=s.tokens.at[rows, step].set(
                jnp.where(live, chosen, pad_id), mode="drop"
            ),
            num_tokens=s.num_tokens + live,
            hit_eos=s.hit_eos | (live & is_eos),
            logprob=s.logprob + jnp.where(live, logprob, 0.0),
            decode_steps=s.decode_steps + 1,
        )
        return s, freed | jnp.any(finished)

    state, _ = jax.lax.while_loop(cond, body, (state, jnp.bool_(False)))
    return state
