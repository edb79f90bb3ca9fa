"""The on-device programs of the sampler: prefill into slots, and decode.

The batch is a set of B slots (continuous batching). `prefill` runs one
chunk of the prompts of a group of free slots straight into the slots'
caches (a prompt takes as many calls as it has chunks; its last one starts
the sequence); `decode` advances every live slot one token at a time
inside a `lax.while_loop`, a tile of slots at a time, and returns when
enough slots are free for the next prefill (so the host can refill them)
or when all are done. Each slot keeps its own write cursor, position and
generation step, and every program has a shape fixed by constants, so a
sequence's computation never depends, to the bit, on what shares the
batch with it.

Both are pure functions of (model state, decode state, settings): whatever
may change between calls is an argument, never a stale jit constant.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from gsm8k_jax.models.gemma3.cache import KVCache, RowWindow
from gsm8k_jax.models.gemma3.model import KEY_BLOCK
from gsm8k_jax.models.gemma3.sharding import constrain_decode_state
from gsm8k_jax.sampling import weight_layout
from gsm8k_jax.sampling.batching import round_up
from gsm8k_jax.sampling.params import MAX_EOS_IDS, SamplingParams
from gsm8k_jax.sampling.token_choice import choose_tokens


class DecodeSettings(NamedTuple):
    """Traced per-call settings."""

    eos_ids: jax.Array  # [E] int32, padded with -1
    temperature: jax.Array  # scalar float32; 0 = greedy
    top_k: jax.Array  # scalar int32; 0 = off
    top_p: jax.Array  # scalar float32; 1 = off
    # [S, L] int32 token sequences that end a sequence once generated, each
    # right-aligned, -1 before a shorter one's first token; S = 0: none.
    stop_sequences: jax.Array


def decode_settings(
    params: SamplingParams, stop_sequences: Sequence[Sequence[int]] = ()
) -> DecodeSettings:
    """The decode settings as host arrays: a jitted call transfers them,
    where building them with jnp would compile a small program for each."""
    eos = np.full((MAX_EOS_IDS,), -1, np.int32)
    eos[: len(params.eos_ids)] = params.eos_ids
    longest = max(map(len, stop_sequences), default=0)
    stops = np.full((len(stop_sequences), longest), -1, np.int32)
    for row, sequence in zip(stops, stop_sequences):
        if not sequence or min(sequence) < 0:
            raise ValueError(
                f"A stop sequence is one or more token ids, got {list(sequence)}."
            )
        row[longest - len(sequence) :] = sequence
    return DecodeSettings(
        eos_ids=eos,
        temperature=np.float32(params.temperature),
        top_k=np.int32(params.top_k),
        top_p=np.float32(params.top_p),
        stop_sequences=stops,
    )


def ends_with_stop_sequence(
    tokens: jax.Array,  # [B, max_steps] generated ids
    last: jax.Array,  # [B] index of each row's last generated token
    stop_sequences: jax.Array,  # [S, L] as in DecodeSettings
) -> jax.Array:
    """[B] bool: whether each row's generated tokens end with one of the stop
    sequences (a row's own tokens alone decide)."""
    length = stop_sequences.shape[1]
    columns = last[:, None] - (length - 1) + jnp.arange(length)  # [B, L]
    window = jnp.take_along_axis(tokens, jnp.maximum(columns, 0), axis=1)
    # Before the first generated token nothing matches but a shorter stop's -1s.
    window = jnp.where(columns >= 0, window, -2)
    matches = (stop_sequences == -1) | (window[:, None, :] == stop_sequences)
    return jnp.any(jnp.all(matches, axis=-1), axis=-1)


@flax.struct.dataclass
class DecodeState:
    """Everything about the B slots that lives on device between calls."""

    cache: KVCache  # S >= longest padded prompt + max_steps tokens per slot
    # [B, D] final hidden state of each slot's last token: its next token's
    # logits are computed from it when needed (never a [B, V] carry).
    hidden: jax.Array
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
    # scalar int32: tiles run so far, over all iterations; each read every
    # weight once (per data shard).
    tile_steps: jax.Array

    @classmethod
    def empty(
        cls,
        model,
        batch: int,
        width: int,
        max_steps: int,
        pad_id: int,
        chunk: int,
        mesh: Mesh | None = None,
    ) -> DecodeState:
        """Slots for prompts of up to `width` tokens, prefilled `chunk` tokens
        per call, and `max_steps` generated tokens; made split over `mesh`
        where there is one (`sharding.decode_state_sharding`)."""
        # A whole number of attention key blocks: every run's cache splits
        # into the same blocks (see blocked_attention).
        length = round_up(width + max_steps, KEY_BLOCK)
        return _empty_state(
            model.config,
            jnp.dtype(model.dtype),
            batch,
            length,
            max_steps,
            pad_id,
            chunk,
            mesh,
        )


@functools.partial(jax.jit, static_argnums=range(8))
def _empty_state(
    config,
    dtype: jnp.dtype,
    batch: int,
    length: int,
    max_steps: int,
    pad_id: int,
    chunk: int,
    mesh: Mesh | None,
) -> DecodeState:
    """`DecodeState.empty` as one program: built op by op, each array would
    compile a program of its own (about 15, 50 ms apiece on CPU)."""
    state = DecodeState(
        cache=KVCache.empty(config, batch, length, dtype, chunk=chunk),
        hidden=jnp.zeros((batch, config.embed_dim), dtype),
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
        tile_steps=jnp.int32(0),
    )
    return constrain_decode_state(state, mesh)


def prompt_positions(valid: jax.Array) -> jax.Array:
    """Positions from the validity mask: cumsum(valid) - 1, pads clamped to 0."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


def sequence_keys(
    seed: jax.Array, example_ids: jax.Array, sample_indices: jax.Array
) -> jax.Array:
    """The PRNG key of sample j of example i: a function of (seed, i, j)
    alone, derived on device. [G] ids and indices -> [G] keys."""
    root = jax.random.key(seed)
    fold = lambda i, j: jax.random.fold_in(jax.random.fold_in(root, i), j)
    return jax.vmap(fold)(example_ids, sample_indices)


def prefill(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    state: DecodeState,
    tokens: jax.Array,  # [G, C] chunk `chunk_index` of each prompt (left-padded)
    pads: jax.Array,  # [G] left pads of each prompt (C for an unused row)
    chunk_index: jax.Array,  # [G] int32; chunk 0 starts its slot afresh
    last: jax.Array,  # [G] bool: the prompt's last chunk
    slots: jax.Array,  # [G] target slots; an out-of-range slot drops the row
    seed: jax.Array,  # int32 scalar
    example_ids: jax.Array,  # [G] int32: the new sequences' keys come from
    sample_indices: jax.Array,  # [G] int32   (seed, example id, sample index)
    limits: jax.Array,  # [G] most tokens each new sequence may generate
    *,
    pad_id: int,
    arranged: bool = False,
    mesh: Mesh | None = None,
) -> DecodeState:
    """Runs one chunk of C tokens of G prompts into their slots' caches.

    A prompt is left-padded to whole chunks, and chunk k goes in at write
    cursors [k*C, (k+1)*C) of its slot, attending over what the slot holds
    (so the pads of its first chunk are invalid keys at cursors the prompt
    alone decides). Rows whose last chunk this is start decoding.

    arranged: `params` are `weight_layout.arrange`d (for XLA:CPU).
    mesh: the mesh the state is split over, if any
      (`sharding.constrain_decode_state`).
    """
    model = nnx.merge(graphdef, weight_layout.view(params) if arranged else params)
    chunk = tokens.shape[1]
    cursors = chunk_index * chunk  # [G]
    columns = cursors[:, None] + jnp.arange(chunk)  # [G, C] in the padded prompt
    valid = columns >= pads[:, None]
    positions = jnp.maximum(columns - pads[:, None], 0)
    rows = state.cache.take_rows(slots, fresh=chunk_index == 0)
    hidden, rows = model(tokens, positions, valid, rows, cursors)

    starting = jnp.where(last, slots, state.done.shape[0])  # others: dropped
    set_rows = lambda full, new: full.at[starting].set(new, mode="drop")
    group = tokens.shape[0]
    new_state = state.replace(
        cache=state.cache.put_rows(rows),
        # Left padding puts every prompt's last token in the last column.
        hidden=set_rows(state.hidden, hidden[:, -1]),
        positions=set_rows(state.positions, positions[:, -1] + 1),
        cursor=set_rows(state.cursor, cursors + chunk),
        keys=set_rows(state.keys, sequence_keys(seed, example_ids, sample_indices)),
        done=set_rows(state.done, jnp.zeros((group,), bool)),
        tokens=set_rows(state.tokens, jnp.full((group, state.tokens.shape[1]), pad_id)),
        num_tokens=set_rows(state.num_tokens, jnp.zeros((group,), jnp.int32)),
        limit=set_rows(state.limit, limits.astype(jnp.int32)),
        hit_eos=set_rows(state.hit_eos, jnp.zeros((group,), bool)),
        logprob=set_rows(state.logprob, jnp.zeros((group,), jnp.float32)),
    )
    return constrain_decode_state(new_state, mesh)


def decode(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    state: DecodeState,
    settings: DecodeSettings,
    min_free: jax.Array,  # int32 scalar: return once this many slots are free
    *,
    pad_id: int,
    row_tile: int,
    data_shards: int = 1,
    arranged: bool = False,
    mesh: Mesh | None = None,
) -> DecodeState:
    """Generates until every slot is done or `min_free` slots are free.

    Each step runs the model on tiles of `row_tile` slots per data shard,
    one tile after another: every program the model runs has one shape
    whatever the batch size, so a row's arithmetic never depends on how many
    rows share the batch (XLA picks kernels by shape). A tile reads and
    writes the KV cache in place (`cache.RowWindow`), and tiles whose slots
    are all done are not run.

    arranged: `params` are `weight_layout.arrange`d (for XLA:CPU).
    mesh: the mesh the state is split over, if any
      (`sharding.constrain_decode_state`).
    """
    # The views are taken inside the loop, where XLA makes them free; taken
    # outside it, XLA would copy the weights back into the loop.
    if arranged:
        loop_model = lambda: nnx.merge(graphdef, weight_layout.view(params))
    else:
        loop_model = lambda: nnx.merge(graphdef, params)
    tiles_per_shard = state.done.shape[0] // (row_tile * data_shards)

    def step(s: DecodeState) -> DecodeState:
        """One token for each live slot of a tile."""
        model = loop_model()
        rows = jnp.arange(s.tokens.shape[0])
        step = s.num_tokens  # [B] per-slot generation step
        step_keys = jax.vmap(jax.random.fold_in)(s.keys, step)
        chosen, logprob = choose_tokens(
            model.logits(s.hidden),
            step_keys,
            settings.temperature,
            settings.top_k,
            settings.top_p,
        )
        live = ~s.done
        tokens = s.tokens.at[rows, step].set(
            jnp.where(live, chosen, pad_id), mode="drop"
        )
        is_eos = jnp.any(chosen[:, None] == settings.eos_ids[None, :], axis=-1)
        finished = live & (is_eos | (step + 1 >= s.limit))
        if settings.stop_sequences.shape[0]:  # (static: no stops, no test)
            stops = ends_with_stop_sequence(tokens, step, settings.stop_sequences)
            finished |= live & stops
        hidden, cache = model(
            chosen[:, None], s.positions[:, None], live[:, None], s.cache, s.cursor
        )
        return s.replace(
            cache=cache,
            hidden=hidden[:, 0],
            positions=s.positions + live,
            cursor=s.cursor + live,
            done=s.done | finished,
            tokens=tokens,
            num_tokens=s.num_tokens + live,
            hit_eos=s.hit_eos | (live & is_eos),
            logprob=s.logprob + jnp.where(live, logprob, 0.0),
        )

    def isolated_step(tile: DecodeState) -> DecodeState:
        # Barriers keep XLA from fusing the step with the tile's slicing, so
        # its kernels are the same whether the batch is one tile or many.
        # The cache's keys and values stay outside them: they are read and
        # written in place, never sliced.
        barrier = lambda t: _with_kv(jax.lax.optimization_barrier(_without_kv(t)), t)
        return barrier(step(barrier(tile)))

    def step_tile(j, s: DecodeState) -> DecodeState:
        tile = _tile_view(s, j, row_tile, tiles_per_shard, data_shards)
        return _merge_tile(s, isolated_step(tile), j, tiles_per_shard, data_shards)

    def cond(s: DecodeState):
        return ~jnp.all(s.done) & (jnp.sum(s.done) < min_free)

    def body(s: DecodeState) -> DecodeState:
        # Only tiles with a live slot run, in order; their count is traced,
        # so XLA compiles the same loop body for one tile as for many (a
        # static loop of one would be inlined and fused differently).
        done = s.done.reshape(data_shards, tiles_per_shard, row_tile)
        live = ~jnp.all(done, axis=(0, 2))  # [tiles]
        order = jnp.argsort(~live, stable=True)
        num_live = jnp.sum(live, dtype=jnp.int32)
        s = jax.lax.fori_loop(0, num_live, lambda i, s: step_tile(order[i], s), s)
        return s.replace(
            decode_steps=s.decode_steps + 1, tile_steps=s.tile_steps + num_live
        )

    return constrain_decode_state(jax.lax.while_loop(cond, body, state), mesh)


def _without_kv(state: DecodeState) -> DecodeState:
    """The state without the cache's per-layer keys and values."""
    return state.replace(cache=state.cache.replace(k=(), v=()))


def _with_kv(state: DecodeState, kv_from: DecodeState) -> DecodeState:
    cache = state.cache.replace(k=kv_from.cache.k, v=kv_from.cache.v)
    return state.replace(cache=cache)


def _per_slot(fn, state: DecodeState, *others: DecodeState) -> DecodeState:
    """Maps `fn` over the per-slot arrays of states (all but the step
    counters and the cache's keys and values)."""
    strip = lambda s: _without_kv(s).replace(decode_steps=None, tile_steps=None)
    out = jax.tree.map(fn, strip(state), *map(strip, others))
    counters = {"decode_steps": state.decode_steps, "tile_steps": state.tile_steps}
    return _with_kv(out.replace(**counters), state)


def _tile_view(
    state: DecodeState, j: jax.Array, row_tile: int, num_tiles: int, shards: int
) -> DecodeState:
    """Tile j: rows [j*T, (j+1)*T) of every data shard's block of slots; its
    cache keeps the whole keys and values, with a RowWindow onto the tile."""

    def take(x):
        blocks = x.reshape(shards, num_tiles, -1, *x.shape[1:])
        tile = jax.lax.dynamic_index_in_dim(blocks, j, axis=1, keepdims=False)
        return tile.reshape(-1, *x.shape[1:])

    tile = _per_slot(take, state)
    window = RowWindow(start=j * row_tile, size=row_tile, shards=shards)
    return tile.replace(cache=tile.cache.replace(rows=window))


def _merge_tile(
    state: DecodeState, tile: DecodeState, j: jax.Array, num_tiles: int, shards: int
) -> DecodeState:
    """Puts a stepped tile back: its per-slot arrays into rows of tile j, and
    its keys and values (already the whole cache's) as they are."""

    def put(x, t):
        blocks = x.reshape(shards, num_tiles, -1, *x.shape[1:])
        t = t.reshape(shards, -1, *x.shape[1:])
        return jax.lax.dynamic_update_index_in_dim(blocks, t, j, axis=1).reshape(
            x.shape
        )

    merged = _per_slot(put, state, tile.replace(cache=tile.cache.replace(rows=None)))
    return _with_kv(merged, tile)
