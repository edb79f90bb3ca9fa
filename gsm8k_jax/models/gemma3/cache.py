"""The key/value cache and the attention masks derived from it.

The cache records, for every slot, the token position used for RoPE and
whether the slot holds a real key. Masks are built from those two arrays
alone, never from token ids, so padding can never leak into attention:

- a query sees a key only if the key is valid and its slot is not later
  than the query's slot (causal in slots, which is causal in positions
  because valid slots hold increasing positions);
- sliding-window layers also require q_pos - k_pos < window, comparing
  token positions with token positions (never with slot indices, which is
  the bug that widened the window by the number of left pads).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from gsm8k_jax.models.gemma3.config import AttentionType, Gemma3Config


@flax.struct.dataclass
class KVCache:
    """Per-layer keys and values, and per-slot positions and validity.

    k, v: one [B, S, K, H] array per layer. positions: [B, S] int32.
    valid: [B, S] bool; a slot is valid once a real token was written to it.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    positions: jax.Array
    valid: jax.Array

    @classmethod
    def empty(
        cls, config: Gemma3Config, batch_size: int, length: int, dtype: jnp.dtype
    ) -> "KVCache":
        shape = (batch_size, length, config.num_kv_heads, config.head_dim)
        zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
        return cls(
            k=zeros(),
            v=zeros(),
            positions=jnp.zeros((batch_size, length), jnp.int32),
            valid=jnp.zeros((batch_size, length), bool),
        )

    @property
    def length(self) -> int:
        return self.positions.shape[1]

    def write_slots(
        self, positions: jax.Array, valid: jax.Array, starts: jax.Array
    ) -> "KVCache":
        """Records positions/validity of T new tokens at slots [starts[b], +T) of each row."""
        return self.replace(
            positions=write_rows(self.positions, positions.astype(jnp.int32), starts),
            valid=write_rows(self.valid, valid, starts),
        )


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
    query_slots: jax.Array,
    key_positions: jax.Array,
    key_valid: jax.Array,
) -> dict[AttentionType, jax.Array]:
    """Boolean [B, T, S] masks for each attention type.

    query_positions, query_slots: [B, T] (positions and slots of the queries);
    key_positions, key_valid: [B, S].
    """
    key_slots = jnp.arange(key_valid.shape[1])
    causal = key_valid[:, None, :] & (
        key_slots[None, None, :] <= query_slots[:, :, None]
    )
    distance = query_positions[:, :, None] - key_positions[:, None, :]  # [B, T, S]
    return {
        AttentionType.GLOBAL: causal,
        AttentionType.LOCAL_SLIDING: causal & (distance < config.sliding_window),
    }
