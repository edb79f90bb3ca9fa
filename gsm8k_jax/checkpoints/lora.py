"""LoRA adapters trained with Tunix: check them against a model, then attach,
merge or apply them (reading and writing the checkpoints: `lora_checkpoint`).

A weight W gets two factors: `lora_a` holds W's axes that the layer input
shares (the contracting axes) then the rank r; `lora_b` holds r then W's
other axes. The layer computes `W x + (x . a . b) * alpha / r`.

Three ways to use an adapter:

* attached (`attach_lora`, the default): each factor pair sits beside its
  weight (`modules.LoraAdapter`), and the layer adds the update to its
  float32 accumulator before its one rounding. The base weights keep their
  dtype, so a bfloat16 LoRA run differs from the base run by the adapter
  alone (zero factors give the base bits), and a small update is not
  rounded away. Two small matmuls per adapted layer.
* merged (`merge_lora`): W' = W + (a . b) * alpha / r, in place, kept in
  float32 so that a small update survives a bfloat16 model; those layers
  then compute in float32 (twice the bytes of their bf16 weights), so in
  bfloat16 their results differ from the base model's even for a zero
  update.
* unmerged through qwix (`apply_lora`), as in training: its provider
  intercepts the einsums / dot_generals of the layers `module_path`
  selects, in the activation dtype. The interception survives `nnx.split` /
  `nnx.merge` and `jax.jit` (the graphdef keeps qwix's subclass of the
  model), but qwix's LoRA einsum rewrites a debugging attribute
  (`<param>_lora_einsum_str`) on its layer at every call, and NNX forbids
  mutating a module outside the trace it was merged in: the Sampler merges
  the model in its jitted function and calls it in a `lax.while_loop` body,
  which raised `TraceContextError`. `apply_lora` makes those layers skip
  rewrites of an unchanged value, so this model samples too.

alpha is not in Tunix's checkpoints: it must be the value used in training
(our trainer records it beside them, and `load_lora` uses that).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gsm8k_jax.checkpoints.lora_checkpoint import (
    FACTOR_NAME,
    TrainedLora,
    resolve_trained_lora,
    restore_lora_params,
)
from gsm8k_jax.checkpoints.lora_config import (
    DEFAULT_MODULE_PATH,
    LoraConfig,
    named_setting,
)
from gsm8k_jax.models.gemma3.model import LINEAR_EQUATION, Gemma3
from gsm8k_jax.models.gemma3.modules import (
    LORA_ATTRIBUTE,
    Einsum,
    LoraAdapter,
    lora_axes,
)
from gsm8k_jax.models.gemma3.params import CheckpointError

_EINSUM_STR_SUFFIX = "_lora_einsum_str"
# A layer's weight path: layers/<index>/<kind>, e.g. layers/3/attn/q_einsum/w.
_LAYER_WEIGHT = re.compile(r"layers/(\d+)/(.+)")


# --------------------------------------------------------------------------
# Matching factors to the model's weights
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Target:
    """A weight qwix gives LoRA factors to, with the axes of each factor.

    Axes are einsum letters of the layer's equation (`modules.lora_axes`):
    `w_axes` name the weight's axes; lora_a has `a_axes` (those the layer
    input shares) then the rank, lora_b has the rank then `b_axes`.
    """

    variable: nnx.Variable
    layer: nnx.Module  # the Einsum or Linear that applies the weight
    equation: str  # the layer's `x,w->y` einsum

    @property
    def w_axes(self) -> str:
        return lora_axes(self.equation)[0]

    @property
    def a_axes(self) -> str:
        return lora_axes(self.equation)[1]

    @property
    def b_axes(self) -> str:
        return lora_axes(self.equation)[2]

    def factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        size = dict(zip(self.w_axes, self.variable.get_value().shape))
        return (
            (*(size[c] for c in self.a_axes), rank),
            (rank, *(size[c] for c in self.b_axes)),
        )

    @property
    def delta_equation(self) -> str:
        """The einsum of a . b laid out like the weight."""
        r = next(c for c in "rstuvwxyz" if c not in self.w_axes)
        return f"{self.a_axes}{r},{r}{self.b_axes}->{self.w_axes}"

    def factor_shardings(
        self, sharding: jax.sharding.Sharding
    ) -> tuple[jax.sharding.Sharding, jax.sharding.Sharding]:
        """Where lora_a and lora_b go for a weight placed with `sharding`: each
        axis split as the weight's axis of the same letter, the rank whole."""
        if not isinstance(sharding, NamedSharding):  # One device.
            return sharding, sharding
        spec = sharding.spec + (None,) * (len(self.w_axes) - len(sharding.spec))
        split = dict(zip(self.w_axes, spec))
        a_spec = PartitionSpec(*map(split.get, self.a_axes), None)
        b_spec = PartitionSpec(None, *map(split.get, self.b_axes))
        mesh = sharding.mesh
        return NamedSharding(mesh, a_spec), NamedSharding(mesh, b_spec)


