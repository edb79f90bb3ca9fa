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

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from gsm8k_jax.models.gemma3.cache import (
    KVCache,
    RowWindow,
    SlotRows,
    SlotTable,
    attention_masks,
    read_kv,
    write_kv,
    write_rows,
)
from gsm8k_jax.models.gemma3.config import AttentionType, Gemma3Config
from gsm8k_jax.models.gemma3.modules import (
    LORA_ATTRIBUTE,
    Einsum,
    Embedder,
    RMSNorm,
    apply_rope,
)

# Large finite negative: fully masked rows (pads) give a uniform softmax, not NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# Keys are reduced over in blocks of at most this many slots (see blocked_attention).
KEY_BLOCK = 128


def _scores(q: jax.Array, k: jax.Array, softcap: float | None) -> jax.Array:
    """[B, T, K, G, H] queries . [B, S, K, H] keys -> [B, K, G, T, S] float32."""
    scores = jnp.einsum(
        "BTKGH,BSKH->BKGTS", q, k.astype(q.dtype), preferred_element_type=jnp.float32
    )
    return scores if softcap is None else jnp.tanh(scores / softcap) * softcap


def attention(
    q: jax.Array,  # [B, T, K, G, H] queries, scaled
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    mask: jax.Array,  # [B, T, S] bool
    *,
    softcap: float | None = None,
) -> jax.Array:
    """softmax(q.k) . v over the valid keys, in one pass. [B, T, K, G, H]."""
    logits = jnp.where(mask[:, None, None, :, :], _scores(q, k, softcap), MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)


def key_block(num_slots: int) -> int:
    """Block size for a key axis of `num_slots`: a divisor of KEY_BLOCK, so a
    cache of any multiple of KEY_BLOCK slots splits into the same blocks."""
    return math.gcd(num_slots, KEY_BLOCK)


