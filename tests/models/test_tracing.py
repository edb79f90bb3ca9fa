"""Tracing a model traces each attention type's block once, not each layer."""

import collections

import jax
import jax.numpy as jnp
from flax import nnx

from gsm8k_jax.models.gemma3.cache import KVCache
from gsm8k_jax.models.gemma3.config import AttentionType, gemma3_270m
from gsm8k_jax.models.gemma3.model import Block, Gemma3

# Shapes no other test traces, so no earlier trace of a block is reused.
BATCH, TOKENS, CACHE = 3, 13, 29


def test_each_attention_type_is_traced_once(monkeypatch):
    config = gemma3_270m()  # 18 layers, both attention types
    dtypes = dict(dtype=jnp.float32, param_dtype=jnp.float32)
    model = nnx.eval_shape(lambda: Gemma3(config, **dtypes, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    traced = collections.Counter()
    call = Block.__call__

    def counting_call(self, *args, **kwargs):
        traced[self.attention_type] += 1
        return call(self, *args, **kwargs)

    monkeypatch.setattr(Block, "__call__", counting_call)

    def forward(state, tokens, cache):
        positions = jnp.broadcast_to(jnp.arange(TOKENS), tokens.shape)
        valid = jnp.ones(tokens.shape, bool)
        return nnx.merge(graphdef, state)(tokens, positions, valid, cache)

    cache = jax.eval_shape(
        lambda: KVCache.empty(config, BATCH, CACHE, jnp.float32, ring=False)
    )
    tokens = jax.ShapeDtypeStruct((BATCH, TOKENS), jnp.int32)
    jax.jit(forward).trace(state, tokens, cache)
    assert config.num_layers == 18
    assert traced == {AttentionType.LOCAL_SLIDING: 1, AttentionType.GLOBAL: 1}
