"""What every way of using a LoRA adapter needs (attached: `lora`, merged:
`lora_merge`, through qwix: `lora_qwix`): the weights `module_path` gives
factors to, with each factor's axes, shape and placement; the check that a
checkpoint's factors fit them; and the refusal of a model that already
carries an update (merged in or attached), which another would add to
(which update a model carries: `lora_state`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gsm8k_jax.checkpoints.lora_checkpoint import FACTOR_NAME
from gsm8k_jax.checkpoints.lora_config import LoraConfig, named_setting
from gsm8k_jax.checkpoints.lora_state import adapted_layers, is_merged
from gsm8k_jax.models.gemma3.model import LINEAR_EQUATION, Gemma3
from gsm8k_jax.models.gemma3.modules import Einsum, lora_axes
from gsm8k_jax.models.gemma3.params import CheckpointError

# A layer's weight path: layers/<index>/<kind>, e.g. layers/3/attn/q_einsum/w.
_LAYER_WEIGHT = re.compile(r"layers/(\d+)/(.+)")


# --------------------------------------------------------------------------
# Matching factors to the model's weights
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
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


def _target(module: nnx.Module) -> tuple[str, Target] | None:
    """(param name, target) for the layer types qwix attaches LoRA to here."""
    if isinstance(module, Einsum):  # y = einsum('<x axes>,<w axes>->...', x, w)
        return "w", Target(module.w, module, module.equation)
    if isinstance(module, nnx.Linear):  # kernel [in, out]
        return "kernel", Target(module.kernel, module, LINEAR_EQUATION)
    return None


def weight_targets(model: nnx.Module, module_path: str) -> dict[str, Target]:
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


def format_shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _preview(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


def factors_by_weight(
    params: Mapping[str, Any],
) -> dict[str, dict[str, tuple[int, ...]]]:
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
    """Checks that the factors fit the model and config, before anything runs
    (`check_factors_fit`), and warns where a kind of weight has factors in
    only some of its layers.

    Raises:
      CheckpointError: saying what does not fit and the likely cause
        (another model size, another rank, another module_path).
    """
    check_factors_fit(model, params, config)
    _warn_if_partial(
        factors_by_weight(params), weight_targets(model, config.module_path)
    )


def check_factors_fit(
    model: Gemma3,
    params: Mapping[str, np.ndarray | jax.Array | jax.ShapeDtypeStruct],
    config: LoraConfig,
) -> None:
    """Every factor must belong to a weight of the model that
    `config.module_path` selects, come with its partner, have rank
    `config.rank` and the shape qwix would create. Shapes alone are read:
    `model` may be abstract (`nnx.eval_shape`), `params` shape structs.

    Raises:
      CheckpointError: as `validate_lora_params`.
    """
    if not params:
        raise CheckpointError(
            "The checkpoint has no LoRA parameters (no keys ending in _lora_a /"
            " _lora_b): not a LoRA checkpoint?"
        )
    factors = factors_by_weight(params)

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

    targets = weight_targets(model, config.module_path)
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
                f" ({weight}_lora_a {format_shape(a_shape)}). Set the rank (and alpha)"
                " the adapter was trained with."
            )
    for weight, shapes in sorted(factors.items()):
        expected = dict(zip("ab", targets[weight].factor_shapes(config.rank)))
        for which in "ab":
            if shapes[which] != expected[which]:
                raise CheckpointError(
                    f"LoRA shape mismatch: {weight}_lora_{which} is"
                    f" {format_shape(shapes[which])} in the checkpoint, but this model"
                    f" ({weight} {format_shape(weights[weight])}) expects"
                    f" {format_shape(expected[which])} at rank {config.rank}: a"
                    " checkpoint for another model size?"
                )


def _warn_if_partial(factors: Mapping[str, Any], targets: Mapping[str, Target]) -> None:
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
# A model that already carries an update
# --------------------------------------------------------------------------


def check_not_merged(targets: Mapping[str, Target], weights: Iterable[str]) -> None:
    """Refuses a model whose `weights` (keys of its `weight_targets`) hold an
    update an earlier merge wrote."""
    for weight in weights:
        if is_merged(targets[weight].variable):
            raise ValueError(
                f"{weight} already has a LoRA update merged in; another would add"
                " to it. Load the base model again (load_pretrained), or put its"
                " weights back (nnx.update from a copy taken before merging:"
                " jax.tree.map(lambda x: x, nnx.state(model, nnx.Param))),"
                " before applying the next checkpoint."
            )


def check_no_adapter(model: Gemma3) -> None:
    """Refuses a model with an adapter attached: merging or applying another
    update on top would add to it."""
    if adapted_layers(model):
        raise ValueError(
            "The model has a LoRA attached (attach_lora); another update would"
            " add to it. Detach it first (detach_lora)."
        )