def blocked_attention(
    q: jax.Array,  # [B, T, K, G, H] queries, scaled
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    mask: jax.Array,  # [B, T, S] bool, or [B, T, S + T] with `own`
    *,
    softcap: float | None = None,
    rows: RowWindow | SlotRows | None = None,
    own: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """softmax(q.k) . v over the valid keys, bitwise independent of S.

    A loop over fixed blocks of keys with an online softmax: every block is
    computed by the same fixed-shape program, and a block with no valid key
    for a row (the unused end of a longer cache) leaves that row's running
    max, sum and output exactly as they were. So a row's result is the same
    bits in a cache of any length (a longer prompt elsewhere in the run, a
    resumed run) and in any batch, and blocks after the last valid key of
    every row are not read at all. Returns [B, T, K, G, H] in float32;
    fully masked rows give zeros.

    rows: k and v hold more rows than q (a decode tile's or a prefill
    group's view of the whole cache); each block is read from them in place.
    own: the queries' own keys and values ([B, T, K, H] each), not in k and
    v: the mask's last T columns, reduced over after the cache's blocks.
    """
    b, t, kh, g, h = q.shape
    s = k.shape[1]
    block = key_block(s)

    def reduce(carry, keys, values, valid):
        """Folds keys and values ([B, N, K, H]) into the running softmax."""
        top, total, out = carry  # [B, K, G, T], [B, K, G, T], [B, K, G, T, H]
        valid = valid[:, None, None]  # [B, 1, 1, T, N]
        scores = jnp.where(valid, _scores(q, keys, softcap), -jnp.inf)
        new_top = jnp.maximum(top, jnp.max(scores, axis=-1))
        shift = jnp.where(jnp.isfinite(new_top), new_top, 0.0)
        # exp(0) = 1 exactly when the max did not move; 0 before any valid key.
        rescale = jnp.exp(jnp.where(jnp.isfinite(top), top - shift, -jnp.inf))
        weights = jnp.where(valid, jnp.exp(scores - shift[..., None]), 0.0)
        total = total * rescale + jnp.sum(weights, axis=-1)
        out = out * rescale[..., None] + jnp.einsum(
            "BKGTS,BSKH->BKGTH",
            weights.astype(v.dtype),
            values,
            preferred_element_type=jnp.float32,
        )
        return new_top, total, out

    def step(n, carry):
        start = n * block
        keys, values = (read_kv(x, start, block, rows) for x in (k, v))
        valid = jax.lax.dynamic_slice_in_dim(mask, start, block, axis=2)
        return reduce(carry, keys, values, valid)

    init = (
        jnp.full((b, kh, g, t), -jnp.inf, jnp.float32),
        jnp.zeros((b, kh, g, t), jnp.float32),
        jnp.zeros((b, kh, g, t, h), jnp.float32),
    )
    # Blocks past the last valid key of every row change nothing: skip them
    # (decode then reads only the occupied part of the cache).
    any_valid = jnp.any(mask[:, :, :s], axis=(0, 1))  # [S]
    last = jnp.max(jnp.where(any_valid, jnp.arange(s), -1))
    carry = jax.lax.fori_loop(0, (last + block) // block, step, init)
    if own is not None:
        own_k, own_v = (x.astype(c.dtype) for x, c in zip(own, (k, v)))
        carry = reduce(carry, own_k, own_v, mask[:, :, s:])
    _, total, out = carry
    out = out / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)[..., None]
    return out.transpose(0, 3, 1, 2, 4)  # [B, T, K, G, H]


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
            "BSD,CKDH->BSCKH", (2, c.num_kv_heads, c.embed_dim, c.head_dim), **kw
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
        mask: jax.Array,  # [B, T, S], or [B, T, S + T]: the cache, then x's keys
        cache_kv: tuple[jax.Array, jax.Array] | None,  # [B, S, K, H] each
        write_slots: jax.Array,  # [B] first cache slot written, per row
        rows: RowWindow | SlotRows | None = None,  # cache_kv has more rows than x
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        c = self.config
        q = self._query_norm(self.q_einsum(x))  # [B, T, N, H]
        kv = self.kv_einsum(x)  # [B, T, 2, K, H]
        k, v = kv[:, :, 0], kv[:, :, 1]  # [B, T, K, H] each
        k = self._key_norm(k)
        q = apply_rope(q, positions, base=self.rope_base, scale=self.rope_scale)
        k = apply_rope(k, positions, base=self.rope_base, scale=self.rope_scale)
        q = q * jnp.asarray(c.query_pre_attn_scalar**-0.5, q.dtype)

        b, t, _, h = q.shape
        q = q.reshape(b, t, c.num_kv_heads, c.num_query_groups, h)  # [B, T, K, G, H]
        attend = functools.partial(
            blocked_attention, softcap=c.attn_logit_softcap, rows=rows
        )
        # The sampler's prefill chunks and decode steps read the run's cache,
        # whose length differs between runs: their attention must not depend
        # on that length. Without a cache (training, scoring) keys are the
        # call's own tokens: plain softmax, which also differentiates.
        if cache_kv is None:
            encoded = attention(q, k, v, mask, softcap=c.attn_logit_softcap)
        elif mask.shape[-1] == cache_kv[0].shape[1]:
            cache_kv = tuple(
                write_kv(old, new, write_slots, rows)
                for old, new in zip(cache_kv, (k, v))
            )
            encoded = attend(q, *cache_kv, mask)
        else:
            # The mask covers the cache as it was, then the new keys: a chunk
            # written into a ring could overwrite keys its own first queries
            # still see. It attends over a copy of its rows' ring and its own
            # keys, is written into the copy, and the rows go back. (Read in
            # place, then written in place, made XLA copy the whole cache.)
            ring = cache_kv if rows is None else tuple(map(rows.gather, cache_kv))
            encoded = blocked_attention(
                q, *ring, mask, softcap=c.attn_logit_softcap, own=(k, v)
            )
            ring = tuple(
                write_rows(r, new, write_slots) for r, new in zip(ring, (k, v))
            )
            cache_kv = (
                ring if rows is None else tuple(map(rows.scatter, cache_kv, ring))
            )
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
        # dtype=None: each projection computes in the wider of its input's
        # and its kernel's dtype (a LoRA merged in float32 keeps its update),
        # accumulating in float32 (`project` rounds once).
        kw = dict(
            use_bias=False,
            dtype=None,
            param_dtype=param_dtype,
            preferred_element_type=jnp.float32,
            rngs=rngs,
        )
        self.gate_proj = nnx.Linear(config.embed_dim, config.hidden_dim, **kw)
        self.up_proj = nnx.Linear(config.embed_dim, config.hidden_dim, **kw)
        self.down_proj = nnx.Linear(config.hidden_dim, config.embed_dim, **kw)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        gate, up = project(self.gate_proj, x), project(self.up_proj, x)
        hidden = jax.nn.gelu(gate, approximate=True) * up
        return project(self.down_proj, hidden.astype(self.dtype)).astype(self.dtype)


# How a LoRA adapter reads an `nnx.Linear` kernel ([in, out]) as an einsum.
LINEAR_EQUATION = "...i,io->...o"


def project(linear: nnx.Linear, x: jax.Array) -> jax.Array:
    """`linear(x)` (accumulated in float32), with the update of a LoRA
    attached to it (`LoraAdapter`) added before the one rounding to the
    wider of the input's and kernel's dtypes."""
    dtype = jnp.promote_types(x.dtype, linear.kernel.get_value().dtype)
    y = linear(x)
    if (lora := getattr(linear, LORA_ATTRIBUTE, None)) is not None:
        y = y + lora(x.astype(dtype))
    return y.astype(dtype)


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

    def __call__(self, x, positions, mask, cache_kv, write_slots, rows=None):
        attn_out, cache_kv = self.attn(
            self.pre_attention_norm(x), positions, mask, cache_kv, write_slots, rows
        )
        x = x + self.post_attention_norm(attn_out)
        x = x + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x)))
        return x, cache_kv


