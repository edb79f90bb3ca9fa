"""Merging a LoRA adapter into its weights: W' = W + (a . b) * alpha / r, in
place, kept in float32 so that a small update survives a bfloat16 model.
Those layers then compute in float32 (twice the bytes of their bf16
weights), so in bfloat16 their results differ from the base model's even
for a zero update. Each merged weight is marked (`lora_state.MERGED`), so
that a second update on top is refused.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gsm8k_jax.checkpoints.lora_config import LoraConfig
from gsm8k_jax.checkpoints.lora_state import mark_merged
from gsm8k_jax.checkpoints.lora_targets import (
    Target,
    check_no_adapter,
    check_not_merged,
    factors_by_weight,
    validate_lora_params,
    weight_targets,
)
from gsm8k_jax.models.gemma3.model import Gemma3


@functools.partial(jax.jit, static_argnames=("equation", "scale", "sharding"))
def _merged(
    w: jax.Array,
    a: jax.Array,
    b: jax.Array,
    *,
    equation: str,
    scale: float,
    sharding: jax.sharding.Sharding,
) -> jax.Array:
    """float32(W) + (a . b) * scale, all in float32, sharded as W."""
    delta = jnp.einsum(
        equation,
        a.astype(jnp.float32),
        b.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    merged = w.astype(jnp.float32) + delta * scale
    return jax.lax.with_sharding_constraint(merged, sharding)


def _merge_weight(target: Target, a: Any, b: Any, scale: float) -> jax.Array:
    """The merged weight, its factors placed beside the weight's blocks."""
    w = target.variable.get_value()
    a_sharding, b_sharding = target.factor_shardings(w.sharding)
    return _merged(
        w,
        jax.device_put(a, a_sharding),
        jax.device_put(b, b_sharding),
        equation=target.delta_equation,
        scale=scale,
        sharding=w.sharding,
    )


def merge_lora(
    model: Gemma3, params: Mapping[str, np.ndarray | jax.Array], config: LoraConfig
) -> None:
    """W += (a . b) * alpha / rank for each factor pair, in place.

    Validates first. The update is computed in float32 and the merged
    weights stay float32: bf16(W + delta) would round away most of a small
    update (48% of it when delta is 0.3% of W). The model computes those
    layers in float32 and returns activations in its own dtype. A weight
    split over a mesh stays split as it is (its factors are placed to
    match), so no device ever holds a whole merged weight.

    Each merged weight is marked (`lora_state.MERGED`, metadata that is part
    of the model's structure, `nnx.graphdef`): a `Sampler` made before
    merging refuses the merged model, as one made before attaching does.
    Make it after merging.
    """
    validate_lora_params(model, params, config)
    check_no_adapter(model)
    targets, weights = (
        weight_targets(model, config.module_path),
        factors_by_weight(params),
    )
    check_not_merged(targets, weights)
    for weight in weights:
        target = targets[weight]
        merged = _merge_weight(
            target,
            params[f"{weight}_lora_a"],
            params[f"{weight}_lora_b"],
            config.scale,
        )
        target.variable.set_value(merged)
        mark_merged(target.variable)
