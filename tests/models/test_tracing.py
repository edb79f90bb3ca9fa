"""Layers run as nested jitted calls: tracing a model traces each attention
type's block once, not each layer, and a call that changes a layer fails."""

import collections

import jax
import jax.numpy as jnp
import pytest
import qwix
from flax import nnx

from gsm8k_jax.models.gemma3 import model as model_lib
from gsm8k_jax.models.gemma3.cache import KVCache
from gsm8k_jax.models.gemma3.config import AttentionType, gemma3_270m, gemma3_tiny
from gsm8k_jax.models.gemma3.model import Block, Gemma3

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
    model_lib._run_block.clear_cache()  # no earlier trace of a block reused

    def forward(state, tokens, cache):
        positions = jnp.broadcast_to(jnp.arange(TOKENS), tokens.shape)
        valid = jnp.ones(tokens.shape, bool)
        return nnx.merge(graphdef, state)(tokens, positions, valid, cache)

    cache = jax.eval_shape(
        lambda: KVCache.empty(config, BATCH, CACHE, jnp.float32, chunk=TOKENS)
    )
    tokens = jax.ShapeDtypeStruct((BATCH, TOKENS), jnp.int32)
    jax.jit(forward).trace(state, tokens, cache)
    assert config.num_layers == 18
    assert traced == {AttentionType.LOCAL_SLIDING: 1, AttentionType.GLOBAL: 1}


def test_a_call_that_changes_the_layers_fails_clearly():
    model = Gemma3(gemma3_tiny(), rngs=nnx.Rngs(0))
    provider = qwix.LoraProvider(module_path=".*q_einsum", rank=2, alpha=2.0)
    tokens = jnp.zeros((1, 4), jnp.int32)
    positions = jnp.arange(4)[None]
    with pytest.raises(ValueError, match="set Gemma3.jit_layers = False"):
        qwix.apply_lora_to_model(
            model, provider, tokens, positions, tokens >= 0, rngs=nnx.Rngs(0)
        )
