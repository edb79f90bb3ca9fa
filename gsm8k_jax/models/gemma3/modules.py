"""Small building blocks of Gemma 3: RMSNorm, Einsum, the embedder and RoPE.

Parameter names follow Tunix's Gemma 3 (`scale`, `w`, `input_embedding`), so
that LoRA checkpoints written by Tunix map onto this model with no renaming.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
    """x * rsqrt(mean(x^2) + eps) * (1 + scale); the scale is stored zero-centred.

    Computed in float32 whatever the activation dtype, as the reference does.
    """

    def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype):
        self.scale = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(
            jnp.mean(x32**2, axis=-1, keepdims=True) + self.eps
        )
        return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


class Einsum(nnx.Module):
    """A weight applied with a fixed einsum equation (`y = einsum(eq, x, w)`).

    The weight is the einsum's second operand, which is what qwix's LoRA
    provider intercepts to attach `w_lora_a` / `w_lora_b`.
    """

    def __init__(
        self,
        equation: str,
        shape: tuple[int, ...],
        *,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.equation = equation
        self.dtype = dtype
        init = nnx.initializers.normal(stddev=0.02)
        self.w = nnx.Param(init(rngs.params(), shape, param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Computed in the wider of the activation and weight dtypes (a
        float32 weight, such as a LoRA merged in float32, keeps its
        precision), returned in the activation dtype."""
        w = self.w[...]
        compute = jnp.promote_types(self.dtype, w.dtype)
        y = jnp.einsum(self.equation, x.astype(compute), w.astype(compute))
        return y.astype(self.dtype)


class Embedder(nnx.Module):
    """Token embedding, tied with the output projection."""

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        *,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.normal(stddev=0.02)
        self.input_embedding = nnx.Param(
            init(rngs.params(), (vocab_size, embed_dim), param_dtype)
        )
        self.dtype = dtype

    def encode(self, tokens: jax.Array) -> jax.Array:
        """[B, T] ids -> [B, T, D], scaled by sqrt(D) in the activation dtype."""
        table = self.input_embedding[...]
        x = table[tokens].astype(self.dtype)
        return x * jnp.sqrt(jnp.float32(table.shape[1])).astype(self.dtype)

    def decode(self, x: jax.Array) -> jax.Array:
        """[..., D] -> [..., V] logits with the transposed embedding."""
        table = self.input_embedding[...].astype(self.dtype)
        return jnp.einsum("...D,VD->...V", x.astype(self.dtype), table)


def apply_rope(
    x: jax.Array, positions: jax.Array, *, base: float, scale: float = 1.0
) -> jax.Array:
    """Rotary embedding, split-half layout (first half pairs with second half).

    x: [B, T, N, H]; positions: [B, T] token positions (never cache slots).
    `scale` is linear RoPE scaling: positions are divided by it.
    """
    head_dim = x.shape[-1]
    fraction = 2 * jnp.arange(head_dim // 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (base**fraction)  # [H/2]
    angles = (positions.astype(jnp.float32) / scale)[
        ..., None
    ] * inv_freq  # [B, T, H/2]
    sin = jnp.sin(angles)[:, :, None, :]  # [B, T, 1, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate(
        [first * cos - second * sin, second * cos + first * sin], axis=-1
    )
    return rotated.astype(x.dtype)
