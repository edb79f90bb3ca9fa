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
        precision), accumulated in float32 and rounded once to the
        activation dtype; the update of a LoRA attached (`lora`) joins the
        accumulator before that rounding."""
        w = self.w[...]
        compute = jnp.promote_types(self.dtype, w.dtype)
        x = x.astype(compute)
        y = jnp.einsum(
            self.equation, x, w.astype(compute), preferred_element_type=jnp.float32
        )
        if (lora := getattr(self, LORA_ATTRIBUTE, None)) is not None:
            y = y + lora(x)
        return y.astype(self.dtype)


# The attribute of an `Einsum` or `nnx.Linear` that holds its `LoraAdapter`.
LORA_ATTRIBUTE = "lora"


class LoraFactor(nnx.Variable):
    """A LoRA factor attached for inference (not qwix's trainable LoRAParam:
    filters for either kind of parameter leave it out)."""


def lora_axes(equation: str) -> tuple[str, str, str]:
    """(weight axes, a's axes, b's axes) of a LoRA on the weight of the
    `x,w->y` einsum `equation`: a holds the weight's axes that the input
    shares (then the rank), b the others (after the rank), in the weight's
    order, as qwix creates them."""
    x_axes, rest = equation.split(",")
    w_axes = rest.split("->")[0]
    shared = "".join(c for c in w_axes if c in x_axes)
    return w_axes, shared, "".join(c for c in w_axes if c not in shared)


class LoraAdapter(nnx.Module):
    """A LoRA update kept beside its weight: (x . a . b) * scale in float32.

    `a` holds the weight's axes that the layer input shares, then the rank;
    `b` the rank, then the weight's other axes (qwix's and Tunix's layout).
    The layer adds the update to its float32 accumulator and rounds once, so
    the base weights keep their dtype and bytes, an update far below the
    resolution of a bfloat16 weight still counts, and zero factors give the
    base layer's bits (its matmul already accumulates in float32).
    """

    def __init__(self, equation: str, a: jax.Array, b: jax.Array, scale: float):
        """equation: the layer's `x,w->y` einsum (e.g. `BTD,NDH->BTNH`)."""
        if "r" in equation:  # The rank's letter.
            raise ValueError(f"No LoRA layout for the einsum {equation!r}.")
        x_axes, y_axes = equation.split(",")[0], equation.split("->")[1]
        _, shared, others = lora_axes(equation)
        kept = "".join(c for c in x_axes if c not in shared)
        self.down_equation = f"{x_axes},{shared}r->{kept}r"  # x . a
        self.up_equation = f"{kept}r,r{others}->{y_axes}"  # (x . a) . b
        self.a = LoraFactor(a)
        self.b = LoraFactor(b)
        self.scale = scale

    def __call__(self, x: jax.Array) -> jax.Array:
        """The update to the layer's output, in float32."""
        down = jnp.einsum(
            self.down_equation, x, self.a[...], preferred_element_type=jnp.float32
        )
        b = self.b[...].astype(jnp.float32)
        return jnp.einsum(self.up_equation, down, b) * jnp.float32(self.scale)


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
