"""Which LoRA a model carries, if any: attached beside its weights (`lora`),
merged into them (`lora_merge`) or run through qwix (`lora_qwix`).

Needs neither Orbax nor qwix, so that `evaluate` can check a base model
against its run record without importing them.
"""

from __future__ import annotations

import weakref
from typing import Any

import jax
from flax import nnx

from gsm8k_jax.models.gemma3.modules import LORA_ATTRIBUTE, LoraAdapter

# What `lora_mode` returns for a model carrying a LoRA, and what a run
# record's `lora_mode` may say (run_record.run_info).
LORA_MODES = ("attached", "merged", "qwix")

# Every array merge_lora has written, by id: a weight that still holds one
# (in this model, a clone or a copy of its state) has an update merged in,
# and another merge or an unmerged LoRA on top would add a second. Putting
# the base arrays back (as a sweep does) clears it.
MERGED_ARRAYS: weakref.WeakValueDictionary[int, jax.Array] = (
    weakref.WeakValueDictionary()
)


def is_merged(value: Any) -> bool:
    """Whether `value` (a weight's array) is one merge_lora wrote."""
    return MERGED_ARRAYS.get(id(value)) is value


def merged_weights(model: nnx.Module) -> list[str]:
    """The weights (by '/'-joined path) that hold a LoRA update merged in."""
    return [
        "/".join(map(str, path))
        for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
        if is_merged(variable.get_value())
    ]


def adapted_layers(model: nnx.Module) -> list[nnx.Module]:
    """The layers that hold a `LoraAdapter` (`attach_lora`)."""
    return [
        module
        for _, module in nnx.iter_modules(model)
        if isinstance(getattr(module, LORA_ATTRIBUTE, None), LoraAdapter)
    ]


def lora_mode(model: nnx.Module) -> str | None:
    """How `model` carries a LoRA: "qwix" (it holds qwix's LoRA factors,
    `nnx.LoRAParam`: made by `qwix_lora_model` or `apply_lora`), "attached"
    (`attach_lora`, `load_lora`'s default), "merged" (a weight holds an
    array `merge_lora` wrote), or None for none. The loaders refuse a
    second LoRA on top of one; a model carrying two ways anyway gets the
    first of that order.

    A weight changed by other means (e.g. a custom sweep loader) is not
    seen: only these three. Nor is a merge once new arrays replace the
    merged ones in the model itself, which `MERGED_ARRAYS` does not know:
    an NNX transform (`nnx.jit` and the like) called on the model, or its
    weights moved onto a mesh (`Sampler(model, ..., mesh=...)` of a model
    loaded without one: load it with the mesh before merging). A clone or a
    copy of the model's state keeps them.
    """
    if nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        return "qwix"
    if adapted_layers(model):
        return "attached"
    if merged_weights(model):
        return "merged"
    return None
