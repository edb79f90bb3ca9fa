"""The on-device programs of the sampler: prefill into slots, and decode.

The batch is a set of B slots (continuous batching). `prefill` runs a
group of new prompts of one length bucket and installs them into free
slots; `decode` advances every live slot one token at a time inside a
`lax.while_loop`, a tile of slots at a time, and returns when enough slots
are free for the next prefill (so the host can refill them) or when all
are done. Each slot keeps its own write cursor, position and generation
step, and every program has a shape fixed by constants and the prompt's own
bucket, so a sequence's computation never depends, to the bit, on what
shares the batch with it.

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
from gsm8k_jax.models.gemma3.model import KEY_BLOCK
from gsm8k_jax.sampling.batching import round_up
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

    cache: KVCache  # S >= widest prompt bucket + max_steps tokens per slot
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
        # A whole number of attention key blocks: every run's cache splits
        # into the same blocks (see blocked_attention).
        length = round_up(width + max_steps, KEY_BLOCK)
        return cls(
            cache=KVCache.empty(config, batch, length, model.dtype),
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
    min_free: jax.Array,  # int32 scalar: return once this many slots are free
    num_tiles: jax.Array,  # int32 scalar: B // (row_tile * data_shards)
    *,
    pad_id: int,
    row_tile: int,
    data_shards: int = 1,
) -> DecodeState:
    """Generates until every slot is done or `min_free` slots are free.

    Each step runs the model on tiles of `row_tile` slots per data shard,
    one tile after another: every program the model runs has one shape
    whatever the batch size, so a row's arithmetic never depends on how many
    rows share the batch (XLA picks kernels by shape). Tiles whose slots are
    all done are skipped.
    """
    model = nnx.merge(graphdef, params)
    tiles_per_shard = state.done.shape[0] // (row_tile * data_shards)

    def step(s: DecodeState) -> DecodeState:
        """One token for each live slot of a tile."""
        rows = jnp.arange(s.tokens.shape[0])
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
        return s.replace(
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
        )

    def isolated_step(s: DecodeState) -> DecodeState:
        # Barriers keep XLA from fusing the step with the tile's slicing, so
        # its kernels are the same whether the batch is one tile or many.
        barrier = jax.lax.optimization_barrier
        return barrier(step(barrier(s)))

    def step_tile(j, s: DecodeState) -> DecodeState:
        tile = _rows_of_tile(s, j, tiles_per_shard, data_shards)
        tile = jax.lax.cond(jnp.all(tile.done), lambda t: t, isolated_step, tile)
        return _set_rows_of_tile(s, tile, j, tiles_per_shard, data_shards)

    def cond(s: DecodeState):
        return ~jnp.all(s.done) & (jnp.sum(s.done) < min_free)

    def body(s: DecodeState) -> DecodeState:
        # A traced trip count: XLA compiles the same loop body for one tile
        # as for many (a static loop of one would be inlined and fused
        # differently).
        s = jax.lax.fori_loop(0, num_tiles, step_tile, s)
        return s.replace(decode_steps=s.decode_steps + 1)

    return jax.lax.while_loop(cond, body, state)


def _per_slot(fn, state: DecodeState, *others: DecodeState) -> DecodeState:
    """Maps `fn` over the per-slot arrays of states (all but decode_steps)."""
    steps = state.decode_steps
    out = jax.tree.map(
        fn,
        state.replace(decode_steps=None),
        *(o.replace(decode_steps=None) for o in others),
    )
    return out.replace(decode_steps=steps)


def _rows_of_tile(
    state: DecodeState, j: jax.Array, num_tiles: int, shards: int
) -> DecodeState:
    """Tile j: rows [j*T, (j+1)*T) of every data shard's block of slots."""

    def take(x):
        blocks = x.reshape(shards, num_tiles, -1, *x.shape[1:])
        tile = jax.lax.dynamic_index_in_dim(blocks, j, axis=1, keepdims=False)
        return tile.reshape(-1, *x.shape[1:])

    return _per_slot(take, state)


def _set_rows_of_tile(
    state: DecodeState, tile: DecodeState, j: jax.Array, num_tiles: int, shards: int
) -> DecodeState:
    def put(x, t):
        blocks = x.reshape(shards, num_tiles, -1, *x.shape[1:])
        t = t.reshape(shards, -1, *x.shape[1:])
        return jax.lax.dynamic_update_index_in_dim(blocks, t, j, axis=1).reshape(
            x.shape
        )

    return _per_slot(put, state, tile)
