"""The key/value cache and the attention masks derived from it.

Token number c of a row (its write cursor) lives in slot c of the global
layers' cache and in slot c mod R of the sliding-window layers' cache, a
ring buffer of R slots: a local layer never looks further back than its
window W, so it keeps R = W slots (rounded up to whole chunks when a call
writes T tokens at once; see `ring_slots`). For gemma3-1b at 256 + 768
tokens that halves 22 of its 26 layers.

Each of the two slot tables records, per slot, the token position used
for RoPE and whether the slot holds a real key. Masks come from those two
arrays alone, never from token ids or slot indices, so padding never leaks
into attention and the window is measured in token positions (measuring it
in slots was the bug that widened it by the number of left pads):

- a query sees a key if the key is valid and not later than the query
  (k_pos <= q_pos; valid slots of a row hold increasing positions);
- sliding-window layers also require q_pos - k_pos < sliding_window.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from gsm8k_jax.models.gemma3.config import AttentionType, Gemma3Config


@flax.struct.dataclass
class SlotTable:
    """Position and validity of every slot of one cache layout."""

    positions: jax.Array  # [B, L] int32
    valid: jax.Array  # [B, L] bool; True once a real token was written

    @property
    def length(self) -> int:
        return self.positions.shape[1]

    def extend(self, positions: jax.Array, valid: jax.Array) -> "SlotTable":
        """This table followed by T more slots ([B, T] positions, validity)."""
        return SlotTable(
            positions=jnp.concatenate([self.positions, positions.astype(jnp.int32)], 1),
            valid=jnp.concatenate([self.valid, valid], 1),
        )

    def write(self, positions: jax.Array, valid: jax.Array, slots: jax.Array):
        """Records T new tokens at slots [slots[b], +T) of each row b."""
        return SlotTable(
            positions=write_rows(self.positions, positions.astype(jnp.int32), slots),
            valid=write_rows(self.valid, valid, slots),
        )


@flax.struct.dataclass
class RowWindow:
    """The rows of a cache that one decode tile runs on, addressed in place.

    The rows are [start, start + size) of each of `shards` equal blocks of
    the cache's rows (one block per data shard). A decode step reads its key
    blocks and writes its one new token straight in the full arrays: slicing
    a tile's cache out and back would copy all of it at every step.
    """

    start: jax.Array  # int32 scalar
    size: int = flax.struct.field(pytree_node=False)
    shards: int = flax.struct.field(pytree_node=False)

    def _blocks(self, x: jax.Array) -> jax.Array:
        """[B, ...] -> [shards, B / shards, ...]."""
        return x.reshape(self.shards, -1, *x.shape[1:])

    def take(self, x: jax.Array, start: jax.Array, length: int) -> jax.Array:
        """The window's rows of x[:, start : start + length]: [R, length, ...]
        from [B, S, ...], R = shards * size."""
        index = (0, self.start, start) + (0,) * (x.ndim - 2)
        sizes = (self.shards, self.size, length, *x.shape[2:])
        block = jax.lax.dynamic_slice(self._blocks(x), index, sizes)
        return block.reshape(self.shards * self.size, length, *x.shape[2:])

    def put(self, x: jax.Array, update: jax.Array, slots: jax.Array) -> jax.Array:
        """x[row r, slots[r]] = update[r] for the window's rows r, in place.

        x: [B, S, ...]; update: [R, 1, ...] (one token per row); slots: [R].
        One scatter over absolute rows: a scatter vmapped over the shards'
        blocks made XLA:CPU re-lay out and copy the whole cache every step.
        """
        if update.shape[1] != 1:
            raise ValueError(
                f"A decode tile writes one token per row, got {update.shape[1]}."
            )
        per_shard = x.shape[0] // self.shards
        rows = (
            jnp.arange(self.shards)[:, None] * per_shard
            + self.start
            + jnp.arange(self.size)[None, :]
        ).reshape(-1)
        return x.at[rows, slots].set(update[:, 0].astype(x.dtype))


@flax.struct.dataclass
class SlotRows:
    """Any rows of a cache (a prefill group's slots), addressed in place.

    A prefill chunk reads its key blocks and writes its tokens straight in
    the full arrays: taking the rows out and putting them back would copy
    every layer's whole rows at every chunk.
    """

    index: jax.Array  # [G] int32 rows; out of range: reads clip, writes drop

    def take(self, x: jax.Array, start: jax.Array, length: int) -> jax.Array:
        """x[index, start : start + length]: [G, length, ...] from [B, S, ...]."""
        columns = start + jnp.arange(length)
        return x.at[self.index[:, None], columns[None, :]].get(mode="clip")

    def gather(self, x: jax.Array) -> jax.Array:
        """x's rows: [G, S, ...] from [B, S, ...] (a copy)."""
        return jnp.take(x, self.index, axis=0, mode="clip")

    def scatter(self, x: jax.Array, rows: jax.Array) -> jax.Array:
        """x with its rows replaced by `rows` ([G, S, ...], from `gather`)."""
        return x.at[self.index].set(rows.astype(x.dtype), mode="drop")

    def put(self, x: jax.Array, update: jax.Array, slots: jax.Array) -> jax.Array:
        """x[index[g], slots[g] : slots[g] + T] = update[g]; update: [G, T, ...]."""
        columns = slots[:, None] + jnp.arange(update.shape[1])
        return x.at[self.index[:, None], columns].set(
            update.astype(x.dtype), mode="drop"
        )


@flax.struct.dataclass
class KVCache:
    """Per-layer keys and values, and the slot tables they are indexed by.

    k, v: one [B, L, K, H] array per layer, where L is the length of the
    layer's table: `full` for global layers, `window` for sliding ones.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    full: SlotTable  # [B, S]: one slot per token
    window: SlotTable  # [B, ring_slots(sliding_window, chunk)]: a ring buffer
    # None: k and v have the tables' rows. Else a view of some rows (a
    # decode tile's, a prefill group's): the tables are those R rows, k and
    # v the whole cache's B rows, of which `rows` says which are the view's.
    rows: RowWindow | SlotRows | None = None

    @classmethod
    def empty(
        cls,
        config: Gemma3Config,
        batch_size: int,
        length: int,
        dtype: jnp.dtype,
        *,
        chunk: int = 1,
    ) -> "KVCache":
        """A cache for `length` tokens per row, written `chunk` tokens per
        call at most (see `ring_slots`). The sliding layers keep their ring
        even when it is longer than `length`: their keys then sit in the
        same slots, and are reduced over in the same blocks, whatever the
        cache's length."""
        window = ring_slots(config.sliding_window, chunk)
        table = lambda n: SlotTable(
            positions=jnp.zeros((batch_size, n), jnp.int32),
            valid=jnp.zeros((batch_size, n), bool),
        )
        lengths = [
            window if t == AttentionType.LOCAL_SLIDING else length
            for t in config.layer_types
        ]
        zeros = lambda: tuple(
            jnp.zeros((batch_size, n, config.num_kv_heads, config.head_dim), dtype)
            for n in lengths
        )
        return cls(k=zeros(), v=zeros(), full=table(length), window=table(window))

    def table(self, attention_type: AttentionType) -> SlotTable:
        if attention_type == AttentionType.LOCAL_SLIDING:
            return self.window
        return self.full

    def write_slots(
        self, attention_type: AttentionType, cursors: jax.Array
    ) -> jax.Array:
        """[B] slots of the tokens at write cursors `cursors` in one table."""
        return cursors % self.table(attention_type).length

    def write(
        self, positions: jax.Array, valid: jax.Array, cursors: jax.Array
    ) -> "KVCache":
        """Records T new tokens ([B, T] positions and validity) at `cursors`.

        T tokens go in at a cursor that is a multiple of T, into a ring of a
        whole number of T-token chunks: a chunk never wraps around. (It may
        overwrite keys its own first queries still see: they attend over the
        ring as it was before writing; see `Gemma3.__call__`.)
        """
        chunk = positions.shape[1]
        if self.window.length % chunk:
            raise ValueError(
                f"A ring of {self.window.length} slots cannot take {chunk} tokens"
                f" per call: make the cache with KVCache.empty(..., chunk={chunk})."
            )
        return self.replace(
            full=self.full.write(
                positions, valid, self.write_slots(AttentionType.GLOBAL, cursors)
            ),
            window=self.window.write(
                positions,
                valid,
                self.write_slots(AttentionType.LOCAL_SLIDING, cursors),
            ),
        )

    def take_rows(self, rows: jax.Array, fresh: jax.Array) -> KVCache:
        """A view of rows `rows` ([G] indices; out-of-range ones are dropped
        when put back): their slot tables, and k and v addressed in place.
        Rows where `fresh` ([G] bool) start empty: nothing of a slot's
        previous occupant can leak into a new sequence."""
        view = SlotRows(rows)
        emptied = lambda t: SlotTable(
            positions=view.gather(t.positions),
            valid=view.gather(t.valid) & ~fresh[:, None],
        )
        return self.replace(
            full=emptied(self.full), window=emptied(self.window), rows=view
        )

    def put_rows(self, taken: KVCache) -> KVCache:
        """The cache with a view from `take_rows` put back: k and v as the
        view wrote them, the view's tables in their rows."""
        put = taken.rows.scatter
        put_table = lambda old, new: SlotTable(
            put(old.positions, new.positions), put(old.valid, new.valid)
        )
        return self.replace(
            k=taken.k,
            v=taken.v,
            full=put_table(self.full, taken.full),
            window=put_table(self.window, taken.window),
        )


def ring_slots(sliding_window: int, chunk: int = 1) -> int:
    """Slots of a sliding layer's ring written `chunk` tokens per call: the
    window rounded up to whole chunks, so that a chunk starting at a
    multiple of `chunk` never wraps around."""
    return -(-sliding_window // chunk) * chunk


def read_kv(
    layer_kv: jax.Array,
    start: jax.Array,
    length: int,
    rows: RowWindow | SlotRows | None,
) -> jax.Array:
    """Slots [start, start + length) of one layer's keys or values, for the
    rows of `rows` (None: every row): [R, length, K, H]."""
    if rows is None:
        return jax.lax.dynamic_slice_in_dim(layer_kv, start, length, axis=1)
    return rows.take(layer_kv, start, length)


def write_kv(
    layer_kv: jax.Array,
    update: jax.Array,
    slots: jax.Array,
    rows: RowWindow | SlotRows | None,
) -> jax.Array:
    """Writes T tokens' keys or values ([R, T, K, H]) at slots [slots[r], +T)
    of the rows of `rows` (None: every row) of one layer's array."""
    if rows is None:
        return write_rows(layer_kv, update, slots)
    return rows.put(layer_kv, update, slots)


def write_rows(array: jax.Array, update: jax.Array, starts: jax.Array) -> jax.Array:
    """array[b, starts[b] : starts[b] + T] = update[b] for every row b.

    array: [B, S, ...]; update: [B, T, ...]; starts: [B] (rows decode at
    different slots under continuous batching).
    """
    write = lambda a, u, s: jax.lax.dynamic_update_slice_in_dim(a, u, s, axis=0)
    return jax.vmap(write)(array, update.astype(array.dtype), starts)


def attention_masks(
    config: Gemma3Config,
    query_positions: jax.Array,
    keys: dict[AttentionType, SlotTable],
) -> dict[AttentionType, jax.Array]:
    """Boolean [B, T, L] masks for each attention type.

    query_positions: [B, T]; keys: the slot table each attention type reads.
    """
    masks = {}
    for attention_type, table in keys.items():
        distance = query_positions[:, :, None] - table.positions[:, None, :]
        mask = table.valid[:, None, :] & (distance >= 0)
        if attention_type == AttentionType.LOCAL_SLIDING:
            mask &= distance < config.sliding_window
        masks[attention_type] = mask
    return masks
