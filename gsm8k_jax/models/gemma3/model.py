"""Gemma 3 text model in Flax NNX.

Module tree (Tunix-compatible names, which LoRA checkpoints refer to):

    embedder/input_embedding                          [V, D]
    layers/{i}/pre_attention_norm/scale               [D]
    layers/{i}/attn/q_einsum/w                        [N, D, H]
    layers/{i}/attn/kv_einsum/w                       [2, K, D, H]
    layers/{i}/attn/_query_norm/scale, _key_norm/scale  [H]
    layers/{i}/attn/attn_vec_einsum/w                 [N, H, D]
    layers/{i}/post_attention_norm/scale              [D]
    layers/{i}/pre_ffw_norm/scale                     [D]
    layers/{i}/mlp/{gate_proj,up_proj}/kernel         [D, F]
    layers/{i}/mlp/down_proj/kernel                   [F, D]
    layers/{i}/post_ffw_norm/scale                    [D]
    final_norm/scale                                  [D]
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from gsm8k_jax.models.gemma3.cache import (
    KVCache,
    SlotTable,
    attention_masks,
    write_rows,
)
from gsm8k_jax.models.gemma3.config import AttentionType, Gemma3Config
from gsm8k_jax.models.gemma3.modules import Einsum, Embedder, RMSNorm, apply_rope

# Keys are reduced over in blocks of at most this many slots (see blocked_attention).
KEY_BLOCK = 128


def key_block(num_slots: int) -> int:
    """Block size for a key axis of `num_slots`: a divisor of KEY_BLOCK, so a
    cache of any multiple of KEY_BLOCK slots splits into the same blocks."""
    return math.gcd(num_slots, KEY_BLOCK)


def blocked_attention(
    q: jax.Array,  # [B, T, K, G, H] queries, scaled
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    mask: jax.Array,  # [B, T, S] bool
    *,
    softcap: float | None = None,
) -> jax.Array:
    """softmax(q.k) . v over the valid keys, bitwise independent of S.

    The key axis is cut into fixed blocks; each block's scores, exponentials
    and partial sums have one shape whatever S is, and the block partials
    are added left to right. Slots past a row's last key add exact zeros, so
    a row's result is the same bits in a cache of any length (a longer
    prompt elsewhere in the run, a resumed run) and in any batch.
    Returns [B, T, K, G, H] in float32; fully masked rows give zeros.
    """
    b, s, kh, h = k.shape
    block = key_block(s)
    blocks = s // block
    k = k.reshape(b, blocks, block, kh, h).astype(q.dtype)
    v = v.reshape(b, blocks, block, kh, h)
    scores = jnp.einsum(
        "BTKGH,BNSKH->BNKGTS", q, k, preferred_element_type=jnp.float32
    )
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    t = mask.shape[1]
    mask = mask.reshape(b, t, blocks, block).transpose(0, 2, 1, 3)[:, :, None, None]
    scores = jnp.where(mask, scores, -jnp.inf)  # mask: [B, N, 1, 1, T, S]
    top = jnp.max(scores, axis=(1, 5), keepdims=True)  # max is exact in any order
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.where(mask, jnp.exp(scores - top), 0.0)  # [B, N, K, G, T, S]
    partial_sums = jnp.sum(weights, axis=-1)  # [B, N, K, G, T]
    partial_out = jnp.einsum(
        "BNKGTS,BNSKH->BNTKGH",
        weights.astype(v.dtype),
        v,
        preferred_element_type=jnp.float32,
    )
    total, out = partial_sums[:, 0], partial_out[:, 0]
    for n in range(1, blocks):  # left to right: trailing zero blocks are exact no-ops
        total, out = total + partial_sums[:, n], out + partial_out[:, n]
    total = jnp.moveaxis(total, -1, 1)[..., None]  # [B, T, K, G, 1]
    return out / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)


class Attention(nnx.Module):
    """Multi-query / grouped-query attention with q/k RMSNorm and RoPE."""

    def __init__(
        self,
        config: Gemma3Config,
        attention_type: AttentionType,
        *,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        c = config
        self.config = config
        self.attention_type = attention_type
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_einsum = Einsum(
            "BTD,NDH->BTNH", (c.num_heads, c.embed_dim, c.head_dim), **kw
        )
        self.kv_einsum = Einsum(
            "BSD,CKDH->CBSKH", (2, c.num_kv_heads, c.embed_dim, c.head_dim), **kw
        )
        self.attn_vec_einsum = Einsum(
            "BTNH,NHD->BTD", (c.num_heads, c.head_dim, c.embed_dim), **kw
        )
        self._query_norm = RMSNorm(
            c.head_dim, eps=c.rms_norm_eps, param_dtype=param_dtype
        )
        self._key_norm = RMSNorm(
            c.head_dim, eps=c.rms_norm_eps, param_dtype=param_dtype
        )
        if attention_type == AttentionType.GLOBAL:
            self.rope_base, self.rope_scale = c.global_rope_base, c.global_rope_scale
        else:
            self.rope_base, self.rope_scale = c.local_rope_base, 1.0

    def __call__(
        self,
        x: jax.Array,  # [B, T, D]
        positions: jax.Array,  # [B, T]
        mask: jax.Array,  # [B, T, S]
        cache_kv: tuple[jax.Array, jax.Array] | None,  # [B, S, K, H] each
        write_slots: jax.Array,  # [B] first cache slot written, per row
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        c = self.config
        q = self._query_norm(self.q_einsum(x))  # [B, T, N, H]
        k, v = self.kv_einsum(x)  # [B, T, K, H] each
        k = self._key_norm(k)
        q = apply_rope(q, positions, base=self.rope_base, scale=self.rope_scale)
        k = apply_rope(k, positions, base=self.rope_base, scale=self.rope_scale)
        q = q * jnp.asarray(c.query_pre_attn_scalar**-0.5, q.dtype)

        if cache_kv is not None:
            k, v = (write_rows(c, new, write_slots) for c, new in zip(cache_kv, (k, v)))
            cache_kv = (k, v)

        b, t, _, h = q.shape
        q = q.reshape(b, t, c.num_kv_heads, c.num_query_groups, h)  # [B, T, K, G, H]
        encoded = blocked_attention(q, k, v, mask, softcap=c.attn_logit_softcap)
        encoded = encoded.reshape(b, t, c.num_heads, h).astype(x.dtype)
        return self.attn_vec_einsum(encoded), cache_kv


class FeedForward(nnx.Module):
    """Gated GELU MLP: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(
        self,
        config: Gemma3Config,
        *,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = nnx.Linear(config.embed_dim, config.hidden_dim, **kw)
        self.up_proj = nnx.Linear(config.embed_dim, config.hidden_dim, **kw)
        self.down_proj = nnx.Linear(config.hidden_dim, config.embed_dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(
            jax.nn.gelu(self.gate_proj(x), approximate=True) * self.up_proj(x)
        )


class Block(nnx.Module):
    """One transformer layer with Gemma's four norms (pre and post, twice)."""

    def __init__(
        self,
        config: Gemma3Config,
        attention_type: AttentionType,
        *,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        norm = lambda: RMSNorm(
            config.embed_dim, eps=config.rms_norm_eps, param_dtype=param_dtype
        )
        self.attention_type = attention_type
        self.pre_attention_norm = norm()
        self.attn = Attention(
            config, attention_type, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.post_attention_norm = norm()
        self.pre_ffw_norm = norm()
        self.mlp = FeedForward(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_ffw_norm = norm()

    def __call__(self, x, positions, mask, cache_kv, write_slots):
        attn_out, cache_kv = self.attn(
            self.pre_attention_norm(x), positions, mask, cache_kv, write_slots
        )
        x = x + self.post_attention_norm(attn_out)
        x = x + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x)))
        return x, cache_kv


class Gemma3(nnx.Module):
    """Gemma 3 decoder. `__call__` returns final hidden states; `logits` projects them.

    Keeping the vocabulary projection separate lets the sampler compute logits
    only where it needs them (never a [B, T, V] float32 tensor in prefill).
    """

    def __init__(
        self,
        config: Gemma3Config,
        *,
        dtype: jnp.dtype = jnp.bfloat16,
        param_dtype: jnp.dtype = jnp.bfloat16,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = dtype
        self.embedder = Embedder(
            config.vocab_size,
            config.embed_dim,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.layers = nnx.List(
            Block(config, t, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for t in config.layer_types
        )
        self.final_norm = RMSNorm(
            config.embed_dim, eps=config.rms_norm_eps, param_dtype=param_dtype
        )

    def __call__(
        self,
        tokens: jax.Array,  # [B, T] int
        positions: jax.Array,  # [B, T] int, RoPE positions
        valid: jax.Array,  # [B, T] bool, False for padding
        cache: KVCache | None = None,
        cache_index: jax.Array | int = 0,
    ) -> tuple[jax.Array, KVCache | None]:
        """Runs T tokens; with a cache, row b's tokens are written at write
        cursors [cache_index[b], +T) (a scalar applies to all rows; see
        `cache.py` for where a cursor lands in each layer) and attend over
        the cache. Returns ([B, T, D] hidden, cache)."""
        b, _ = tokens.shape
        cursors = jnp.broadcast_to(jnp.asarray(cache_index, jnp.int32), (b,))
        if cache is None:
            keys = {t: SlotTable(positions, valid) for t in AttentionType}
            write_slots = {t: cursors for t in AttentionType}  # nothing is written
        else:
            cache = cache.write(positions, valid, cursors)
            keys = {t: cache.table(t) for t in AttentionType}
            write_slots = {t: cache.write_slots(t, cursors) for t in AttentionType}
        masks = attention_masks(self.config, positions, keys)

        x = self.embedder.encode(tokens)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            kind = layer.attention_type
            layer_kv = None if cache is None else (cache.k[i], cache.v[i])
            x, layer_kv = layer(x, positions, masks[kind], layer_kv, write_slots[kind])
            if layer_kv is not None:
                new_k.append(layer_kv[0])
                new_v.append(layer_kv[1])
        if cache is not None:
            cache = cache.replace(k=tuple(new_k), v=tuple(new_v))
        return self.final_norm(x), cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[..., D] hidden -> [..., V] float32 logits."""
        logits = self.embedder.decode(hidden).astype(jnp.float32)
        cap = self.config.final_logit_softcap
        return logits if cap is None else jnp.tanh(logits / cap) * cap
