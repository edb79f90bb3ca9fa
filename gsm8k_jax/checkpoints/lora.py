"""LoRA adapters trained with Tunix: load one and attach it to a model (or
merge it). Reading and writing the checkpoints: `lora_checkpoint`; the
weights an adapter targets and the check that its factors fit:
`lora_targets`.

A weight W gets two factors: `lora_a` holds W's axes that the layer input
shares (the contracting axes) then the rank r; `lora_b` holds r then W's
other axes. The layer computes `W x + (x . a . b) * alpha / r`.

Three ways to use an adapter, all importable from here:

* attached (`attach_lora`, here, the default): each factor pair sits beside
  its weight (`modules.LoraAdapter`), and the layer adds the update to its
  float32 accumulator before its one rounding. The base weights keep their
  dtype, so a bfloat16 LoRA run differs from the base run by the adapter
  alone (zero factors give the base bits), and a small update is not
  rounded away. Two small matmuls per adapted layer.
* merged (`merge_lora`, in `lora_merge`): W' = W + (a . b) * alpha / r, in
  place, in float32; those layers then compute in float32.
* unmerged through qwix (`apply_lora`, `qwix_lora_model`, in `lora_qwix`),
  as in training. `apply_lora` keeps the factors in float32, so its update
  is the attached adapter's (in bfloat16, the same samples bit for bit,
  tested on CPU). `qwix_lora_model` (training, in float32) makes factors in
  the weights' dtype: in bfloat16 its MLP update is rounded before it is
  added, and on CPU XLA cannot run a Sampler's prefill of it (seen with jax
  0.10.2: "Unsupported element type for DotThunk::Execute: BF16 x BF16 =
  F32").

`lora_mode(model)` says which of these a model carries, if any.

alpha is not in Tunix's checkpoints: it must be the value used in training
(our trainer records it beside them, and `load_lora` uses that).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import jax
import numpy as np
from flax import nnx

from gsm8k_jax.checkpoints.lora_checkpoint import (
    TrainedLora,
    lora_factor_shapes,
    resolve_trained_lora,
    restore_lora_params,
)
from gsm8k_jax.checkpoints.lora_config import LoraConfig
from gsm8k_jax.checkpoints.lora_merge import merge_lora
from gsm8k_jax.checkpoints.lora_qwix import apply_lora, qwix_lora_model
from gsm8k_jax.checkpoints.lora_state import adapted_layers, lora_mode, merged_weights
from gsm8k_jax.checkpoints.lora_targets import (
    check_factors_fit,
    check_not_merged,
    factors_by_weight,
    validate_lora_params,
    weight_targets,
)
from gsm8k_jax.models.gemma3.config import Gemma3Config
from gsm8k_jax.models.gemma3.model import Gemma3
from gsm8k_jax.models.gemma3.modules import LORA_ATTRIBUTE, LoraAdapter
from gsm8k_jax.models.gemma3.params import CheckpointError

__all__ = [
    "LoraConfig",
    "apply_lora",
    "attach_lora",
    "check_trained_loras",
    "detach_lora",
    "load_lora",
    "load_trained_lora",
    "lora_mode",
    "merge_lora",
    "qwix_lora_model",
    "validate_lora_params",
]


def attach_lora(
    model: Gemma3, params: Mapping[str, np.ndarray | jax.Array], config: LoraConfig
) -> None:
    """Attaches each factor pair to the layer of its weight, in place (the
    default way to evaluate an adapter; `modules.LoraAdapter`).

    Validates first, and replaces any adapter attached before. The base
    weights are untouched: they keep their dtype and bytes, zero factors
    give the base model's bits, and a small update joins each layer's
    float32 accumulator (in bfloat16 too). Factors keep their checkpoint
    dtype, placed beside their weight's blocks on a mesh. A `Sampler`
    compiles for the model's structure when it is made (and refuses a
    model whose structure changed since): make it after attaching.
    """
    validate_lora_params(model, params, config)
    if nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        raise ValueError(
            "The model already runs LoRA factors through qwix (qwix_lora_model or"
            " apply_lora); attach to the base model instead."
        )
    targets, weights = (
        weight_targets(model, config.module_path),
        factors_by_weight(params),
    )
    check_not_merged(targets, weights)
    _remove_adapters(model)
    for weight in weights:
        target = targets[weight]
        w = target.variable.get_value()
        a, b = (
            jax.device_put(params[f"{weight}_lora_{f}"], sharding)
            for f, sharding in zip("ab", target.factor_shardings(w.sharding))
        )
        adapter = LoraAdapter(target.equation, a, b, config.scale)
        setattr(target.layer, LORA_ATTRIBUTE, adapter)


def detach_lora(model: Gemma3) -> None:
    """Removes every adapter `attach_lora` attached, in place.

    Raises:
      ValueError: a weight has an update merged in (`merge_lora`, `load_lora`
        with merge=True), which no detaching removes; the model is left
        unchanged.
    """
    if merged := merged_weights(model):
        more = f" and {len(merged) - 1} more" if len(merged) > 1 else ""
        raise ValueError(
            f"The model has a LoRA update merged in ({merged[0]}{more}), which"
            " cannot be detached: load the base model again (load_pretrained), or"
            " attach instead of merging (load_lora's default)."
        )
    _remove_adapters(model)


def _remove_adapters(model: Gemma3) -> None:
    for layer in adapted_layers(model):
        delattr(layer, LORA_ATTRIBUTE)


def load_lora(
    model: Gemma3,
    path: str | os.PathLike,
    config: LoraConfig | None = None,
    *,
    merge: bool = False,
) -> Gemma3:
    """Restores a Tunix LoRA checkpoint and attaches it to `model` (or merges it).

    Args:
      model: the base model the adapter was trained on.
      path: anything `resolve_lora_checkpoint` accepts, local or `gs://`.
      config: rank, alpha and module_path of the training run. Checkpoints
        our trainer wrote record them: None uses those, and a config that
        contradicts them is refused. Tunix's own record none: required, and
        an alpha left at LoraConfig's default (2.0) is used with a warning.
      merge: False: attach the factors beside the weights (`attach_lora`,
        replacing any attached before). True: merge them into the weights in
        float32 (`merge_lora`; those layers then compute in float32).
        Either way `model` is changed in place and returned.
    """
    return load_trained_lora(model, resolve_trained_lora(path, config), merge=merge)


def load_trained_lora(
    model: Gemma3, trained: TrainedLora, *, merge: bool = False
) -> Gemma3:
    """`load_lora` for a checkpoint already found with its config
    (`resolve_trained_lora`), without looking it up again."""
    params = restore_lora_params(trained.params_path)
    (merge_lora if merge else attach_lora)(model, params, trained.config)
    return model


def check_trained_loras(
    model_config: Gemma3Config, trained: Iterable[TrainedLora]
) -> None:
    """Refuses, before any weight or factor is read, a checkpoint whose
    factors `load_trained_lora` would refuse on a model of `model_config`
    (another rank, module_path or model size): from each checkpoint's
    metadata and an abstract model alone, so a script or a sweep finds it
    before it loads or evaluates anything."""
    model = nnx.eval_shape(lambda: Gemma3(model_config, rngs=nnx.Rngs(0)))
    for checkpoint in trained:
        shapes = lora_factor_shapes(checkpoint.params_path)
        try:
            check_factors_fit(model, shapes, checkpoint.config)
        except CheckpointError as e:  # Which of a sweep's checkpoints.
            raise CheckpointError(f"{checkpoint.params_path}: {e}") from e