def run_layer(layer: Block, *args):
    """`layer(*args)` as a nested jitted call.

    Layers of one attention type share a graphdef, so JAX traces and
    lowers each type once per program instead of once per layer (at
    gemma3-270m shapes that halves the tracing of every program). XLA
    inlines the calls: the compiled program is the same. The call runs on
    a copy of the layer, so a call that changes the layer raises
    (`Gemma3.jit_layers`).
    """
    return _run_block(*nnx.split(layer), *args)


@functools.partial(jax.jit, static_argnums=0)
def _run_block(graphdef: nnx.GraphDef, state: nnx.State, *args):
    layer = nnx.merge(graphdef, state)
    outputs = layer(*args)
    if nnx.graphdef(layer) != graphdef:  # checked once per trace
        raise ValueError(
            "A layer call changed the layer (qwix adding LoRA factors?), which a"
            " nested jitted call would lose: set Gemma3.jit_layers = False first,"
            " as checkpoints.lora.qwix_lora_model does."
        )
    return outputs


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
        # Run each layer as a nested jitted call (`run_layer`). False runs
        # them directly, for calls that change the layers (qwix adds its
        # LoRA factors to them in one).
        self.jit_layers = True

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
            ring_before = cache.window
            cache = cache.write(positions, valid, cursors)
            keys = {t: cache.table(t) for t in AttentionType}
            if tokens.shape[1] > 1:
                # A chunk written into a ring may overwrite keys that its own
                # first queries still see: sliding layers attend over the
                # ring as it was and the chunk's own keys (always, so that a
                # prompt's bits do not depend on whether its ring wrapped).
                keys[AttentionType.LOCAL_SLIDING] = ring_before.extend(positions, valid)
            write_slots = {t: cache.write_slots(t, cursors) for t in AttentionType}
        masks = attention_masks(self.config, positions, keys)

        x = self.embedder.encode(tokens)
        rows = None if cache is None else cache.rows
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            kind = layer.attention_type
            layer_kv = None if cache is None else (cache.k[i], cache.v[i])
            args = (x, positions, masks[kind], layer_kv, write_slots[kind], rows)
            x, layer_kv = run_layer(layer, *args) if self.jit_layers else layer(*args)
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
