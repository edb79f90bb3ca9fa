"""Which LoRA a model carries, if any: attached beside its weights (`lora`),
merged into them (`lora_merge`) or run through qwix (`lora_qwix`).

Needs neither Orbax nor qwix, so that `evaluate` can check a base model
against its run record without importing them.
"""

from __future__ import annotations

from flax import nnx

from gsm8k_jax.models.gemma3.modules import LORA_ATTRIBUTE, LoraAdapter

# The metadata (`nnx.Variable.set_metadata`) that merge_lora puts on each
# weight it writes: another merge or an unmerged LoRA on top would add a
# second update. It lives on the Variable, so it goes wherever the weight
# goes: into a clone, a copy of the model's state and the model it updates,
# and through array replacements (`shard_model`, NNX transforms). Putting
# the base weights back with `nnx.update(model, base_state)` (as a sweep
# does) brings their metadata back too, which clears it. Always True where
# set: a part of the model's graphdef and of jitted programs' cache keys,
# it gives one merged structure for every checkpoint of the same layers.
MERGED = "lora_merged"


def mark_merged(variable: nnx.Variable) -> None:
    """Marks `variable` (a weight) as holding a LoRA update merged in."""
    variable.set_metadata(MERGED, True)


def is_merged(variable: nnx.Variable) -> bool:
    """Whether `variable` (a weight) holds a LoRA update merged in."""
    return variable.get_metadata(MERGED, False)


def merged_weights(model: nnx.Module) -> list[str]:
    """The weights (by '/'-joined path) that hold a LoRA update merged in."""
    return [
        "/".join(map(str, path))
        for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
        if is_merged(variable)
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
    (`attach_lora`, `load_lora`'s default), "merged" (a weight carries the
    mark `merge_lora` puts on it: `MERGED`), or None for none. The loaders
    refuse a second LoRA on top of one; a model carrying two ways anyway
    gets the first of that order.

    A weight changed by other means (e.g. a custom sweep loader) is not
    seen: only these three. The merged mark stays with the weight when it
    is cloned, copied, moved onto a mesh or replaced by an NNX transform,
    and when any array is written into it (`set_value`, even the base one):
    what clears it is putting the base weights back with `nnx.update` from
    a copy of them taken before merging (`jax.tree.map(lambda x: x,
    nnx.state(model, nnx.Param))`, the sweep's way: `nnx.state` alone gives
    the model's own weights, which merging changes too), or loading the
    model again.
    """
    if nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        return "qwix"
    if adapted_layers(model):
        return "attached"
    if merged_weights(model):
        return "merged"
    return None
