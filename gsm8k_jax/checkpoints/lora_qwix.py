"""Running a LoRA adapter unmerged through qwix, as in training: qwix's
provider intercepts the einsums / dot_generals of the layers `module_path`
selects and adds the factors' update to their outputs.

The interception survives `nnx.split` / `nnx.merge` and `jax.jit` (the
graphdef keeps qwix's subclass of the model), but qwix's LoRA einsum
rewrites a debugging attribute (`<param>_lora_einsum_str`) on its layer at
every call, and NNX forbids mutating a module outside the trace it was
merged in: the Sampler merges the model in its jitted function and calls it
in a `lax.while_loop` body, which raised `TraceContextError`. `apply_lora`
makes those layers skip rewrites of an unchanged value, so this model
samples too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from gsm8k_jax.checkpoints.lora_config import (
    DEFAULT_MODULE_PATH,
    LoraConfig,
    named_setting,
)
from gsm8k_jax.checkpoints.lora_targets import (
    check_no_adapter,
    check_not_merged,
    factors_by_weight,
    format_shape,
    validate_lora_params,
    weight_targets,
)
from gsm8k_jax.models.gemma3.model import Gemma3
from gsm8k_jax.models.gemma3.params import CheckpointError

_EINSUM_STR_SUFFIX = "_lora_einsum_str"
# The dtype `apply_lora` stores factors in (see there).
FACTOR_DTYPE = jnp.float32
_SAMPLEABLE_CLASSES: dict[type, type] = {}


def _sampleable_class(cls: type) -> type:
    """`cls` where rewriting qwix's debug attribute with the same value is a no-op.

    qwix's LoRA einsum sets `<param>_lora_einsum_str` on its layer at every
    call; the value is fixed at apply time, and skipping the rewrite lets the
    layer run where NNX forbids mutating it (a `lax.while_loop` body, for one).
    """
    if cls not in _SAMPLEABLE_CLASSES:

        def __setattr__(self, name: str, value: Any) -> None:
            if name.endswith(_EINSUM_STR_SUFFIX) and vars(self).get(name) == value:
                return
            super(sampleable, self).__setattr__(name, value)

        sampleable = type(cls.__name__, (cls,), {"__setattr__": __setattr__})
        _SAMPLEABLE_CLASSES[cls] = sampleable
    return _SAMPLEABLE_CLASSES[cls]


def _make_sampleable(model: nnx.Module) -> None:
    """Gives qwix's LoRA einsum layers their `_sampleable_class`, in place."""
    for _, module in nnx.iter_modules(model):
        cls = type(module)
        uses_einsum_str = any(n.endswith(_EINSUM_STR_SUFFIX) for n in vars(module))
        if uses_einsum_str and cls not in _SAMPLEABLE_CLASSES.values():
            module.__class__ = _sampleable_class(cls)


def qwix_lora_model(model: Gemma3, config: LoraConfig, *, seed: int = 0) -> Gemma3:
    """qwix's LoRA version of `model` (base weights shared), with new factors
    (b = 0: the same function until trained) in the dtype of their weights.

    qwix finds the layers and adds the factors by running the model once.
    That run changes the layers, so it, and the LoRA model (whose layers
    each carry their own qwix path), run them directly (`Gemma3.jit_layers`).

    Raises:
      ValueError: `config.module_path` selects no layer (qwix would silently
        add no factors, leaving nothing to train or load).
    """
    provider = qwix.LoraProvider(
        module_path=config.module_path, rank=config.rank, alpha=config.alpha
    )
    tokens = jnp.zeros((1, 4), jnp.int32)
    positions = jnp.arange(4, dtype=jnp.int32)[None]
    valid = jnp.ones((1, 4), bool)
    model = nnx.clone(model)  # shares the weights' arrays
    model.jit_layers = False
    lora_model = qwix.apply_lora_to_model(
        model, provider, tokens, positions, valid, rngs=nnx.Rngs(seed)
    )
    if not nnx.to_flat_state(nnx.state(lora_model, nnx.LoRAParam)):
        raise ValueError(
            f"{named_setting('module_path', config.module_path)} matches no layer of"
            " the model (it must match a whole path such as"
            f" 'layers/0/attn/q_einsum'); Tunix's default is {DEFAULT_MODULE_PATH!r}."
        )
    return lora_model


def apply_lora(
    model: Gemma3, params: Mapping[str, np.ndarray | jax.Array], config: LoraConfig
) -> Gemma3:
    """A copy of `model` running the factors unmerged, through qwix.

    Validates first. Base weights are shared with `model`, not copied.
    Modules that `config.module_path` selects but the checkpoint has no
    factors for get zero factors (no update).

    Factors are stored in float32, whatever the weights' dtype (qwix
    creates them in it, as `qwix_lora_model` does), so every layer computes
    its update in float32 and adds it before the layer's one rounding, as
    the attached adapter does (in bfloat16, the same samples bit for bit,
    tested on CPU), and a float32 checkpoint's factors are not rounded. In
    bfloat16 factors, qwix's einsum update inherits the layer's float32
    accumulation, which XLA:CPU cannot run outside its fused matmuls (a
    Sampler's prefill failed: "Unsupported element type for
    DotThunk::Execute: BF16 x BF16 = F32"), and its MLP (`nnx.Linear`)
    update is rounded to bfloat16 before it is added.
    """
    validate_lora_params(model, params, config)
    check_no_adapter(model)
    check_not_merged(
        weight_targets(model, config.module_path), factors_by_weight(params)
    )
    # qwix creates the factors by running the model once, on any input.
    # Tracing that run abstractly gives the structure without computing
    # anything; the values come from `model` and the checkpoint.
    abstract = nnx.eval_shape(lambda: qwix_lora_model(model, config))
    graphdef, abstract_state = nnx.split(abstract)
    base = dict(nnx.to_flat_state(nnx.state(model)))
    filled = []
    for path, variable in nnx.to_flat_state(abstract_state):
        key = "/".join(map(str, path))
        spec = variable.get_value()
        if path in base:
            value = base[path].get_value()
        elif not isinstance(variable, nnx.LoRAParam):
            raise CheckpointError(f"qwix added {key}, which is not a LoRA factor.")
        elif key not in params:
            value = jnp.zeros(spec.shape, FACTOR_DTYPE)
        elif tuple(np.shape(params[key])) != spec.shape:
            # Validation mirrors qwix: this is a bug, not a user error.
            raise CheckpointError(
                f"qwix creates {key} as {format_shape(spec.shape)}, the checkpoint has"
                f" {format_shape(np.shape(params[key]))}."
            )
        else:
            value = jnp.asarray(params[key], FACTOR_DTYPE)
        filled.append((path, variable.replace(value)))
    lora_model = nnx.merge(graphdef, nnx.from_flat_state(filled))
    _make_sampleable(lora_model)
    return lora_model
