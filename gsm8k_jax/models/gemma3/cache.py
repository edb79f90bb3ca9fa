"""The key/value cache and the attention masks derived from it.

Token number c of a row (its write cursor) lives in slot c of the global
layers' cache and in slot c mod W of the sliding-window layers' cache, a
ring buffer of W = sliding_window slots: a local layer never looks further
back than its window, so it never keeps more. For gemma3-1b at 256 + 768
tokens that halves 22 of its 26 layers. A prompt's left padding is dropped
when it is installed (`install_rows`): its first real token is cursor 0,
so decoding reads keys up to the row's own length, not its bucket's.

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
        per_shard = x.shape[0] // self.shards
        rows = (
            jnp.arange(self.shards)[:, None] * per_shard
            + self.start
            + jnp.arange(self.size)[None, :]
        ).reshape(-1)
        return x.at[rows, slots].set(update[:, 0].astype(x.dtype))


@flax.struct.dataclass
class KVCache:
    """Per-layer keys and values, and the slot tables they are indexed by.

    k, v: one [B, L, K, H] array per layer, where L is the length of the
    layer's table: `full` for global layers, `window` for sliding ones.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    full: SlotTable  # [B, S]: one slot per token
    window: SlotTable  # [B, min(S, sliding_window)]: a ring buffer
    # None: k and v have the tables' rows. Else a decode tile's view: the
    # tables are the tile's R rows, k and v the whole cache's B rows, of
    # which `rows` says which are the tile's.
    rows: RowWindow | None = None

    @classmethod
    def empty(
        cls,
        config: Gemma3Config,
        batch_size: int,
        length: int,
        dtype: jnp.dtype,
        *,
        ring: bool = True,
    ) -> "KVCache":
        """A cache for `length` tokens per row. ring=False keeps every token
        in the sliding layers too (for writing many tokens in one call)."""
        window = min(length, config.sliding_window) if ring else length
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

    @property
    def is_ring(self) -> bool:
        """Whether the sliding layers wrap around (hold fewer slots than tokens)."""
        return self.window.length < self.full.length

    def write_slots(
        self, attention_type: AttentionType, cursors: jax.Array
    ) -> jax.Array:
        """[B] slots of the tokens at write cursors `cursors` in one table."""
        return cursors % self.table(attention_type).length

    def write(
        self, positions: jax.Array, valid: jax.Array, cursors: jax.Array
    ) -> "KVCache":
        """Records T new tokens ([B, T] positions and validity) at `cursors`."""
        if self.is_ring and positions.shape[1] != 1:
            raise ValueError(
                f"A ring-buffer cache takes one token per call, got"
                f" {positions.shape[1]}: write prompts into a cache made with"
                " KVCache.empty(..., ring=False) and install it with"
                " `install_rows`."
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

    def install_rows(self, rows: jax.Array, fresh: "KVCache") -> "KVCache":
        """Replaces rows `rows` ([G]; out-of-range rows are dropped) with the
        G rows of `fresh`, a ring=False cache holding their first T tokens,
        left-padded: the columns before a row's first valid one
        (`fresh.full.valid`) are dropped, so its first real token becomes
        cursor 0.

        Every slot past the new tokens becomes invalid: nothing of a row's
        previous occupant can leak into the new sequence.
        """
        if fresh.is_ring:
            raise ValueError("install_rows takes a cache made with ring=False.")
        lengths = jnp.sum(fresh.full.valid, axis=1, dtype=jnp.int32)  # [G]
        pads = fresh.full.length - lengths  # [G] leading padding

        def arrange(new: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
            """[G, T, ...] fresh columns -> [G, length, ...] slots, and which
            slots hold a token ([G, length])."""
            source, present = _ring_layout(lengths, length)
            columns = source + pads[:, None]
            return jax.vmap(lambda x, c: jnp.take(x, c, axis=0))(new, columns), present

        def set_rows(old: jax.Array, new: jax.Array) -> jax.Array:
            return old.at[rows].set(new.astype(old.dtype), mode="drop")

        def install_table(old: SlotTable, new: SlotTable) -> SlotTable:
            positions, _ = arrange(new.positions, old.length)
            valid, present = arrange(new.valid, old.length)
            return SlotTable(
                set_rows(old.positions, positions), set_rows(old.valid, valid & present)
            )

        install = lambda old, new: set_rows(old, arrange(new, old.shape[1])[0])
        return self.replace(
            k=tuple(map(install, self.k, fresh.k)),
            v=tuple(map(install, self.v, fresh.v)),
            full=install_table(self.full, fresh.full),
            window=install_table(self.window, fresh.window),
        )


def _ring_layout(tokens: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
    """Where the first `tokens` cursors ([...] int) land in a ring of
    `length` slots (slot = cursor mod L).

    Returns, per slot ([..., L]), the cursor of the latest token stored
    there (clamped to 0 where none is) and whether one is. For L >= T that
    is cursor = slot for the first T slots; for L < T only the last L
    tokens remain.
    """
    slots = jnp.arange(length)
    tokens = jnp.asarray(tokens, jnp.int32)[..., None]
    source = tokens - 1 - (tokens - 1 - slots) % length
    return jnp.maximum(source, 0), source >= 0


def read_kv(
    layer_kv: jax.Array, start: jax.Array, length: int, rows: RowWindow | None
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
    rows: RowWindow | None,
) -> jax.Array:
    """Writes T tokens' keys or values ([R, T, K, H]) at slots [slots[r], +T)
    of the rows of `rows` (None: every row) of one layer's array."""
    if rows is None:
        return write_rows(layer_kv, update, slots)
    if update.shape[1] != 1:
        raise ValueError(f"A decode tile writes one token per row, got {update.shape[1]}.")
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