def _target(module: nnx.Module) -> tuple[str, _Target] | None:
    """(param name, target) for the layer types qwix attaches LoRA to here."""
    if isinstance(module, Einsum):  # y = einsum('<x axes>,<w axes>->...', x, w)
        return "w", _Target(module.w, module, module.equation)
    if isinstance(module, nnx.Linear):  # kernel [in, out]
        return "kernel", _Target(module.kernel, module, LINEAR_EQUATION)
    return None


def _targets(model: nnx.Module, module_path: str) -> dict[str, _Target]:
    """Weights (by '/'-joined path) that `module_path` gives LoRA factors to."""
    pattern = re.compile(module_path)
    targets = {}
    for path, module in nnx.iter_modules(model):
        name = "/".join(map(str, path))
        found = _target(module)
        if found is not None and pattern.fullmatch(name):
            targets[f"{name}/{found[0]}"] = found[1]
    return targets


def _weight_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """Every base (non-LoRA) parameter of the model, by '/'-joined path."""
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    return {
        "/".join(map(str, path)): tuple(var.get_value().shape)
        for path, var in nnx.to_flat_state(state)
    }


def _fmt(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _preview(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


def _factors(params: Mapping[str, Any]) -> dict[str, dict[str, tuple[int, ...]]]:
    """{weight path: {'a': shape, 'b': shape}}; rejects keys that are not factors."""
    factors: dict[str, dict[str, tuple[int, ...]]] = {}
    others = []
    for key, value in params.items():
        match = FACTOR_NAME.fullmatch(key)
        if match is None:
            others.append(key)
        else:
            factors.setdefault(match[1], {})[match[2]] = tuple(np.shape(value))
    if others:
        raise CheckpointError(
            f"Not LoRA factors (names must end in _lora_a / _lora_b): {_preview(others)}."
        )
    return factors


def validate_lora_params(
    model: Gemma3, params: Mapping[str, np.ndarray | jax.Array], config: LoraConfig
) -> None:
    """Checks that the factors fit the model and config, before anything runs.

    Every factor must belong to a weight of the model that
    `config.module_path` selects, come with its partner, have rank
    `config.rank` and the shape qwix would create.

    Raises:
      CheckpointError: saying what does not fit and the likely cause
        (another model size, another rank, another module_path).
    """
    if not params:
        raise CheckpointError(
            "The checkpoint has no LoRA parameters (no keys ending in _lora_a /"
            " _lora_b): not a LoRA checkpoint?"
        )
    factors = _factors(params)

    weights = _weight_shapes(model)
    unknown = sorted(w for w in factors if w not in weights)
    if unknown:
        num_layers = model.config.num_layers
        layers = [int(m[1]) for w in unknown if (m := re.match(r"layers/(\d+)/", w))]
        if layers and max(layers) >= num_layers:
            cause = (
                f"checkpoint has layers/{max(layers)}/... but the model has"
                f" {num_layers} layers: a checkpoint for another model size?"
            )
        else:
            cause = "a checkpoint for another model?"
        raise CheckpointError(
            f"LoRA factors for weights this model does not have"
            f" ({_preview(unknown)}): {cause}"
        )

    targets = _targets(model, config.module_path)
    unselected = sorted(w for w in factors if w not in targets)
    if unselected:
        raise CheckpointError(
            f"{named_setting('module_path', config.module_path)} does not select"
            f" {_preview(unselected)}, which the checkpoint has LoRA factors for:"
            " use the module_path the adapter was trained with."
        )

    unpaired = sorted(
        f"{w}_lora_{'b' if 'a' in f else 'a'}" for w, f in factors.items() if len(f) < 2
    )
    if unpaired:
        raise CheckpointError(
            f"The checkpoint lacks {_preview(unpaired)}: every LoRA weight needs"
            " both factors."
        )

    for weight, shapes in sorted(factors.items()):
        a_shape = shapes["a"]
        if not a_shape or a_shape[-1] != config.rank:
            raise CheckpointError(
                f"LoRA rank mismatch: {named_setting('rank', config.rank)} but"
                f" checkpoint has rank {a_shape[-1] if a_shape else '?'}"
                f" ({weight}_lora_a {_fmt(a_shape)}). Set the rank (and alpha)"
                " the adapter was trained with."
            )
    for weight, shapes in sorted(factors.items()):
        expected = dict(zip("ab", targets[weight].factor_shapes(config.rank)))
        for which in "ab":
            if shapes[which] != expected[which]:
                raise CheckpointError(
                    f"LoRA shape mismatch: {weight}_lora_{which} is"
                    f" {_fmt(shapes[which])} in the checkpoint, but this model"
                    f" ({weight} {_fmt(weights[weight])}) expects"
                    f" {_fmt(expected[which])} at rank {config.rank}: a"
                    " checkpoint for another model size?"
                )
    _warn_if_partial(factors, targets)


def _warn_if_partial(
    factors: Mapping[str, Any], targets: Mapping[str, _Target]
) -> None:
    """Warns when a kind of weight (e.g. attn/q_einsum/w) has factors in some
    of the layers `module_path` selects it in but not all: Tunix's module
    paths select a kind in every layer, so that is most likely a truncated or
    hand-built checkpoint, whose other layers would run unadapted. (A kind
    with no factors at all is an adapter trained with a narrower module_path:
    no update there is right.)"""
    layers: dict[str, tuple[set[int], set[int]]] = {}
    for weight in targets:
        if match := _LAYER_WEIGHT.fullmatch(weight):
            selected, adapted = layers.setdefault(match[2], (set(), set()))
            selected.add(int(match[1]))
            if weight in factors:
                adapted.add(int(match[1]))
    for kind, (selected, adapted) in sorted(layers.items()):
        if adapted and adapted != selected:
            missing = sorted(selected - adapted)
            logging.warning(
                "The LoRA checkpoint has no factors for %s in %d of the %d layers"
                " module_path selects it in (layers %s): a truncated or partial"
                " checkpoint? Those layers run without an update.",
                kind,
                len(missing),
                len(selected),
                _preview([str(i) for i in missing], limit=8),
            )


# --------------------------------------------------------------------------
# Using the factors
# --------------------------------------------------------------------------


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


def _merge_weight(target: _Target, a: Any, b: Any, scale: float) -> jax.Array:
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


# Every array merge_lora has written, by id: a weight that still holds one
# (in this model, a clone or a copy of its state) has an update merged in,
# and another merge or an unmerged LoRA on top would add a second. Putting
# the base arrays back (as a sweep does) clears it.
_MERGED_ARRAYS: weakref.WeakValueDictionary[int, jax.Array] = (
    weakref.WeakValueDictionary()
)


def _check_not_merged(targets: Mapping[str, _Target], weights: Iterable[str]) -> None:
    """Refuses a model whose `weights` (keys of its `_targets`) still hold
    arrays an earlier merge wrote."""
    for weight in weights:
        value = targets[weight].variable.get_value()
        if _MERGED_ARRAYS.get(id(value)) is value:
            raise ValueError(
                f"{weight} already has a LoRA update merged in; another would add"
                " to it. Load the base model again (load_pretrained), or put its"
                " weights back, before applying the next checkpoint."
            )


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
    targets, weights = _targets(model, config.module_path), _factors(params)
    _check_not_merged(targets, weights)
    detach_lora(model)
    for weight in weights:
        target = targets[weight]
        w = target.variable.get_value()
        a, b = (
            jax.device_put(params[f"{weight}_lora_{f}"], sharding)
            for f, sharding in zip("ab", target.factor_shardings(w.sharding))
        )
        adapter = LoraAdapter(target.equation, a, b, config.scale)
        setattr(target.layer, LORA_ATTRIBUTE, adapter)


def _check_no_adapter(model: Gemma3) -> None:
    """Refuses a model with an adapter attached: merging or applying another
    update on top would add to it."""
    if _adapted_layers(model):
        raise ValueError(
            "The model has a LoRA attached (attach_lora); another update would"
            " add to it. Detach it first (detach_lora)."
        )


def _adapted_layers(model: Gemma3) -> list[nnx.Module]:
    """The layers that hold a `LoraAdapter`."""
    return [
        module
        for _, module in nnx.iter_modules(model)
        if isinstance(getattr(module, LORA_ATTRIBUTE, None), LoraAdapter)
    ]


def detach_lora(model: Gemma3) -> None:
    """Removes every adapter `attach_lora` attached, in place."""
    for layer in _adapted_layers(model):
        delattr(layer, LORA_ATTRIBUTE)


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
    """
    validate_lora_params(model, params, config)
    _check_no_adapter(model)
    targets, weights = _targets(model, config.module_path), _factors(params)
    _check_not_merged(targets, weights)
    for weight in weights:
        target = targets[weight]
        merged = _merge_weight(
            target,
            params[f"{weight}_lora_a"],
            params[f"{weight}_lora_b"],
            config.scale,
        )
        target.variable.set_value(merged)
        _MERGED_ARRAYS[id(merged)] = merged


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

    Validates first. Base weights are shared with `model`, not copied. Factors
    are stored in the dtype of the weights they adapt (as qwix creates them).
    Modules that `config.module_path` selects but the checkpoint has no
    factors for get zero factors (no update).
    """
    validate_lora_params(model, params, config)
    _check_no_adapter(model)
    _check_not_merged(_targets(model, config.module_path), _factors(params))
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
            value = jnp.zeros(spec.shape, spec.dtype)
        elif tuple(np.shape(params[key])) != spec.shape:
            # Validation mirrors qwix: this is a bug, not a user error.
            raise CheckpointError(
                f"qwix creates {key} as {_fmt(spec.shape)}, the checkpoint has"
                f" {_fmt(np.shape(params[key]))}."
            )
        else:
            value = jnp.asarray(params[key], spec.dtype)
        filled.append((path, variable.replace(value)))
    lora_model = nnx.merge(graphdef, nnx.from_flat_state(filled))
    _make_sampleable(lora_model)
    return lora_model


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
